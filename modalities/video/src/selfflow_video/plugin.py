"""Registers the video modality with selfflow (entry point ``video`` in group ``selfflow``)."""

from selfflow_core import hookimpl
from selfflow_video.adapter import VideoModality


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(VideoModality.Config)


@hookimpl
def selfflow_register_presets(registry):
    from selfflow_video.presets import debug_tiny, default

    registry.add("video", default)
    registry.add("video_debug_tiny", debug_tiny)
