"""Tests of the selfflow-audio plugin: the core's contract kit plus audio-specific checks."""

from __future__ import annotations

import math
import shutil
import subprocess
import warnings
import wave
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from selfflow_audio import (
    AudioEncoderConfig,
    AudioModality,
    CodecEncoder,
    LogMelEncoder,
    SpokenDigitsSource,
    griffin_lim,
    mel_filterbank,
    mel_power,
    read_wav,
    resample,
    write_wav,
)
from selfflow_audio import sources as sources_module
from selfflow_audio.features import stft
from selfflow_audio.presets import debug_tiny, default

from selfflow_core import (
    Components,
    ConfigError,
    DualTimestep,
    LogitNormal,
    ModalitySpec,
    make_converter,
    structure,
    to_data,
    validate,
)
from selfflow_core.cli.main import main
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.testing import ModalityContract, ModalityPluginContract

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; scripts/setup.sh does it)")
TINY_VOICES = {"voices": ("en-us", "en+f2"), "speeds": (175,), "pitches": (50,)}


@needs_espeak
class TestSpokenDigitsContract(ModalityContract):
    config = AudioModality.Config(**TINY_VOICES)


class TestTonesContract(ModalityContract):
    config = AudioModality.Config(n_mels=40, hop=160, frames=100, frames_per_token=5, classes=0)
    source = "tones"


@pytest.fixture(scope="module")
def adapter() -> AudioModality:
    return AudioModality.Config(**TINY_VOICES).build()


# ---- config and registration ------------------------------------------------------------------

class TestAudioPlugin(ModalityPluginContract):
    """The kit's plugin checks (entry point, round trips, valid presets, debug_tiny lowers the
    loss), and what the run writes."""

    modality, distribution = "audio", "selfflow-audio"
    config_class = AudioModality.Config
    presets = ("audio",)
    train_skip = None if HAS_ESPEAK else "espeak-ng is not installed"

    def test_debug_tiny_writes_samples(self, debug_tiny_run):
        step = debug_tiny_run.config.steps
        samples = debug_tiny_run.run_dir / "samples" / f"step-{step:08d}" / "audio"
        assert len(list(samples.glob("*.wav"))) == 10 and (samples / "spectrograms.png").is_file()


def test_preset_schedules_and_widths():
    # paper App. A.2, B: mask ratio 0.5, logit-normal trainshift 1.0 (Self-Flow's audio
    # setting); a spec naming no scheduler gets it
    paper = DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0), mask_ratio=0.5)
    assert AudioModality.Config().default_scheduler() == paper
    assert ModalitySpec(modality=AudioModality.Config(), store="x.zarr").scheduler == paper
    for preset in (default(), debug_tiny()):
        spec = preset.modalities["audio"]
        assert spec.scheduler == spec.modality.default_scheduler() == paper
    # a token wider than the backbone cannot carry its noise: samples keep a noise floor
    preset = default()
    assert preset.backbone.width > preset.modalities["audio"].modality.build().token_dim


def test_config_through_the_converter():
    conv = make_converter(Components())
    data = {"kind": "audio", "n_mels": 40, "voices": ["en-us"], "speeds": [120, 180],
            "encoder": {"kind": "logmel", "griffin_lim_iters": 8}}
    cfg = structure(conv, data, ModalityConfig)
    assert cfg == AudioModality.Config(n_mels=40, voices=("en-us",), speeds=(120, 180),
                                       encoder=LogMelEncoder.Config(griffin_lim_iters=8))
    assert structure(conv, to_data(conv, cfg), ModalityConfig) == cfg
    for bad, where in (({"frames": 127}, r"\$\.frames"), ({"n_mels": 400}, "n_mels"),
                       ({"encoder": {"kind": "encodec"}}, r"\$\.encoder: unknown audio encoder"),
                       ({"encoder": {"kind": "codec"}}, r"\$\.encoder\.path: required"),
                       ({"encoder": {"kind": "codec", "path": ""}}, r"\$\.encoder\.path"),
                       ({"encoder": {"kind": "logmel", "path": "c.pt"}}, r"unknown key.*path"),
                       ({"speeds": ["fast"]}, "speeds")):
        with pytest.raises(ConfigError, match=where):
            structure(conv, {"kind": "audio", **bad}, ModalityConfig)


def test_encoder_kinds_through_the_converter(tmp_path: Path):
    """A TOML table's `kind` picks the encoder config's class; only that kind's fields are
    written back, tagged by `kind`."""
    import tomllib

    conv = make_converter(Components())
    codec = tmp_path / "codec.pt"
    doc = tomllib.loads(f"""
        [logmel]
        kind = "audio"
        encoder = {{ kind = "logmel", griffin_lim_iters = 64, log_eps = 1e-4 }}

        [codec]
        kind = "audio"
        [codec.encoder]
        kind = "codec"
        path = "{codec}"
        shift = 0.0
        scale = 1.0
    """)
    logmel = structure(conv, doc["logmel"], ModalityConfig)
    assert logmel.encoder == LogMelEncoder.Config(griffin_lim_iters=64, log_eps=1e-4)
    assert to_data(conv, logmel)["encoder"] == {"kind": "logmel", "shift": -4.0, "scale": 4.0,
                                                "log_eps": 1e-4, "griffin_lim_iters": 64}
    cfg = structure(conv, doc["codec"], ModalityConfig)
    assert cfg.encoder == CodecEncoder.Config(path=str(codec), shift=0.0, scale=1.0)
    data = to_data(conv, cfg)
    assert data["encoder"] == {"kind": "codec", "shift": 0.0, "scale": 1.0, "path": str(codec)}
    assert structure(conv, data, ModalityConfig) == cfg
    # the field's own type structures too, and the default is log-mel
    assert structure(conv, {"kind": "codec", "path": "c.pt"}, AudioEncoderConfig) == (
        CodecEncoder.Config(path="c.pt"))
    assert AudioModality.Config().encoder == LogMelEncoder.Config()
    assert structure(conv, {"kind": "audio"}, ModalityConfig).encoder == LogMelEncoder.Config()
    with pytest.raises(TypeError):
        AudioEncoderConfig()  # abstract: a concrete kind's Config is needed


def test_an_unknown_encoder_kind_lists_the_known_ones():
    conv = make_converter(Components())
    for encoder, what in (({"kind": "encodec"},
                           "unknown audio encoder 'encodec' (did you mean 'codec'?)"),
                          ({"path": "c.pt"}, "missing `kind`")):
        with pytest.raises(ConfigError) as err:
            structure(conv, {"kind": "audio", "encoder": encoder}, ModalityConfig)
        assert err.value.problems == [f"$.encoder: {what}; known: codec, logmel"]


def test_a_missing_codec_file_is_a_config_problem(tmp_path: Path):
    missing = tmp_path / "nonexistent.pt"
    spec = debug_tiny().modalities["audio"]
    modality = attrs.evolve(spec.modality, encoder=CodecEncoder.Config(path=str(missing)))
    config = attrs.evolve(debug_tiny(), modalities={"audio": attrs.evolve(spec,
                                                                          modality=modality)})
    with pytest.raises(ConfigError) as err:
        validate(config, Components())
    assert len(err.value.problems) == 1
    problem = err.value.problems[0]
    assert problem.startswith("$.modalities.audio.modality.encoder.path: ")
    assert str(missing) in problem and "Nothing is downloaded" in problem
    missing.write_bytes(b"")  # exists: no problem before it is loaded
    assert modality.problems() == []
    assert LogMelEncoder.Config().problems() == []


def test_a_missing_codec_file_on_the_command_line_is_one_error_line(capsys):
    rc = main(["train", "audio_debug_tiny", "modalities.audio.modality.encoder.kind=codec",
               "modalities.audio.modality.encoder.path=/nonexistent.pt"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: 1 problem(s) in preset 'audio_debug_tiny':"]
    assert "$.modalities.audio.modality.encoder.path" in err and "/nonexistent.pt" in err
    assert "Traceback" not in err


def test_shapes_and_normalization():
    m = AudioModality.Config().build()
    assert m.name == "audio"
    assert m.latent_shape == (128, 32) and m.clip_samples == 127 * 128
    assert m.num_tokens == 64 and m.token_dim == 2 * 32
    assert m.token_seconds == pytest.approx(2 * 128 / 16000)
    assert m.sources() == ("spoken_digits", "tones", "spoken_words", "spoken_words_heldout")
    norm = m.normalization()
    assert norm["scale"] == 4.0 and norm["shift"] == -4.0 and "log(mel_power" in norm["formula"]
    info = m.encoder_info()
    assert info["name"] == "logmel" and info["settings"]["n_mels"] == 32
    with pytest.raises(ValueError, match="spoken_digits, tones"):
        m.open_source("librispeech")


# ---- signal processing ------------------------------------------------------------------------

def test_mel_filterbank():
    fb = mel_filterbank(16000, 512, 32)
    assert fb.shape == (32, 257) and fb.dtype == torch.float32
    assert (fb >= 0).all() and (fb.max(dim=1).values > 0.5).all()  # every filter sees a bin
    centres = fb.argmax(dim=1)
    assert (centres[1:] >= centres[:-1]).all()  # ordered low to high
    assert fb[:, 0].sum() == 0  # f_min = 0: the DC bin sits on the first filter's foot


def test_log_mel_of_a_tone_peaks_in_its_band():
    sr, f = 16000, 1000.0
    x = torch.sin(2 * math.pi * f * torch.arange(8000) / sr)[None]
    mel = mel_power(x, sample_rate=sr, n_fft=512, hop=128, n_mels=32)
    assert mel.shape == (1, 8000 // 128 + 1, 32)
    band = int(mel_filterbank(sr, 512, 32)[:, round(f / (sr / 512))].argmax())
    assert int(mel[0, 10:-10].mean(0).argmax()) == band


def test_griffin_lim_recovers_a_magnitude():
    sr = 16000
    t = torch.arange(4096) / sr
    x = (torch.sin(2 * math.pi * 440 * t) + 0.5 * torch.sin(2 * math.pi * 1320 * t))[None]
    mag = stft(x, 512, 128).abs()

    def convergence(iters: int) -> float:
        y = griffin_lim(mag, n_fft=512, hop=128, length=4096, iters=iters,
                        generator=torch.Generator().manual_seed(0))
        assert y.shape == (1, 4096)
        return float((stft(y, 512, 128).abs() - mag).norm() / mag.norm())

    first, later = convergence(1), convergence(32)
    assert later < 0.2 and later < 0.5 * first, (first, later)


def test_resample_keeps_the_pitch_and_duration():
    x = np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)
    y = resample(x, 22050, 16000)
    assert y.shape == (16000,) and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(int(spectrum.argmax()) - 440) <= 1
    assert np.abs(y).max() == pytest.approx(1.0, abs=0.02)


def test_wav_roundtrip(tmp_path: Path):
    x = np.sin(np.linspace(0, 50, 1600)).astype(np.float32) * 0.5
    path = write_wav(tmp_path / "a.wav", x, 8000)
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (
            1, 2, 8000, 1600)
    y, rate = read_wav(path)
    assert rate == 8000 and np.abs(y - x).max() < 1e-4


# ---- encoders ---------------------------------------------------------------------------------

def test_logmel_encode_decode(adapter: AudioModality):
    raw = adapter.open_source("tones").read(0, 3)
    latents = torch.from_numpy(adapter.encode(raw)["latents"])
    assert latents.shape == (3, 128, 32)
    waves = adapter.decode(latents)
    assert waves.shape == (3, adapter.clip_samples)
    again = adapter.encoder.encode(waves)  # Griffin-Lim keeps the log-mel close
    assert float((again - latents).abs().mean()) < 0.3 * float(latents.std())
    assert float(torch.corrcoef(torch.stack([again.flatten(), latents.flatten()]))[0, 1]) > 0.95


def test_codec_missing_file_is_a_clear_error(tmp_path: Path):
    cfg = AudioModality.Config(encoder=CodecEncoder.Config(path=str(tmp_path / "codec.pt")))
    m = cfg.build()  # the codec is loaded lazily: building the adapter works
    with pytest.raises(FileNotFoundError, match=r"codec\.pt.*does not exist.*Nothing is "
                                                r"downloaded"):
        m.fields()
    (tmp_path / "codec.pt").write_text("not torchscript")
    with pytest.raises(ValueError, match="not a loadable TorchScript file"):
        _ = cfg.build().token_dim


class _ToyCodec(torch.nn.Module):
    """A 'codec' framing the wave into 64-sample frames of 8 averaged channels."""

    @torch.jit.export
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        b = wave.shape[0]
        n = wave.shape[1] // 64
        return wave[:, : n * 64].reshape(b, n, 8, 8).mean(-1)

    @torch.jit.export
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.repeat_interleave(8, dim=-1).reshape(latents.shape[0], -1)


def test_codec_from_a_local_torchscript_file(tmp_path: Path):
    path = tmp_path / "codec.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_ToyCodec()), str(path))
    m = AudioModality.Config(frames=129, frames_per_token=2, encoder=CodecEncoder.Config(
        path=str(path), shift=0.0, scale=1.0)).build()
    # 128 hops x 128 samples = 16384 samples = 256 codec frames of 8 channels
    assert m.latent_shape == (256, 8) and m.token_dim == 16 and m.num_tokens == 128
    out = m.encode(m.open_source("tones").read(0, 2))
    assert out["latents"].shape == (2, 256, 8)
    assert m.encoder_info()["name"] == "codec"
    assert m.frame_seconds == pytest.approx(64 / 16000)
    assert m.normalization()["formula"] == "latents = (codec.encode(wave) - shift) / scale"
    assert m.decode(torch.from_numpy(out["latents"])).shape == (2, 16384)


# ---- sources ----------------------------------------------------------------------------------

@needs_espeak
def test_spoken_digits_are_cached_and_deterministic(tmp_path: Path, monkeypatch):
    m = AudioModality.Config(cache_dir=str(tmp_path), **TINY_VOICES).build()
    src = m.open_source("spoken_digits")
    assert isinstance(src, SpokenDigitsSource) and len(src) == 20
    raw = src.read(8, 13)
    assert raw["labels"].tolist() == [8, 9, 0, 1, 2]
    assert raw["waves"].shape == (5, m.clip_samples) and raw["waves"].dtype == np.float32
    assert np.abs(raw["waves"]).max(axis=1) == pytest.approx(0.8, abs=1e-3)  # peak-normalised
    assert src.key(12) == (2, "en+f2", 175, 50)
    assert src.path(12).name == "en+f2_s175_p50_two.wav"
    cached = sorted(p.name for p in src.cache.iterdir())
    assert len(cached) == 5 and "en-us_s175_p50_eight.wav" in cached
    _, rate = read_wav(src.path(8))
    assert rate == 16000

    def no_espeak(*args, **kwargs):
        raise AssertionError("espeak-ng ran although the clip is cached")

    monkeypatch.setattr(subprocess, "run", no_espeak)
    again = m.open_source("spoken_digits").read(10, 12)
    np.testing.assert_array_equal(again["waves"], raw["waves"][2:4])


def test_spoken_digits_without_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"espeak-ng.*apt-get install espeak-ng.*setup\.sh"):
        AudioModality.Config().build().open_source("spoken_digits")


def test_tones_source():
    m = AudioModality.Config(classes=10).build()
    src = m.open_source("tones")
    raw = src.read(0, 12)
    assert raw["labels"].tolist() == [i % 10 for i in range(12)]
    np.testing.assert_array_equal(src.read(5, 6)["waves"], raw["waves"][5:6])
    # the pitch rises with the class
    peaks = [int(np.abs(np.fft.rfft(w)).argmax()) for w in raw["waves"][:10]]
    assert peaks == sorted(peaks)


# ---- samples ----------------------------------------------------------------------------------

def test_save_samples_writes_wavs_and_a_spectrogram(adapter: AudioModality, tmp_path: Path):
    out = adapter.encode(adapter.open_source("tones").read(0, 3))
    latents, labels = torch.from_numpy(out["latents"]), torch.from_numpy(out["labels"])
    paths = adapter.save_samples(latents, labels, tmp_path / "s")
    names = [p.name for p in paths]
    assert names == ["sample-000-label0.wav", "sample-001-label1.wav", "sample-002-label2.wav",
                     "spectrograms.png"]
    for p in paths[:3]:
        y, rate = read_wav(p)
        assert rate == 16000 and len(y) == adapter.clip_samples
        assert 0.85 < np.abs(y).max() <= 0.91
    with Image.open(paths[-1]) as im:
        assert im.mode == "L" and im.size[0] >= 256
    unlabelled = adapter.save_samples(latents[:1], None, tmp_path / "u")
    assert unlabelled[0].name == "sample-000.wav"
