"""Every selfflow hook. Registration hooks hand a typed registry to the plugin; lifecycle hooks
only observe (they may log or save files, never change the training math)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from selfflow_core.plugins.registry import PresetRegistry, Registry
    from selfflow_core.types import LossTerms

hookspec = pluggy.HookspecMarker("selfflow")
hookimpl = pluggy.HookimplMarker("selfflow")


@hookspec
def selfflow_register_modalities(registry: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.ModalityConfig` subclasses:
    ``registry.add(ImageModality.Config)``."""


@hookspec
def selfflow_register_backbones(registry: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.BackboneConfig` subclasses."""


@hookspec
def selfflow_register_timestep_schedulers(registry: Registry, distributions: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.SchedulerConfig` subclasses in ``registry`` and
    :class:`~selfflow_core.interfaces.TimeDistributionConfig` subclasses in ``distributions``."""


@hookspec
def selfflow_register_teachers(registry: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.TeacherConfig` subclasses."""


@hookspec
def selfflow_register_trackers(registry: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.TrackerConfig` subclasses."""


@hookspec
def selfflow_register_text_encoders(registry: Registry) -> None:
    """Register :class:`~selfflow_core.interfaces.TextEncoderConfig` subclasses (captions ->
    embeddings or ids for prompt-conditioned runs)."""


@hookspec
def selfflow_register_presets(registry: PresetRegistry) -> None:
    """Register preset functions returning a ``TrainerConfig``: ``registry.add("image", default)``.
    ``selfflow train NAME`` runs them."""


@hookspec
def selfflow_on_train_start(trainer: Any) -> None:
    """Called once on every rank after the trainer is built (and resumed), before step 1."""


@hookspec
def selfflow_on_step_end(trainer: Any, step: int, terms: LossTerms) -> None:
    """Called after each optimizer step and teacher update; ``terms`` are that step's losses."""


@hookspec
def selfflow_on_checkpoint(trainer: Any, step: int, path: Path) -> None:
    """Called on rank 0 after a checkpoint is fully written to ``path``."""


@hookspec
def selfflow_on_train_end(trainer: Any, step: int, reason: str) -> None:
    """Called once when training stops; ``reason`` is ``"done"``, ``"signal"`` or ``"error"``."""
