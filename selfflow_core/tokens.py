"""Helpers for writing a :class:`~selfflow_core.ModalityAdapter`: the pieces most adapters share
between their stored fields and a :class:`~selfflow_core.TokenBatch`.

- Layout: :func:`latent_fields` (the usual ``latents`` + ``labels`` store fields),
  :func:`class_labels` (the labels a batch carries, or ``None``).
- Positions: :func:`grid_positions` (coordinates of a row-major grid of tokens) and
  :func:`expand_batch` (one per-sequence tensor repeated for every sample).
- Patches: :func:`patchify` / :func:`unpatchify` cut an N-d array into non-overlapping patches
  (one token each, row-major) and put them back exactly; :func:`chunk` cuts vectors into tokens
  of a fixed width, zero-padding the last one.
- Mixed widths: :func:`pack` lays out several token kinds in one sequence (zero-padded to the
  widest, with ``channel_valid`` and one modality id per kind) and :func:`split` takes them
  apart again.

- A base class: :class:`PatchAdapter`, for the common adapter whose generated field is one array
  per sample cut into a fixed grid of patches (images, spectrograms, video tubes).

Everything here is pure tensor reshaping: no parameters, no randomness, exact round trips.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow_core.interfaces import FieldSpec, ModalityAdapter
from selfflow_core.types import TokenBatch

__all__ = [
    "Packed", "PatchAdapter", "chunk", "class_labels", "expand_batch", "grid_positions",
    "grid_shape", "latent_fields", "pack", "patchify", "split", "unpatchify",
]

Device = torch.device | str | None


# ---- fields and labels ------------------------------------------------------------------------

def latent_fields(shape: Sequence[int], *, labels: bool = True,
                  name: str = "latents") -> dict[str, FieldSpec]:
    """The common store layout: float32 ``latents`` of per-sample ``shape`` and, with
    ``labels``, an int64 scalar ``labels`` field."""
    fields = {name: FieldSpec(shape=tuple(shape), dtype="float32")}
    if labels:
        fields["labels"] = FieldSpec(shape=(), dtype="int64")
    return fields


def class_labels(fields: Mapping[str, Tensor] | None, num_classes: int, *,
                 key: str = "labels") -> Tensor | None:
    """The class labels a batch is conditioned on: ``fields[key]`` as int64 ``[B]``, or ``None``
    for an unconditional modality (``num_classes == 0``) or when ``fields`` has no labels."""
    if not num_classes or fields is None or fields.get(key) is None:
        return None
    return fields[key].long().reshape(-1)


# ---- positions ---------------------------------------------------------------------------------

def grid_positions(*sizes: int, device: Device = None) -> Tensor:
    """Float32 coordinates ``[N, P]`` of the cells of a ``sizes[0] x ... x sizes[P-1]`` grid in
    row-major order (the last axis varies fastest), ``N = prod(sizes)``.

    ``grid_positions(2, 3)`` is ``[[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]``;
    ``grid_positions(n)`` is the 1-D index ``[[0], [1], ..., [n - 1]]``."""
    if not sizes:
        raise ValueError("grid_positions needs at least one axis size")
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in sizes]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def expand_batch(x: Tensor, n: int, device: Device = None) -> Tensor:
    """``x`` (one sequence's positions, masks, ids ...) repeated for ``n`` samples: a contiguous
    ``[n, *x.shape]`` on ``device`` (``x``'s device when ``None``)."""
    return x.to(device)[None].expand(n, *x.shape).contiguous()


# ---- patches -----------------------------------------------------------------------------------

def _full_patch(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    shape, patch = tuple(shape), tuple(patch)
    if len(patch) > len(shape):
        raise ValueError(f"patch {patch} has more axes than the per-sample shape {shape}")
    full = shape[:len(shape) - len(patch)] + patch
    bad = [(s, p) for s, p in zip(shape, full) if p < 1 or s % p]
    if bad:
        raise ValueError(f"per-sample shape {shape} is not divisible by patch {full}")
    return full


def grid_shape(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """Patches along each axis of a per-sample ``shape`` (see :func:`patchify` for ``patch``)."""
    return tuple(s // p for s, p in zip(shape, _full_patch(shape, patch)))


def patchify(x: Tensor, patch: Sequence[int]) -> Tensor:
    """Cut each sample of ``x`` ``[B, *shape]`` into non-overlapping patches: ``[B, N, D]`` with
    one token per patch, ``N`` the number of patches and ``D = prod(patch)`` values each.

    ``patch`` gives the patch size of the *last* ``len(patch)`` axes; the axes before them are
    taken whole (so a channels-first image ``[B, C, H, W]`` with ``patch=(p, p)`` gives tokens of
    ``C x p x p``). Tokens are in row-major order over the grid of patches (the last axis varies
    fastest) and each token's values in row-major order over ``(*whole axes, *patch)``: for a
    video ``[B, T, C, H, W]`` with ``patch=(pt, C, p, p)`` the tokens are time-major tubes of
    ``pt x C x p x p``. Every axis must be divisible by its patch size. Inverse:
    :func:`unpatchify`."""
    shape = tuple(x.shape[1:])
    full = _full_patch(shape, patch)
    grid = tuple(s // p for s, p in zip(shape, full))
    k = len(shape)
    split_axes = [d for g, p in zip(grid, full) for d in (g, p)]
    order = [1 + 2 * i for i in range(k)] + [2 + 2 * i for i in range(k)]
    x = x.reshape(x.shape[0], *split_axes).permute(0, *order)
    return x.reshape(x.shape[0], math.prod(grid), math.prod(full))


def unpatchify(tokens: Tensor, patch: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Exact inverse of :func:`patchify`: tokens ``[B, N, D]`` -> ``[B, *shape]``, ``shape`` being
    the per-sample shape that was patchified with the same ``patch``."""
    shape = tuple(shape)
    full = _full_patch(shape, patch)
    grid = tuple(s // p for s, p in zip(shape, full))
    k = len(shape)
    b = tokens.shape[0]
    order = [a for i in range(k) for a in (1 + i, 1 + k + i)]
    return tokens.reshape(b, *grid, *full).permute(0, *order).reshape(b, *shape)


def chunk(x: Tensor, width: int) -> tuple[Tensor, list[int]]:
    """Vectors ``[B, S]`` -> tokens ``[B, ceil(S / width), width]`` of consecutive values, the
    last one zero-padded; also each token's number of real values (for :func:`pack`'s
    ``real_widths``). ``width`` >= ``S`` gives one token."""
    if width < 1:
        raise ValueError(f"chunk width must be >= 1 (got {width})")
    b, s = x.shape
    n = math.ceil(s / width)
    tokens = F.pad(x, (0, n * width - s)).reshape(b, n, width)
    return tokens, [min(width, s - j * width) for j in range(n)]


# ---- sequences of several token kinds ---------------------------------------------------------

class Packed(NamedTuple):
    """Token groups laid out in one sequence by :func:`pack`.

    - ``tokens`` [B, N, C]: the groups one after another, zero-padded along channels to ``C``.
    - ``channel_valid`` [B, N, C] bool: the channels that carry data (for
      :attr:`TokenBatch.channel_valid <selfflow_core.TokenBatch>`).
    - ``modality_ids`` [B, N] long: ``first_id + g`` for the tokens of group ``g``.
    - ``layout``: ``(tokens, width)`` of each group, what :func:`split` needs to take the
      sequence apart.
    """

    tokens: Tensor
    channel_valid: Tensor
    modality_ids: Tensor
    layout: tuple[tuple[int, int], ...]


def pack(groups: Sequence[Tensor], *, real_widths: Sequence[Sequence[int] | None] | None = None,
         width: int | None = None, first_id: int = 0) -> Packed:
    """Lay out token groups ``[B, N_g, C_g]`` (one per token kind, same ``B``, dtype and device)
    in one sequence ``[B, sum N_g, C]``, zero-padding channels to ``width`` (default: the widest
    ``C_g``). Group ``g`` gets modality id ``first_id + g``; a backbone with one projection per
    entry of the adapter's ``token_dims`` reads only the first ``C_g`` channels of its tokens.

    ``real_widths`` (optional, one entry per group) lists, per token, how many of the group's
    channels are real when fewer than ``C_g`` are (e.g. the last token of :func:`chunk`);
    ``None`` for a group means all ``C_g``. ``channel_valid`` marks exactly the real channels."""
    if not groups:
        raise ValueError("pack needs at least one token group")
    if real_widths is not None and len(real_widths) != len(groups):
        raise ValueError(f"pack: {len(real_widths)} real_widths for {len(groups)} groups")
    c = max(g.shape[-1] for g in groups) if width is None else width
    b, device = groups[0].shape[0], groups[0].device
    counts: list[int] = []
    ids: list[int] = []
    for i, g in enumerate(groups):
        n, cg = g.shape[1], g.shape[2]
        if cg > c:
            raise ValueError(f"pack: group {i} has {cg} channels, more than width {c}")
        real = None if real_widths is None else real_widths[i]
        real = [cg] * n if real is None else [int(r) for r in real]
        if len(real) != n or any(not 0 <= r <= cg for r in real):
            raise ValueError(f"pack: real_widths[{i}] must give 0..{cg} for each of {n} tokens")
        counts += real
        ids += [first_id + i] * n
    tokens = torch.cat([F.pad(g, (0, c - g.shape[-1])) for g in groups], dim=1)
    channel_valid = torch.arange(c)[None, :] < torch.tensor(counts, dtype=torch.long)[:, None]
    return Packed(tokens=tokens, channel_valid=expand_batch(channel_valid, b, device),
                  modality_ids=expand_batch(torch.tensor(ids, dtype=torch.long), b, device),
                  layout=tuple((g.shape[1], g.shape[2]) for g in groups))


def split(tokens: Tensor, layout: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Take a packed sequence ``[B, N, C]`` apart: one contiguous ``[B, N_g, C_g]`` per
    ``(N_g, C_g)`` of ``layout`` (:attr:`Packed.layout`), padded channels dropped."""
    total = sum(n for n, _ in layout)
    if tokens.shape[1] != total:
        raise ValueError(f"split: {tokens.shape[1]} tokens, the layout {tuple(layout)} has {total}")
    out, start = [], 0
    for n, c in layout:
        out.append(tokens[:, start:start + n, :c].contiguous())
        start += n
    return out


# ---- a base class ------------------------------------------------------------------------------

class PatchAdapter(ModalityAdapter):
    """A :class:`~selfflow_core.ModalityAdapter` whose generated field (``latent_field``) is one
    array per sample of :attr:`latent_shape`, cut by :func:`patchify` with :attr:`patch` into a
    fixed grid of tokens, labelled by class when ``num_classes`` is set.

    A subclass gives :attr:`latent_shape`, :attr:`patch` and, for positions with more than one
    axis, :attr:`grid`; it may override :meth:`condition_mask` (tokens given clean) and
    :meth:`prompt_tokens` (what a prompt holds before noise replaces the generated tokens). This
    base gives the token count and width, the store fields, the positions, and ``tokenize`` /
    ``detokenize`` / ``prompt``.
    """

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the generated field."""

    @property
    @abc.abstractmethod
    def patch(self) -> tuple[int, ...]:
        """The patch of one token over the last ``len(patch)`` axes (see :func:`patchify`)."""

    @property
    def grid(self) -> tuple[int, ...]:
        """The axes of the token positions (row-major); one axis of :attr:`num_tokens` by
        default."""
        return (self.num_tokens,)

    @property
    def num_tokens(self) -> int:
        return math.prod(grid_shape(self.latent_shape, self.patch))

    @property
    def token_dim(self) -> int:
        return math.prod(_full_patch(self.latent_shape, self.patch))

    def fields(self) -> Mapping[str, FieldSpec]:
        return latent_fields(self.latent_shape, name=self.latent_field)

    def positions(self, n: int, device: Device = None) -> Tensor:
        """``[n, N, len(grid)]`` float coordinates of each token on :attr:`grid`."""
        return expand_batch(grid_positions(*self.grid), n, device)

    def condition_mask(self, n: int, device: Device = None) -> Tensor | None:
        """``[n, N]`` bool: tokens given clean as conditioning; None: none are."""
        return None

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, *latent_shape]`` -> tokens ``[B, N, token_dim]``."""
        return patchify(x, self.patch)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """Exact inverse of :meth:`patchify`."""
        return unpatchify(tokens, self.patch, self.latent_shape)

    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        x = fields[self.latent_field].float()
        if tuple(x.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"{self.name}: {self.latent_field} of shape {tuple(x.shape[1:])} "
                             f"per sample; the config wants {tuple(self.latent_shape)}")
        n = x.shape[0]
        return TokenBatch.single(self.patchify(x), self.positions(n, x.device),
                                 labels=class_labels(fields, self.num_classes),
                                 condition=self.condition_mask(n, x.device))

    def detokenize(self, tokens: Tensor) -> Tensor:
        return self.unpatchify(tokens)

    def prompt_tokens(self, n: int, fields: Mapping[str, Tensor] | None = None) -> Tensor:
        """What a prompt's tokens hold: zeros (replaced by noise) unless some are conditioning."""
        return torch.zeros(n, self.num_tokens, self.token_dim)

    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        return TokenBatch.single(self.prompt_tokens(n, fields), self.positions(n),
                                 labels=class_labels(fields, self.num_classes),
                                 condition=self.condition_mask(n))


# ---- captions (prompt-conditioned modalities) -------------------------------------------------

#: the store field of each sample's captions (see :mod:`selfflow_core.prompts`)
CAPTIONS_FIELD = "captions"


def captions_spec(k: int) -> FieldSpec:
    """The ``captions`` field of ``k`` captions per sample (a variable-length UTF-8 field)."""
    return FieldSpec(shape=(k,), dtype="str")


def caption_array(captions: Iterable[Sequence[str]], k: int) -> np.ndarray:
    """Per-sample caption lists -> the ``captions`` field: an object array ``[n, k]`` of
    ``str``, each sample's first ``k`` captions, padded with ``""`` (a missing caption)."""
    rows = [list(c) for c in captions]
    out = np.full((len(rows), k), "", dtype=object)
    for i, row in enumerate(rows):
        for j, c in enumerate(row[:k]):
            if not isinstance(c, str):
                raise TypeError(f"caption {j} of sample {i} is {type(c).__name__}, not str")
            out[i, j] = c
    return out


def captions_field(raw: Mapping[str, Any], k: int, *, modality: str = "the") -> np.ndarray:
    """``raw["captions"]`` checked as the field ``[n, k]`` of ``str`` (what ``encode`` stores)."""
    if CAPTIONS_FIELD not in raw:
        raise ValueError(f"{modality} source gave no captions, but the config asks for {k} per "
                         f"sample (captions = {k}); use a source with captions or captions = 0")
    arr = np.asarray(raw[CAPTIONS_FIELD], dtype=object)
    if arr.ndim != 2 or arr.shape[1] != k:
        raise ValueError(f"captions of shape {arr.shape}; expected [n, {k}]")
    bad = [type(c).__name__ for c in arr.reshape(-1) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must be str, got {sorted(set(bad))}")
    return arr
