"""Registers the robotics modalities with selfflow (entry point ``robotics`` in group
``selfflow``): the action policy ``robotics``, the world model ``robotics_world`` and the
instruction-following world model ``robotics_language``, and their presets."""

from selfflow_core import modality_plugin_hooks
from selfflow_robotics.adapter import RoboticsModality
from selfflow_robotics.language import RoboticsLanguageModality
from selfflow_robotics.presets import (
    debug_tiny,
    default,
    language,
    language_debug_tiny,
    world,
    world_debug_tiny,
)
from selfflow_robotics.world import RoboticsWorldModality

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [RoboticsModality.Config, RoboticsWorldModality.Config, RoboticsLanguageModality.Config],
    {"robotics": default, "robotics_debug_tiny": debug_tiny,
     "robotics_world": world, "robotics_world_debug_tiny": world_debug_tiny,
     "robotics_language": language, "robotics_language_debug_tiny": language_debug_tiny})
