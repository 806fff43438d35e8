"""selfflow-audio: the audio modality plugin for selfflow (espeak-ng spoken digits or synthetic
tones; normalised log-mel latents computed with torch, Griffin-Lim decoding to WAV; a TorchScript
codec optionally; text to speech on espeak-ng spoken words, with a fixed evaluator)."""

from selfflow_audio.adapter import AudioModality, write_spectrogram_png
from selfflow_audio.encoders import (
    AudioEncoder,
    AudioEncoderConfig,
    AudioSettings,
    CodecEncoder,
    LogMelEncoder,
)
from selfflow_audio.features import (
    griffin_lim,
    mel_filterbank,
    mel_power,
    mel_to_magnitude,
    read_wav,
    resample,
    write_wav,
)
from selfflow_audio.sources import SpokenDigitsSource, TonesSource, default_cache_dir
from selfflow_audio.words import SpokenWordsSource, parse_prompt

__all__ = [
    "AudioEncoder", "AudioEncoderConfig", "AudioModality", "AudioSettings", "CodecEncoder",
    "LogMelEncoder", "SpokenDigitsSource", "SpokenWordsSource", "TonesSource",
    "default_cache_dir", "griffin_lim", "mel_filterbank", "mel_power", "mel_to_magnitude",
    "parse_prompt", "read_wav", "resample", "write_spectrogram_png", "write_wav",
]
