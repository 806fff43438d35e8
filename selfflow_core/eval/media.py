"""Turning generated images and frames into pictures: float ``[-1, 1]`` -> uint8, nearest-
neighbour upscaling and tiling many images into one grid (the ``save_samples`` of image-like
modalities), its rows optionally labelled (class-conditional samples: one row per class)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["INK", "PAD", "SEPARATOR", "label_mask", "tile_images", "to_uint8", "upscale"]

#: grey value of the lines between (and around) the cells of a grid, and of the label margin:
#: light, so rows and columns stand apart from dark and mid-grey images alike
SEPARATOR = 224
#: width in pixels of those lines
PAD = 2
#: grey value of the row labels' characters (on the light margin)
INK = 0

#: a 3x5 bitmap font of what row labels may hold (class numbers), rows top to bottom
_FONT = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    "-": ("000", "000", "111", "000", "000"),
    " ": ("000", "000", "000", "000", "000"),
}


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


def label_mask(text: str | int, scale: int = 1) -> np.ndarray:
    """``text`` (digits, ``-`` and spaces: a class number) in the built-in 3x5 bitmap font, each
    font pixel ``scale x scale``, one blank font column between characters: bool
    ``[5 * scale, (4 * len - 1) * scale]``, True where the ink goes."""
    text = str(text)
    unknown = sorted(set(text) - set(_FONT))
    if unknown:
        raise ValueError(f"label {text!r}: the built-in font has no {unknown} (it draws digits, "
                         f"'-' and spaces)")
    if not text:
        return np.zeros((5 * scale, 0), dtype=bool)
    gap = np.zeros((5, 1), dtype=bool)
    parts = []
    for i, ch in enumerate(text):
        if i:
            parts.append(gap)
        parts.append(np.array([[c == "1" for c in row] for row in _FONT[ch]], dtype=bool))
    mask = np.concatenate(parts, axis=1)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def tile_images(images: np.ndarray, nrow: int, *, pad: int = PAD, pad_value: int = SEPARATOR,
                row_labels: Sequence[str | int] | None = None, ink: int = INK) -> np.ndarray:
    """Tile images ``[B, H, W, C]`` into one ``[H', W', C]`` array (of their dtype), ``nrow``
    images per row (fewer when ``B`` is smaller), row by row, with ``pad``-pixel lines of
    ``pad_value`` between and around the cells; cells past the last image stay ``pad_value``.

    ``row_labels`` (one per row, e.g. the class of each row) adds a margin of ``pad_value`` on
    the left, as wide as the longest label, where each row's label is drawn in ``ink`` with the
    built-in bitmap font (:func:`label_mask`), centred, font pixels ``max(1, H // 10)`` px wide.
    Without labels the grid is ``rows * (H + pad) + pad`` by ``cols * (W + pad) + pad``."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"tile_images takes [B, H, W, C] images, got shape {images.shape}")
    b, h, w, c = images.shape
    ncol = max(1, min(nrow, b))
    rows = max(1, math.ceil(b / ncol))
    marks, margin = [], 0
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"tile_images: {len(row_labels)} row labels for {rows} row(s)")
        scale = max(1, h // 10)
        marks = [label_mask(label, scale)[:h] for label in row_labels]
        margin = max(m.shape[1] for m in marks) + 2 * scale + pad
    grid = np.full((rows * (h + pad) + pad, margin + ncol * (w + pad) + pad, c), pad_value,
                   dtype=images.dtype)
    for i in range(b):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), margin + pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    for r, mark in enumerate(marks):
        mh, mw = mark.shape
        y = pad + r * (h + pad) + (h - mh) // 2
        x = pad + (margin - pad - mw) // 2
        grid[y:y + mh, x:x + mw][mark] = ink
    return grid
