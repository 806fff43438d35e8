"""Registers the joint audio-video modality with selfflow (entry point ``audio_video``)."""

from selfflow_audio_video.adapter import AudioVideoModality
from selfflow_audio_video.presets import (
    debug_tiny,
    default,
    t2av_digits,
    t2av_digits_debug_tiny,
)
from selfflow_core import modality_plugin_hooks

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [AudioVideoModality.Config],
    {"audio_video": default, "audio_video_debug_tiny": debug_tiny,
     "t2av_digits": t2av_digits, "t2av_digits_debug_tiny": t2av_digits_debug_tiny})
