"""selfflow: Self-Flow (self-supervised flow matching) on a small, pluggable core.

The public API, in four groups: what a plugin author **extends** (the interfaces, hooks,
registries), what a user **composes** (configs and the core's components), what **runs** (the
trainer, sampling, the store and loader), and the **errors** (all under :class:`SelfFlowError`).
Plugins import only from here, :mod:`selfflow_core.tokens` and :mod:`selfflow_core.testing`.
"""

from __future__ import annotations

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.mmdit import MMDiT
from selfflow_core.builtin.text import ByteTextEncoder
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.builtin.trackers import JsonlTracker, NullTracker
from selfflow_core.config.converter import (
    added_field,
    apply_overrides,
    make_converter,
    read_file,
    structure,
    to_data,
)
from selfflow_core.config.presets import shrink
from selfflow_core.config.resolve import resolve_config
from selfflow_core.config.run import (
    CheckpointConfig,
    DiagnosticsConfig,
    ModalitySpec,
    OptimConfig,
    TrainerConfig,
)
from selfflow_core.config.validate import validate
from selfflow_core.data.check import check_store
from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.store import open_store
from selfflow_core.data.writer import encode_store
from selfflow_core.errors import (
    CheckpointError,
    ConfigError,
    DuplicateComponentError,
    EvaluatorCacheError,
    NonFiniteLossError,
    PluginLoadError,
    RunDirInUse,
    SelfFlowError,
    StoreError,
    UnknownComponentError,
)
from selfflow_core.eval.cached import (
    EvaluatorCache,
    default_cache_dir,
    settings_key,
    weights_sha256,
)
from selfflow_core.eval.media import SEPARATOR as TILE_SEPARATOR
from selfflow_core.eval.media import tile_images, to_uint8, upscale
from selfflow_core.eval.samples import load_for_sampling, sample_checkpoint
from selfflow_core.flow import interpolate, velocity_target
from selfflow_core.interfaces import (
    Backbone,
    BackboneConfig,
    ComponentConfig,
    FieldSpec,
    ModalityAdapter,
    ModalityConfig,
    SchedulerConfig,
    Source,
    TeacherConfig,
    TeacherStrategy,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    TextSpec,
    TimeDistribution,
    TimeDistributionConfig,
    TimestepScheduler,
    Tracker,
    TrackerConfig,
)
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.plugins.declare import modality_plugin_hooks
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.plugins.registry import PresetRegistry, Registry
from selfflow_core.prompts import empty_encoding
from selfflow_core.runtime.checkpoint import latest as latest_checkpoint
from selfflow_core.sampling import SamplingConfig, sample
from selfflow_core.teachers import EMATeacher, NoTeacher
from selfflow_core.timesteps import (
    DualTimestep,
    LogitNormal,
    PerKindTimestep,
    PlateauLogitNormal,
    SingleTimestep,
    Uniform,
)
from selfflow_core.trainer import Trainer
from selfflow_core.types import BackboneOutput, LossTerms, TimestepPlan, TokenBatch

__all__ = [
    # extend
    "Backbone", "BackboneConfig", "BackboneOutput", "ComponentConfig", "FieldSpec", "LossTerms",
    "ModalityAdapter", "ModalityConfig", "PresetRegistry", "Registry", "SchedulerConfig", "Source",
    "TeacherConfig", "TeacherStrategy", "TextEncoder", "TextEncoderConfig", "TextEncoding",
    "TextSpec", "TimeDistribution", "TimeDistributionConfig",
    "TimestepPlan", "TimestepScheduler", "TokenBatch", "Tracker", "TrackerConfig", "Components",
    "hookimpl", "make_plugin_manager", "modality_plugin_hooks",
    # compose
    "ByteTextEncoder", "CheckpointConfig", "DiagnosticsConfig", "DiT", "DualTimestep",
    "EMATeacher", "JsonlTracker", "LogitNormal", "MMDiT", "ModalitySpec", "NoTeacher",
    "NullTracker", "ObjectiveConfig", "OptimConfig",
    "PerKindTimestep", "PlateauLogitNormal", "SamplingConfig", "SelfFlowObjective",
    "SingleTimestep", "ToyModality", "TrainerConfig", "Uniform", "added_field", "apply_overrides",
    "interpolate",
    "make_converter", "read_file", "resolve_config", "shrink", "structure", "to_data", "validate",
    "velocity_target",
    # run
    "LoaderSource", "Trainer", "build_loader", "check_store", "encode_store", "latest_checkpoint",
    "load_for_sampling", "open_store", "empty_encoding", "sample", "sample_checkpoint",
    "TILE_SEPARATOR",
    "tile_images", "to_uint8", "upscale", "EvaluatorCache", "default_cache_dir", "settings_key",
    "weights_sha256",
    # errors
    "CheckpointError", "ConfigError", "DuplicateComponentError", "EvaluatorCacheError",
    "NonFiniteLossError",
    "PluginLoadError", "RunDirInUse", "SelfFlowError", "StoreError", "UnknownComponentError",
]
