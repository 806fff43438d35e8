"""Registers the joint audio-video modality with selfflow (entry point ``audio_video``)."""

from selfflow_audio_video.adapter import AudioVideoModality
from selfflow_core import hookimpl


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(AudioVideoModality.Config)


@hookimpl
def selfflow_register_presets(registry):
    from selfflow_audio_video.presets import debug_tiny, default

    registry.add("audio_video", default)
    registry.add("audio_video_debug_tiny", debug_tiny)
