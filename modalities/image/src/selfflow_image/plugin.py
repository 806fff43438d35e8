"""Registers the image modality with selfflow (entry point ``image`` in group ``selfflow``)."""

from selfflow_core import hookimpl
from selfflow_image.adapter import ImageModality


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(ImageModality.Config)


@hookimpl
def selfflow_register_presets(registry):
    from selfflow_image.presets import debug_tiny, default

    registry.add("image", default)
    registry.add("image_debug_tiny", debug_tiny)
    registry.set_default("image")  # the main job: what `selfflow train` runs without a target
