"""Image encoders: images in ``[-1, 1]`` (``B x C x H x W``) <-> the latents a store holds.

An encoder is chosen by its config, a subclass of :class:`ImageEncoderConfig` selected by
``kind`` (``PixelEncoder.Config``, ``DiffusersVAEEncoder.Config``), and built with its
``build()``. Its :meth:`~ImageEncoder.info` goes into the store's schema, so
a store records which encoder (and which settings) made its latents.
"""

from __future__ import annotations

import abc
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core import ComponentConfig


def _non_empty_path(instance: Any, attribute: Any, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("'path' must name a local diffusers AutoencoderKL checkpoint directory")


@attrs.frozen(kw_only=True)
class ImageEncoderConfig(ComponentConfig):
    """Base of the image encoders' configs: a table with a ``kind`` (``pixel``, ``diffusers_vae``
    or a subclass's own) selects the class; ``build()`` gives the :class:`ImageEncoder`."""

    category: ClassVar[str] = "image encoder"

    def fixed_latent_shape(self, channels: int, size: int) -> tuple[int, int, int] | None:
        """The per-sample latent shape when it is known without building the encoder."""
        return None

    def build(self) -> ImageEncoder:
        raise NotImplementedError


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

    @attrs.frozen(kw_only=True)
    class Config(ImageEncoderConfig):
        """Latents are the pixels themselves (no settings)."""

        kind = "pixel"

        def fixed_latent_shape(self, channels: int, size: int) -> tuple[int, int, int]:
            return (channels, size, size)

        def build(self) -> PixelEncoder:
            return PixelEncoder()

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

    @attrs.frozen(kw_only=True)
    class Config(ImageEncoderConfig):
        """- ``path``: the local checkpoint directory of a diffusers ``AutoencoderKL`` (nothing
          is downloaded).
        - ``scale``: latents are ``scale * mean(posterior)`` (SD's 0.18215)."""

        kind = "diffusers_vae"
        path: str = attrs.field(validator=_non_empty_path)
        scale: float = attrs.field(default=0.18215, validator=v.gt(0))

        def problems(self) -> list[str]:
            out = []
            if not Path(self.path).expanduser().is_dir():
                out.append(f"path: {self.path!r} is not a directory; set it to a local "
                           f"diffusers AutoencoderKL checkpoint (config.json and the weights). "
                           f"Nothing is downloaded.")
            if importlib.util.find_spec("diffusers") is None:
                out.append("kind: the `diffusers` package is not installed (`pip install "
                           "diffusers`, or `pip install selfflow-image[vae]`); or use kind "
                           "= 'pixel'")
            return out

        def build(self) -> DiffusersVAEEncoder:
            return DiffusersVAEEncoder(self.path, scale=self.scale)

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
