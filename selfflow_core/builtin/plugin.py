"""The core's own components, registered through the same hooks (and the same public API) a
third-party plugin uses. Loaded by the plugin manager after :mod:`selfflow_core` is imported."""

from selfflow_core import (
    ByteTextEncoder,
    DiT,
    DualTimestep,
    EMATeacher,
    JsonlTracker,
    LogitNormal,
    MMDiT,
    NoTeacher,
    NullTracker,
    PerKindTimestep,
    PlateauLogitNormal,
    SingleTimestep,
    ToyModality,
    Uniform,
    hookimpl,
)
from selfflow_core.builtin.presets import toy


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(ToyModality.Config)


@hookimpl
def selfflow_register_backbones(registry):
    registry.add(DiT.Config)
    registry.add(MMDiT.Config)


@hookimpl
def selfflow_register_timestep_schedulers(registry, distributions):
    registry.add(SingleTimestep.Config)
    registry.add(DualTimestep.Config)
    registry.add(PerKindTimestep.Config)
    distributions.add(Uniform.Config)
    distributions.add(LogitNormal.Config)
    distributions.add(PlateauLogitNormal.Config)


@hookimpl
def selfflow_register_text_encoders(registry):
    registry.add(ByteTextEncoder.Config)


@hookimpl
def selfflow_register_teachers(registry):
    registry.add(EMATeacher.Config)
    registry.add(NoTeacher.Config)


@hookimpl
def selfflow_register_trackers(registry):
    registry.add(JsonlTracker.Config)
    registry.add(NullTracker.Config)
    registry.set_default(JsonlTracker.Config.kind, fallback=True)  # a tracker plugin replaces it


@hookimpl
def selfflow_register_presets(registry):
    registry.add("toy", toy)
    registry.set_default("toy", fallback=True)  # a modality plugin's main job replaces it
