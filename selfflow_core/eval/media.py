"""Turning generated images and frames into pictures: float ``[-1, 1]`` -> uint8, nearest-
neighbour upscaling and tiling many images into one grid (the ``save_samples`` of image-like
modalities)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["SEPARATOR", "tile_images", "to_uint8", "upscale"]

#: grey value of the 1-px lines between (and around) the cells of a grid
SEPARATOR = 128


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """Float images in ``[-1, 1]`` (clipped) with channels at axis -3, ``[..., C, H, W]``
    (``[B, C, H, W]`` images, ``[B, T, C, H, W]`` clips), -> uint8 ``[..., H, W, C]``:
    ``round((x + 1) * 127.5)``."""
    x = torch.as_tensor(images).detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def upscale(images: np.ndarray, min_size: int = 64) -> np.ndarray:
    """Images ``[..., H, W, C]`` enlarged by nearest neighbour by the integer factor
    ``max(1, min_size // max(H, W))`` (so small images are at least about ``min_size`` px)."""
    h, w = images.shape[-3], images.shape[-2]
    scale = max(1, min_size // max(h, w, 1))
    if scale == 1:
        return images
    return images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def tile_images(images: np.ndarray, nrow: int, *, pad: int = 1,
                pad_value: int = SEPARATOR) -> np.ndarray:
    """Tile images ``[B, H, W, C]`` into one ``[H', W', C]`` array (of their dtype), ``nrow``
    images per row (fewer when ``B`` is smaller), row by row, with ``pad``-pixel lines of
    ``pad_value`` between and around the cells; cells past the last image stay ``pad_value``."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"tile_images takes [B, H, W, C] images, got shape {images.shape}")
    b, h, w, c = images.shape
    ncol = max(1, min(nrow, b))
    rows = max(1, math.ceil(b / ncol))
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value,
                   dtype=images.dtype)
    for i in range(b):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid
