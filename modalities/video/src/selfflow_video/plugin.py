"""Registers the video modality with selfflow (entry point ``video`` in group ``selfflow``)."""

from selfflow_core import modality_plugin_hooks
from selfflow_video.adapter import VideoModality
from selfflow_video.presets import (
    debug_tiny,
    default,
    t2v_digits,
    t2v_digits_debug_tiny,
    t2v_two_digits,
    t2v_two_digits_debug_tiny,
)

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [VideoModality.Config], {"video": default, "video_debug_tiny": debug_tiny,
                             "t2v_digits": t2v_digits,
                             "t2v_digits_debug_tiny": t2v_digits_debug_tiny,
                             "t2v_two_digits": t2v_two_digits,
                             "t2v_two_digits_debug_tiny": t2v_two_digits_debug_tiny})
