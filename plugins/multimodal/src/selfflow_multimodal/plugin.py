"""Registers the composite presets (entry point ``multimodal`` in group ``selfflow``)."""

from selfflow_core import hookimpl
from selfflow_multimodal.presets import multimodal_tiny


@hookimpl
def selfflow_register_presets(registry):
    registry.add("multimodal_tiny", multimodal_tiny)
