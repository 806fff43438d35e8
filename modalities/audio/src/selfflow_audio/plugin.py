"""Registers the audio modality with selfflow (entry point ``audio`` in group ``selfflow``)."""

from selfflow_audio.adapter import AudioModality
from selfflow_audio.presets import debug_tiny, default, t2a_words, t2a_words_debug_tiny
from selfflow_core import modality_plugin_hooks

selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
    [AudioModality.Config], {"audio": default, "audio_debug_tiny": debug_tiny,
                             "t2a_words": t2a_words, "t2a_words_debug_tiny": t2a_words_debug_tiny})
