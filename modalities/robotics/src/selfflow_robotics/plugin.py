"""Registers the robotics modality with selfflow (entry point ``robotics`` in group
``selfflow``)."""

from selfflow_core import modality_plugin_hooks
from selfflow_robotics.adapter import RoboticsModality
from selfflow_robotics.presets import debug_tiny, default

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [RoboticsModality.Config], {"robotics": default, "robotics_debug_tiny": debug_tiny})
