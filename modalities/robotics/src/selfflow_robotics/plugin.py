"""Registers the robotics modality with selfflow (entry point ``robotics`` in group
``selfflow``)."""

from selfflow_core import hookimpl
from selfflow_robotics.adapter import RoboticsModality


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(RoboticsModality.Config)


@hookimpl
def selfflow_register_presets(registry):
    from selfflow_robotics.presets import debug_tiny, default

    registry.add("robotics", default)
    registry.add("robotics_debug_tiny", debug_tiny)
