"""Registers the image modality, its presets and the main job with selfflow (entry point
``image`` in group ``selfflow``)."""

from selfflow_core import modality_plugin_hooks
from selfflow_image.adapter import ImageModality
from selfflow_image.presets import debug_tiny, default, t2i_words, t2i_words_debug_tiny

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [ImageModality.Config], {"image": default, "image_debug_tiny": debug_tiny,
                              "t2i_words": t2i_words, "t2i_words_debug_tiny": t2i_words_debug_tiny},
    default_preset="image")  # the main job: what `selfflow train` runs without a target
