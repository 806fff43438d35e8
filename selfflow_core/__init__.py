"""selfflow: Self-Flow (self-supervised flow matching) on a small, pluggable core.

The public names are importable from here; heavier modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from selfflow_core.hookspecs import hookimpl
from selfflow_core.plugins import Components, make_plugin_manager

_MODULES = {
    'selfflow_core.backbone': ('DiT',),
    'selfflow_core.config': ('ConfigError',),
    'selfflow_core.data': ('build_loader',),
    'selfflow_core.interfaces': (
        'Backbone', 'ModalityAdapter', 'TeacherStrategy', 'TimestepScheduler', 'Tracker'),
    'selfflow_core.objective': ('ObjectiveConfig', 'SelfFlowObjective'),
    'selfflow_core.sampling': ('SamplingConfig', 'sample'),
    'selfflow_core.store': ('encode_store', 'open_store'),
    'selfflow_core.teachers': ('EMATeacher', 'NoTeacher'),
    'selfflow_core.timesteps': ('DualTimestep', 'LogitNormal', 'SingleTimestep', 'Uniform'),
    'selfflow_core.trainer': ('Trainer',),
    'selfflow_core.trainer_config': (
        'CheckpointConfig', 'ModalitySpec', 'OptimConfig', 'TrainerConfig'),
    'selfflow_core.types': ('LossTerms', 'TimestepPlan', 'TokenBatch'),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    'Components', 'hookimpl', 'make_plugin_manager', 'Backbone', 'CheckpointConfig', 'ConfigError',
    'DiT', 'DualTimestep', 'EMATeacher', 'LogitNormal', 'LossTerms', 'ModalityAdapter',
    'ModalitySpec', 'NoTeacher', 'ObjectiveConfig', 'OptimConfig', 'SamplingConfig',
    'SelfFlowObjective', 'SingleTimestep', 'TeacherStrategy', 'TimestepPlan', 'TimestepScheduler',
    'TokenBatch', 'Tracker', 'Trainer', 'TrainerConfig', 'Uniform', 'build_loader', 'encode_store',
    'open_store', 'sample',
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'selfflow_core' has no attribute {name!r}")


if TYPE_CHECKING:
    from selfflow_core.backbone import DiT
    from selfflow_core.config import ConfigError
    from selfflow_core.data import build_loader
    from selfflow_core.interfaces import (
        Backbone,
        ModalityAdapter,
        TeacherStrategy,
        TimestepScheduler,
        Tracker,
    )
    from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
    from selfflow_core.sampling import SamplingConfig, sample
    from selfflow_core.store import encode_store, open_store
    from selfflow_core.teachers import EMATeacher, NoTeacher
    from selfflow_core.timesteps import DualTimestep, LogitNormal, SingleTimestep, Uniform
    from selfflow_core.trainer import Trainer
    from selfflow_core.trainer_config import (
        CheckpointConfig,
        ModalitySpec,
        OptimConfig,
        TrainerConfig,
    )
    from selfflow_core.types import LossTerms, TimestepPlan, TokenBatch
