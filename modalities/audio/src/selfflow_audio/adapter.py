"""The audio modality: waveforms -> latent frames ``[T, D]`` -> tokens of a few frames each.

Offline, a source (:mod:`selfflow_audio.sources`) yields fixed-length mono clips; the encoder
(normalised log-mel by default, a TorchScript codec optionally) turns them into the ``latents``
field, time-major. Online, :meth:`AudioModality.tokenize` groups ``frames_per_token``
consecutive frames into one token (``C = frames_per_token x D``) with a 1-D position (the token's
index along time). Samples are decoded (Griffin-Lim for log-mel) and written as WAV files.

Text to speech: with ``captions = K`` the ``spoken_words`` source's captions (``the word
"cat"``, ``"seven" said slowly by a low voice``, ...) are stored beside the latents, and a fixed
evaluator (:mod:`selfflow_audio.evaluator`) measures prompt following.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_audio.encoders import AudioEncoder, AudioEncoderConfig, LogMelEncoder
from selfflow_audio.features import write_wav
from selfflow_audio.sources import (
    DEFAULT_PITCHES,
    DEFAULT_SPEEDS,
    DEFAULT_VOICES,
    SpokenDigitsSource,
    TonesSource,
)
from selfflow_audio.words import VOCABULARY, SpokenWordsSource
from selfflow_core import (
    DualTimestep,
    FieldSpec,
    LogitNormal,
    ModalityConfig,
    Source,
    tile_images,
)
from selfflow_core.tokens import (
    CAPTIONS_FIELD,
    PatchAdapter,
    captions_field,
    captions_spec,
)

SOURCES = ("spoken_digits", "tones", "spoken_words", "spoken_words_heldout")
#: the sources with captions (text to speech)
CAPTIONED_SOURCES = ("spoken_words", "spoken_words_heldout")


def slug(text: str, limit: int = 48) -> str:
    """``text`` as a file-name part: lower-case letters, digits and single dashes."""
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(p for p in out.split("-") if p)[:limit] or "empty"


def _tuple_of(kind: type):
    return attrs.field(converter=tuple, validator=v.deep_iterable(v.instance_of(kind)))


def write_spectrogram_png(latents: Tensor, path: Path, *, min_height: int = 64,
                          min_width: int = 256,
                          value_range: tuple[float, float] | None = None) -> Path:
    """Latent frames ``[B, T, D]`` as one grey PNG: a near-square grid of clips, time to the
    right, low channels at the bottom, upscaled (nearest) to at least ``min_width x
    min_height``; 2-px light lines between clips. Values map linearly from ``value_range`` to
    black..white (clipped); ``None`` scales each clip from its own min to max."""
    from PIL import Image

    x = latents.detach().float().cpu()
    b, t, d = x.shape
    sy, sx = max(1, min_height // max(d, 1)), max(1, min_width // max(t, 1))
    h, w = d * sy, t * sx
    cells = np.empty((b, h, w, 1), np.uint8)
    for i, clip in enumerate(x):
        lo, hi = value_range or (float(clip.min()), float(clip.max()))
        clip = clip.clamp(lo, hi)
        img = ((clip - lo) / max(hi - lo, 1e-6) * 255).round().to(torch.uint8).T.flip(0).numpy()
        cells[i, ..., 0] = img.repeat(sy, axis=0).repeat(sx, axis=1)
    ncol = max(1, math.ceil(math.sqrt(max(b, 1) * h / w)))
    Image.fromarray(tile_images(cells, ncol)[..., 0]).save(path)
    return path


class AudioModality(PatchAdapter):
    """Fixed-length clips as tokens of ``frames_per_token`` latent frames, 1-D positions."""

    name = "audio"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """- ``sample_rate``, ``n_fft``, ``hop``, ``n_mels``: the log-mel analysis.
        - ``frames``: latent frames per clip; a clip is ``(frames - 1) * hop`` samples (128
          frames at hop 128: 16 256 samples, ~1.02 s at 16 kHz). Longer audio is cropped,
          shorter padded with silence.
        - ``frames_per_token``: frames per token; the latent frames (``frames`` for log-mel,
          the codec's own count for a codec) must be a multiple of it. Keep the token width
          (``frames_per_token x D``) well below the backbone's width.
        - ``classes``: class labels (0: unconditional); the null class is ``classes``.
        - ``encoder``: an :class:`~selfflow_audio.encoders.AudioEncoderConfig`, picked by its
          ``kind``: :class:`~selfflow_audio.encoders.LogMelEncoder.Config` (``"logmel"``, the
          default) or :class:`~selfflow_audio.encoders.CodecEncoder.Config` (``"codec"``).
        - ``voices`` / ``speeds`` / ``pitches``: the espeak-ng variants of ``spoken_digits``.
        - ``cache_dir``: where generated WAVs are cached (``""``: ``$SELFFLOW_CACHE`` or
          ``~/.cache/selfflow``).
        - ``count`` / ``seed``: clips and seed of the ``tones`` and ``spoken_words*`` sources.
        - ``captions``: captions stored per clip (0: none, the class-conditional layout); > 0
          needs a source with captions (``spoken_words``, ``spoken_words_heldout``).
        """

        kind = "audio"
        sample_rate: int = attrs.field(default=16000, validator=v.ge(1))
        n_fft: int = attrs.field(default=512, validator=v.ge(4))
        hop: int = attrs.field(default=128, validator=v.ge(1))
        n_mels: int = attrs.field(default=32, validator=v.ge(1))
        frames: int = attrs.field(default=128, validator=v.ge(2))
        frames_per_token: int = attrs.field(default=2, validator=v.ge(1))
        classes: int = attrs.field(default=10, validator=v.ge(0))
        encoder: AudioEncoderConfig = attrs.field(factory=LogMelEncoder.Config,
                                                  validator=v.instance_of(AudioEncoderConfig))
        voices: tuple[str, ...] = _tuple_of(str)
        speeds: tuple[int, ...] = _tuple_of(int)
        pitches: tuple[int, ...] = _tuple_of(int)
        cache_dir: str = ""
        count: int = attrs.field(default=1000, validator=v.ge(1))
        seed: int = 0
        captions: int = attrs.field(default=0, validator=v.ge(0))

        @voices.default
        def _voices(self) -> tuple[str, ...]:
            return DEFAULT_VOICES

        @speeds.default
        def _speeds(self) -> tuple[int, ...]:
            return DEFAULT_SPEEDS

        @pitches.default
        def _pitches(self) -> tuple[int, ...]:
            return DEFAULT_PITCHES

        @frames.validator
        def _check_frames(self, attribute: Any, value: int) -> None:
            # the latent frames when the config tells them (log-mel: `frames`); a codec sets
            # its own count, checked when it is built
            encoder = getattr(self, "encoder", None)
            shape = (encoder.latent_shape(self) if isinstance(encoder, AudioEncoderConfig)
                     else (value,))
            if shape is not None and shape[0] % self.frames_per_token:
                raise ValueError(f"'frames' must be a multiple of frames_per_token "
                                 f"{self.frames_per_token} (got {value})")

        @n_mels.validator
        def _check_n_mels(self, attribute: Any, value: int) -> None:
            if value > self.n_fft // 2 + 1:
                raise ValueError(f"'n_mels' must be <= n_fft // 2 + 1 = {self.n_fft // 2 + 1} "
                                 f"(got {value})")

        @property
        def clip_samples(self) -> int:
            return (self.frames - 1) * self.hop

        def problems(self) -> list[str]:
            return [f"encoder.{p}" for p in self.encoder.problems()]

        def default_scheduler(self) -> DualTimestep.Config:
            """Paper App. A.2, B (T2A): mask ratio 0.5 (the best of its sweep, Tab. 5),
            logit-normal p(t) with trainshift 1.0 (Self-Flow's audio setting; the baselines'
            is 0.75)."""
            return DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0),
                                       mask_ratio=0.5)

        def build(self) -> AudioModality:
            return AudioModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self._encoder: AudioEncoder | None = None

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def encoder(self) -> AudioEncoder:
        """The configured encoder, built on first use (a codec loads only when needed)."""
        if self._encoder is None:
            self._encoder = self.config.encoder.build(audio=self.config)
        return self._encoder

    @property
    def clip_samples(self) -> int:
        """Samples per clip: ``(frames - 1) * hop``."""
        return self.config.clip_samples

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(T, D)``: frames and channels per frame."""
        c = self.config
        known = c.encoder.latent_shape(c)  # log-mel: (frames, n_mels), without building
        if known is not None:
            return known
        shape = self.encoder.latent_shape()
        if shape[0] % c.frames_per_token:
            raise ValueError(f"audio: {c.encoder.kind} latents have {shape[0]} frames, not a "
                             f"multiple of frames_per_token {c.frames_per_token}")
        return shape

    @property
    def patch(self) -> tuple[int, int]:
        """``frames_per_token`` consecutive frames of all channels per token (frame-major)."""
        return (self.config.frames_per_token, self.latent_shape[1])

    @property
    def frame_seconds(self) -> float:
        """Seconds between latent frames: ``hop / sample_rate`` for log-mel (frame ``k`` is
        centred on sample ``k * hop``), the clip's duration over its frames for a codec."""
        _ = self.latent_shape  # a codec's frame count is checked first
        return self.encoder.frame_seconds

    @property
    def token_seconds(self) -> float:
        """Seconds of audio one token spans (``frames_per_token`` frames)."""
        return self.config.frames_per_token * self.frame_seconds

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def encoder_info(self) -> Mapping[str, Any]:
        info = dict(self.encoder.info())
        info["settings"] = {**info.get("settings", {}), "clip_samples": self.clip_samples}
        return info

    def normalization(self) -> Mapping[str, Any]:
        e = self.config.encoder
        return {"scale": e.scale, "shift": e.shift,
                "formula": f"latents = ({e.features} - shift) / scale"}

    # ---- offline ------------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return SOURCES

    def fields(self) -> Mapping[str, FieldSpec]:
        """``latents`` and ``labels``; with ``captions`` > 0 also ``captions`` (``[K]`` str)."""
        fields = dict(super().fields())
        if self.config.captions:
            fields[CAPTIONS_FIELD] = captions_spec(self.config.captions)
        return fields

    def open_source(self, source: str) -> Source:
        c = self.config
        if c.captions and source in SOURCES and source not in CAPTIONED_SOURCES:
            raise ValueError(f"audio source {source!r} has no captions, but captions = "
                             f"{c.captions}; use {' or '.join(map(repr, CAPTIONED_SOURCES))}, "
                             f"or captions = 0")
        if source in CAPTIONED_SOURCES:
            if c.classes and c.classes < len(VOCABULARY):
                raise ValueError(
                    f"audio source {source!r} labels each clip with its word's index in the "
                    f"vocabulary ({len(VOCABULARY)} classes) but classes={c.classes}; set "
                    f"classes = 0 (prompt-conditioned or unconditional) or {len(VOCABULARY)}")
            return SpokenWordsSource("train" if source == "spoken_words" else "heldout",
                                     count=c.count, samples=c.clip_samples,
                                     sample_rate=c.sample_rate, seed=c.seed,
                                     captions=c.captions, cache_dir=c.cache_dir or None)
        if source in SOURCES and c.classes and c.classes < 10:
            raise ValueError(f"audio source {source!r} has 10 classes but classes={c.classes}")
        if source == "spoken_digits":
            return SpokenDigitsSource(samples=c.clip_samples, sample_rate=c.sample_rate,
                                      voices=c.voices, speeds=c.speeds, pitches=c.pitches,
                                      cache_dir=c.cache_dir or None)
        if source == "tones":
            return TonesSource(count=c.count, samples=c.clip_samples, sample_rate=c.sample_rate,
                               seed=c.seed)
        raise ValueError(f"audio modality: unknown source {source!r}; built-in sources: "
                         f"{', '.join(SOURCES)}")

    def fit(self, waves: np.ndarray | Tensor) -> Tensor:
        """Waveforms ``[B, S']`` -> ``[B, clip_samples]`` (cropped or padded with silence)."""
        x = torch.as_tensor(np.asarray(waves, dtype=np.float32))
        if x.dim() != 2:
            raise ValueError(f"audio: waves must be [B, samples], got {tuple(x.shape)}")
        s = self.clip_samples
        return torch.nn.functional.pad(x, (0, max(0, s - x.shape[1])))[:, :s]

    def encode(self, raw: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        latents = self.encoder.encode(self.fit(raw["waves"]))
        out = {"latents": latents.float().cpu().numpy().astype(np.float32, copy=False),
               "labels": np.asarray(raw["labels"], dtype=np.int64)}
        if self.config.captions:  # passed through as they are; tokenize ignores them
            out[CAPTIONS_FIELD] = captions_field(raw, self.config.captions, modality="audio")
        return out

    # ---- prompt-following evaluation -------------------------------------------------------

    def evaluator_config(self):
        """The :class:`~selfflow_audio.evaluator.ClassifierConfig` of this config's latents."""
        from selfflow_audio.evaluator import ClassifierConfig

        return ClassifierConfig.for_audio(self.config)

    def evaluation_prompts(self, n: int) -> list[str]:
        """With captions: ``n`` prompts of the held-out ``(word, pitch, speed)`` triples (never
        spoken by ``spoken_words``; see :mod:`selfflow_audio.words`), each naming both
        attributes: ``"seven" said slowly by a low voice``, ... Meaningful for runs trained on
        ``spoken_words``; other captioned runs pass their own prompts to ``selfflow evaluate
        --prompt``."""
        if not self.config.captions:
            return []
        from selfflow_audio.words import evaluation_prompts

        return evaluation_prompts(n)

    def prompt_metrics(self, latents: Tensor, prompts, evaluator=None) -> dict[str, float]:
        """The fixed evaluator (:mod:`selfflow_audio.evaluator`: a word classifier over the
        latents, a pitch discriminant and a duration measure, fitted once on real clips and
        cached with their SHA-256) on the generated latents against each prompt:
        ``word_acc`` (the word heard is the quoted one) and, over the prompts naming them,
        ``pitch_acc`` (low / high) and ``speed_acc`` (slow / fast). ``evaluator``: a
        :class:`~selfflow_audio.evaluator.Classifier` to score with (default: the one of
        :meth:`evaluator_config`)."""
        from selfflow_audio.evaluator import classifier_for, prompt_scores

        classifier = evaluator or classifier_for(self.evaluator_config())
        scores = prompt_scores(latents, list(prompts), classifier)
        return {k: v for k, v in scores.items() if not k.endswith("_count")}

    # ---- samples ------------------------------------------------------------------------------

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, T, D]`` -> waveforms ``[B, clip_samples]`` (Griffin-Lim for log-mel)."""
        return self.encoder.decode(latents.detach().float().cpu())

    def write_wavs(self, latents: Tensor, labels: Tensor | None, out_dir: Path,
                   stem: str = "sample", *, names: list[str] | None = None) -> list[Path]:
        """Decode and write ``<stem>-<i>[-label<k>].wav`` per clip (or ``names[i]``),
        peak-normalised to 0.9 (a silent clip stays silent)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        waves = self.decode(latents)
        paths = []
        lab = None if labels is None else labels.detach().cpu().reshape(-1).tolist()
        for i, w in enumerate(waves):
            peak = float(w.abs().max())
            w = w * (0.9 / peak) if peak > 1e-6 else w
            name = (names[i] if names is not None else
                    f"{stem}-{i:03d}" + (f"-label{lab[i]}" if lab is not None else "") + ".wav")
            paths.append(write_wav(out_dir / name, w, self.config.sample_rate))
        return paths

    def save_prompt_samples(self, latents: Tensor, labels: Tensor | None, prompts,
                            out_dir: Path) -> list[Path]:
        """One WAV per clip named after its prompt (``000-the-word-cat.wav``) and
        ``spectrograms.png`` (as :meth:`save_samples`); the core adds ``prompts.json``."""
        names = [f"{i:03d}-{slug(p)}.wav" for i, p in enumerate(prompts)]
        paths = self.write_wavs(latents, None, out_dir, names=names)
        paths.append(write_spectrogram_png(latents, Path(out_dir) / "spectrograms.png",
                                           value_range=self.config.encoder.value_range()))
        return paths

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """One WAV per clip (``sample-000-label3.wav`` ...) and ``spectrograms.png`` (the
        latents, one panel per clip; log-mel on a fixed ~70 dB scale from silence up)."""
        out_dir = Path(out_dir)
        paths = self.write_wavs(latents, labels, out_dir)
        paths.append(write_spectrogram_png(latents, out_dir / "spectrograms.png",
                                           value_range=self.config.encoder.value_range()))
        return paths
