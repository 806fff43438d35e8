"""Registers the audio modality with selfflow (entry point ``audio`` in group ``selfflow``)."""

from selfflow_audio.adapter import AudioModality
from selfflow_core import hookimpl


@hookimpl
def selfflow_register_modalities(registry):
    registry.add(AudioModality.Config)


@hookimpl
def selfflow_register_presets(registry):
    from selfflow_audio.presets import debug_tiny, default

    registry.add("audio", default)
    registry.add("audio_debug_tiny", debug_tiny)
