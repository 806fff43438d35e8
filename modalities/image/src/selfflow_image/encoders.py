"""Image encoders: images in ``[-1, 1]`` (``B x C x H x W``) <-> the latents a store holds.

An encoder is chosen by :class:`EncoderConfig` (``kind`` = ``"pixel"`` or ``"diffusers_vae"``) and
built with :func:`build_encoder`. Its :meth:`~ImageEncoder.info` goes into the store's schema, so
a store records which encoder (and which settings) made its latents.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from attrs import validators as v
from torch import Tensor

ENCODER_KINDS = ("pixel", "diffusers_vae")


@attrs.frozen(kw_only=True)
class EncoderConfig:
    """Which encoder makes the latents.

    - ``kind``: one of :data:`ENCODER_KINDS`: ``"pixel"`` (identity: latents are the pixels)
      or ``"diffusers_vae"`` (a diffusers ``AutoencoderKL`` loaded from a local directory).
    - ``path``: the local checkpoint directory (``diffusers_vae`` only; nothing is downloaded).
    - ``scale``: latents are ``scale * mean(posterior)`` (``diffusers_vae`` only; SD's 0.18215).
    """

    kind: str = attrs.field(default="pixel", validator=v.instance_of(str))
    path: str = attrs.field(default="")
    scale: float = attrs.field(default=0.18215, validator=v.gt(0))

    @kind.validator
    def _check_kind(self, attribute: Any, value: str) -> None:
        # a plain message (attrs' in_ puts a tuple in its ValueError), so config errors read well
        if value not in ENCODER_KINDS:
            raise ValueError(f"'kind' must be one of {', '.join(map(repr, ENCODER_KINDS))} "
                             f"(got {value!r})")

    @path.validator
    def _check_path(self, attribute: Any, value: str) -> None:
        if self.kind == "diffusers_vae" and not value:
            raise ValueError("'path' must name a local diffusers AutoencoderKL checkpoint "
                             "directory when kind is 'diffusers_vae'")


class ImageEncoder(abc.ABC):
    """Maps images ``[B, C, H, W]`` in ``[-1, 1]`` to latents ``[B, *latent_shape]`` and back."""

    kind: ClassVar[str] = ""

    @abc.abstractmethod
    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        """Per-sample latent shape ``(C', H', W')`` for ``channels x size x size`` images."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images float ``[B, C, H, W]`` in ``[-1, 1]`` -> latents float ``[B, C', H', W']``."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C', H', W']`` -> images float ``[B, C, H, W]`` (about ``[-1, 1]``)."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """``{"name", "version", "settings"}``: recorded in the schema of the stores it writes."""


class PixelEncoder(ImageEncoder):
    """The identity: latents are the pixels in ``[-1, 1]``."""

    kind = "pixel"

    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        return (channels, size, size)

    def encode(self, images: Tensor) -> Tensor:
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float()

    def info(self) -> dict[str, Any]:
        return {"name": "pixel", "version": "1", "settings": {}}


class DiffusersVAEEncoder(ImageEncoder):
    """A diffusers ``AutoencoderKL`` from a LOCAL checkpoint directory (``local_files_only``).

    ``diffusers`` is imported only when this encoder is built. Encoding is deterministic (the
    posterior mean, times ``scale``); decoding divides by ``scale``.
    """

    kind = "diffusers_vae"

    def __init__(self, path: str | Path, scale: float = 0.18215) -> None:
        self.path = Path(path).expanduser()
        self.scale = float(scale)
        if not str(path) or not self.path.is_dir():
            raise FileNotFoundError(
                f"diffusers_vae encoder: checkpoint directory {str(path)!r} does not exist; "
                f"set encoder.path to a local diffusers AutoencoderKL directory (with "
                f"config.json and the weights). Nothing is downloaded.")
        try:
            import diffusers  # noqa: F401  (optional dependency)
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ImportError(
                f"diffusers_vae encoder: the `diffusers` package is not installed ({exc}); "
                f"install it (`pip install diffusers`, or `pip install selfflow-image[vae]`) or "
                f"use encoder.kind = 'pixel'") from exc
        self._diffusers_version = getattr(diffusers, "__version__", "?")
        self.vae = AutoencoderKL.from_pretrained(str(self.path), local_files_only=True).eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.vae.requires_grad_(False)

    def latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
        if size % self.factor:
            raise ValueError(f"diffusers_vae encoder: image size {size} is not a multiple of the "
                             f"VAE's downsampling factor {self.factor}")
        return (self.latent_channels, size // self.factor, size // self.factor)

    def _to(self, x: Tensor) -> Tensor:
        p = next(self.vae.parameters())
        if p.device != x.device:
            self.vae.to(x.device)
        return x.to(dtype=p.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        x = self._to(images)
        if x.shape[1] == 1:  # grey images through an RGB VAE
            x = x.expand(-1, 3, -1, -1)
        return (self.vae.encode(x).latent_dist.mean * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(self._to(latents) / self.scale).sample.float()

    def info(self) -> dict[str, Any]:
        config_file = self.path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return {"name": "diffusers_vae", "version": self._diffusers_version,
                "settings": {"path": str(self.path.resolve()), "scale": self.scale,
                             "latent_channels": self.latent_channels, "factor": self.factor,
                             "config": {k: v for k, v in config.items()
                                        if isinstance(v, (int, float, str, bool, list))}}}


def build_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """The encoder ``cfg`` describes (``diffusers_vae`` loads its checkpoint now)."""
    if cfg.kind == "pixel":
        return PixelEncoder()
    if cfg.kind == "diffusers_vae":
        return DiffusersVAEEncoder(cfg.path, scale=cfg.scale)
    raise ValueError(f"unknown image encoder kind {cfg.kind!r}; known: {', '.join(ENCODER_KINDS)}")
