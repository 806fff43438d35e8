"""Audio encoders: waveforms ``[B, S]`` <-> latent frames ``[B, T, D]`` (time-major).

The modality's ``encoder`` field is an :class:`AudioEncoderConfig`; its subclass picks the
encoder by ``kind``: :class:`LogMelEncoder.Config` (``"logmel"``, the default; a normalised
log-mel spectrogram computed with ``torch.stft``, decoded by Griffin-Lim) or
:class:`CodecEncoder.Config` (``"codec"``; a neural codec exported as TorchScript to a local
file, loaded lazily with ``torch.jit.load``). In TOML, ``encoder = { kind = "codec", path =
"codec.pt" }``. Either way the stored latents are ``(features - shift) / scale``, and
:meth:`AudioEncoder.info` goes into the store's schema.
"""

from __future__ import annotations

import abc
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_audio.features import griffin_lim, mel_power, mel_to_magnitude
from selfflow_core import ComponentConfig


class AudioSettings(Protocol):
    """What an encoder takes from the modality's config (``AudioModality.Config`` has it)."""

    @property
    def sample_rate(self) -> int: ...
    @property
    def n_fft(self) -> int: ...
    @property
    def hop(self) -> int: ...
    @property
    def n_mels(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def clip_samples(self) -> int: ...


@attrs.frozen(kw_only=True)
class AudioEncoderConfig(ComponentConfig, abc.ABC):
    """Which encoder makes the latents: the base of :class:`LogMelEncoder.Config` (``kind =
    "logmel"``) and :class:`CodecEncoder.Config` (``kind = "codec"``); a subclass with another
    ``kind`` adds an encoder (a TOML table picks it by ``kind``).

    - ``shift`` / ``scale``: stored latents are ``(features - shift) / scale``. The defaults
      bring the log-mel of the spoken digits to roughly unit scale (mean ~0, std ~1; silence at
      about -0.7); set ``shift=0, scale=1`` for a codec whose latents are already normalised.
    """

    category: ClassVar[str] = "audio encoder"
    #: the un-normalised features, as written in the store's normalization formula
    features: ClassVar[str] = ""

    shift: float = -4.0
    scale: float = attrs.field(default=4.0, validator=v.gt(0))

    @abc.abstractmethod
    def build(self, *, audio: AudioSettings) -> AudioEncoder:
        """The encoder for clips of ``audio`` (the modality's config)."""

    def latent_shape(self, audio: AudioSettings) -> tuple[int, int] | None:
        """Per-clip latent shape ``(T, D)`` when the config tells it without building the
        encoder; None when only the built encoder knows (a codec)."""
        return None

    def value_range(self) -> tuple[float, float] | None:
        """A fixed latent range for spectrogram images; None: each clip's own min to max."""
        return None


class AudioEncoder(abc.ABC):
    """Maps waveforms ``[B, S]`` (``S = clip_samples``) to latents ``[B, T, D]`` and back."""

    kind: ClassVar[str] = ""

    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int]:
        """Per-clip latent shape ``(T, D)``."""

    @property
    @abc.abstractmethod
    def frame_seconds(self) -> float:
        """Seconds between latent frames."""

    @abc.abstractmethod
    def encode(self, waves: Tensor) -> Tensor:
        """Waveforms float ``[B, S]`` -> normalised latents float ``[B, T, D]``."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, T, D]`` -> waveforms float ``[B, S]``."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """``{"name", "version", "settings"}``: recorded in the schema of the stores it writes."""


class LogMelEncoder(AudioEncoder):
    """``(log(mel_power + eps) - shift) / scale`` of a centred Hann STFT; ``S = (T - 1) * hop``
    samples give exactly ``T`` frames. Decoding inverts the normalisation and the log, maps mel
    power back to linear magnitude through the filterbank's pseudo-inverse and runs Griffin-Lim."""

    kind = "logmel"

    @attrs.frozen(kw_only=True)
    class Config(AudioEncoderConfig):
        """The log-mel encoder (``kind = "logmel"``, the default); the analysis (``sample_rate``,
        ``n_fft``, ``hop``, ``n_mels``, ``frames``) is the modality's.

        - ``shift`` / ``scale``: see :class:`AudioEncoderConfig`.
        - ``log_eps``: the floor added to the mel power before the log.
        - ``griffin_lim_iters``: phase-reconstruction iterations when decoding.
        """

        kind = "logmel"
        features = "log(mel_power + log_eps)"

        log_eps: float = attrs.field(default=1e-3, validator=v.gt(0))
        griffin_lim_iters: int = attrs.field(default=32, validator=v.ge(1))

        def build(self, *, audio: AudioSettings) -> LogMelEncoder:
            return LogMelEncoder(self, sample_rate=audio.sample_rate, n_fft=audio.n_fft,
                                 hop=audio.hop, n_mels=audio.n_mels, frames=audio.frames,
                                 seed=audio.seed)

        def latent_shape(self, audio: AudioSettings) -> tuple[int, int]:
            return (audio.frames, audio.n_mels)

        def value_range(self) -> tuple[float, float]:
            """From silence up ~70 dB (16 nepers of power), in latent units."""
            floor = (math.log(self.log_eps) - self.shift) / self.scale
            return (floor, floor + 16.0 / self.scale)

    def __init__(self, cfg: Config, *, sample_rate: int, n_fft: int, hop: int,
                 n_mels: int, frames: int, seed: int = 0) -> None:
        self.cfg = cfg
        self.sample_rate, self.n_fft, self.hop = sample_rate, n_fft, hop
        self.n_mels, self.frames, self.seed = n_mels, frames, seed

    @property
    def clip_samples(self) -> int:
        return (self.frames - 1) * self.hop

    def latent_shape(self) -> tuple[int, int]:
        return (self.frames, self.n_mels)

    @property
    def frame_seconds(self) -> float:
        """``hop / sample_rate``: frame ``k`` is centred on sample ``k * hop``."""
        return self.hop / self.sample_rate

    def features(self, waves: Tensor) -> Tensor:
        """Un-normalised log-mel ``[B, T, n_mels]``."""
        mel = mel_power(waves, sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop,
                        n_mels=self.n_mels)
        return torch.log(mel + self.cfg.log_eps)

    @torch.no_grad()
    def encode(self, waves: Tensor) -> Tensor:
        return (self.features(waves) - self.cfg.shift) / self.cfg.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        log_mel = latents.float() * self.cfg.scale + self.cfg.shift
        mel = (torch.exp(log_mel.clamp(max=30.0)) - self.cfg.log_eps).clamp_min(0.0)
        magnitude = mel_to_magnitude(mel, sample_rate=self.sample_rate, n_fft=self.n_fft)
        return griffin_lim(magnitude, n_fft=self.n_fft, hop=self.hop, length=self.clip_samples,
                           iters=self.cfg.griffin_lim_iters,
                           generator=torch.Generator().manual_seed(self.seed))

    def info(self) -> dict[str, Any]:
        return {"name": "logmel", "version": "1", "settings": {
            "sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop": self.hop,
            "n_mels": self.n_mels, "frames": self.frames, "window": "hann", "center": True,
            "mel_scale": "htk", "power": 2.0, "log_eps": self.cfg.log_eps}}


def _missing_codec(path: str) -> str:
    return (f"TorchScript file {path!r} does not exist; set encoder.path to a local file saved "
            f"with torch.jit.save (a module with encode(wave [B, S]) -> [B, T, D] and "
            f"decode(latents) -> wave methods), or use encoder.kind = 'logmel'. Nothing is "
            f"downloaded.")


class CodecEncoder(AudioEncoder):
    """A neural codec from a LOCAL TorchScript file (``torch.jit.load``), loaded when built; its
    latent shape is found by encoding one silent clip."""

    kind = "codec"

    @attrs.frozen(kw_only=True)
    class Config(AudioEncoderConfig):
        """A TorchScript codec (``kind = "codec"``).

        - ``path`` (required): a local TorchScript file whose module has the methods
          ``encode(wave [B, S]) -> [B, T, D]`` and ``decode(latents [B, T, D]) -> wave [B, S]``
          (exported with ``@torch.jit.export``) at the modality's ``sample_rate``. Never
          downloaded; a missing file is a config problem, found before anything runs.
        - ``shift`` / ``scale``: see :class:`AudioEncoderConfig`.
        """

        kind = "codec"
        features = "codec.encode(wave)"

        path: str = attrs.field(validator=v.instance_of(str))

        @path.validator
        def _check_path(self, attribute: Any, value: str) -> None:
            if not value:
                raise ValueError("'path' must name a local TorchScript codec file")

        def problems(self) -> list[str]:
            if not Path(self.path).expanduser().is_file():
                return [f"path: {_missing_codec(self.path)}"]
            return []

        def build(self, *, audio: AudioSettings) -> CodecEncoder:
            return CodecEncoder(self, clip_samples=audio.clip_samples,
                                sample_rate=audio.sample_rate)

    def __init__(self, cfg: Config, *, clip_samples: int, sample_rate: int) -> None:
        self.cfg, self.clip_samples, self.sample_rate = cfg, clip_samples, sample_rate
        self.path = Path(cfg.path).expanduser()
        if not cfg.path or not self.path.is_file():
            raise FileNotFoundError(f"codec encoder: {_missing_codec(cfg.path)}")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; still works
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as exc:
            raise ValueError(f"codec encoder: {self.path} is not a loadable TorchScript file "
                             f"({exc})") from exc
        for method in ("encode", "decode"):
            if not hasattr(self.module, method):
                raise ValueError(f"codec encoder: the TorchScript module in {self.path} has no "
                                 f"`{method}` method (export it with @torch.jit.export)")
        with torch.no_grad():
            probe = self.module.encode(torch.zeros(1, clip_samples))
        if probe.dim() != 3 or probe.shape[0] != 1:
            raise ValueError(f"codec encoder: encode() must return [B, T, D], got "
                             f"{tuple(probe.shape)}")
        self._shape = (int(probe.shape[1]), int(probe.shape[2]))

    def latent_shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def frame_seconds(self) -> float:
        """The clip's duration over its latent frames."""
        return self.clip_samples / self.sample_rate / self._shape[0]

    @torch.no_grad()
    def encode(self, waves: Tensor) -> Tensor:
        return (self.module.encode(waves.float()).float() - self.cfg.shift) / self.cfg.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        wave_ = self.module.decode(latents.float() * self.cfg.scale + self.cfg.shift).float()
        return wave_.reshape(wave_.shape[0], -1)

    def info(self) -> dict[str, Any]:
        import hashlib

        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return {"name": "codec", "version": "1", "settings": {
            "path": str(self.path.resolve()), "sha256": digest, "latent_shape": list(self._shape)}}
