"""The core's own components, registered through the same hooks a third-party plugin uses."""

from selfflow_core.backbone import DiT
from selfflow_core.hookspecs import hookimpl
from selfflow_core.presets import multimodal_tiny, toy
from selfflow_core.teachers import EMATeacher, NoTeacher
from selfflow_core.timesteps import DualTimestep, LogitNormal, SingleTimestep, Uniform
from selfflow_core.toy import ToyModality
from selfflow_core.trackers import JsonlTracker, NullTracker


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(ToyModality.Config)


@hookimpl
def selfflow_register_backbones(registry):
    registry.add(DiT.Config)


@hookimpl
def selfflow_register_timestep_schedulers(registry, distributions):
    registry.add(SingleTimestep.Config)
    registry.add(DualTimestep.Config)
    distributions.add(Uniform.Config)
    distributions.add(LogitNormal.Config)


@hookimpl
def selfflow_register_teachers(registry):
    registry.add(EMATeacher.Config)
    registry.add(NoTeacher.Config)


@hookimpl
def selfflow_register_trackers(registry):
    registry.add(JsonlTracker.Config)
    registry.add(NullTracker.Config)


@hookimpl
def selfflow_register_presets(registry):
    registry.add("toy", toy)
    registry.add("multimodal_tiny", multimodal_tiny)
