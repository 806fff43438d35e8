"""Stores written in a random order (``shuffle_on_write``): the block-shuffle reader then mixes a
store that its source gives sorted (by class, by recording, by file) as well as a full shuffle.

:class:`ShuffledWrite` wraps a modality adapter: its sources yield sample ``perm[j]`` of the raw
source as sample ``j``, ``perm`` a permutation drawn from the seed alone, and its
``encoder_info()`` records the order (``write_order``), so a store written in another order is a
different configuration and is refused, not resumed. Everything else is the adapter's, so the
writer, its resume, repair and the encode in ranges work unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write_permutation(n: int, seed: int) -> np.ndarray:
    """The order a store of ``n`` samples is written in: sample ``j`` of the store is sample
    ``write_permutation(n, seed)[j]`` of the source."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED])).permutation(n)


class PermutedSource:
    """A raw source read in the order ``perm``: ``read(start, stop)`` gathers source samples
    ``perm[start:stop]``, reading each contiguous run of them once."""

    def __init__(self, raw: Any, seed: int) -> None:
        self.raw, self.seed = raw, int(seed)
        self.perm = write_permutation(len(raw), seed)
        self.description = (f"{raw.description}, written in a random order (seed {seed})"
                            if getattr(raw, "description", "") else
                            f"written in a random order (seed {seed})")

    def __len__(self) -> int:
        return len(self.raw)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        wanted = self.perm[start:stop]
        order = np.argsort(wanted, kind="stable")
        ids = wanted[order]
        # contiguous runs of the sorted indices: one source read each
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        parts = [self.raw.read(int(r[0]), int(r[-1]) + 1) for r in np.split(ids, cuts) if len(r)]
        joined = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return {k: v[back] for k, v in joined.items()}


class ShuffledWrite:
    """``adapter`` whose sources are written in the random order of ``seed``."""

    def __init__(self, adapter: Any, seed: int) -> None:
        self.adapter, self.seed = adapter, int(seed)

    def __getattr__(self, name: str) -> Any:
        if name in ("adapter", "seed"):  # not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.adapter, name)

    def open_source(self, source: str) -> PermutedSource:
        return PermutedSource(self.adapter.open_source(source), self.seed)

    def encoder_info(self) -> dict:
        return {**dict(self.adapter.encoder_info()),
                "write_order": {"kind": "shuffled", "seed": self.seed}}
