"""The six extension interfaces of selfflow and the config base of each category."""

from selfflow_core.interfaces.backbone import Backbone, BackboneConfig
from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.interfaces.modality import FieldSpec, ModalityAdapter, ModalityConfig, Source
from selfflow_core.interfaces.teacher import TeacherConfig, TeacherStrategy
from selfflow_core.interfaces.text import TextEncoder, TextEncoderConfig, TextEncoding, TextSpec
from selfflow_core.interfaces.timesteps import (
    SchedulerConfig,
    TimeDistribution,
    TimeDistributionConfig,
    TimestepScheduler,
)
from selfflow_core.interfaces.tracker import Tracker, TrackerConfig

__all__ = [
    "Backbone", "BackboneConfig", "ComponentConfig", "FieldSpec", "ModalityAdapter",
    "ModalityConfig",
    "SchedulerConfig", "Source", "TeacherConfig", "TeacherStrategy",
    "TextEncoder", "TextEncoderConfig", "TextEncoding", "TextSpec", "TimeDistribution",
    "TimeDistributionConfig", "TimestepScheduler", "Tracker", "TrackerConfig",
]
