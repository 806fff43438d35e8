"""Block shuffle: the sample order for stores larger than RAM (``ShuffleConfig(kind="block")``).

A store of ``size`` samples is cut into blocks of ``block`` consecutive samples (``block_chunks``
chunks of the store's largest-sample field, so a block is whole chunks of it). Each epoch, per
store:

1. the blocks are permuted, seeded by ``(seed, store index, epoch)``, the same on every rank;
2. the samples of the permuted blocks, one after another, form the epoch's stream, which is cut
   into ``world_size`` equal, consecutive parts of ``size // world_size`` samples (the last
   ``size % world_size`` samples of the stream are left out that epoch, as the full shuffle's
   shards do), one per rank: disjoint, equal counts; a rank's part is whole blocks but for at
   most one piece of a block at each end;
3. a rank's part is read ``window_blocks`` blocks (or pieces) at a time: each such window is
   shuffled within itself, seeded by ``(seed, store index, epoch, rank, window)``.

Batches are cut from the windows one after another, epoch after epoch, exactly as from the full
shuffle's shards: the sample indices of batch ``n`` are a function of ``n`` alone, so the
loader's ``{"step", "counts"}`` state resumes it exactly. Only a pure plan lives here (NumPy,
no I/O): the loader (:mod:`selfflow_core.data.loader`) reads the blocks.
"""

from __future__ import annotations

import collections
from typing import Literal

import attrs
import numpy as np
from attrs import validators as v

_BLOCKS, _WINDOW = 4, 5  # seeded streams, apart from the loader's (permutation 0 ... caption 3)


@attrs.frozen(kw_only=True)
class ShuffleConfig:
    """How the loader orders each epoch of a store (``TrainerConfig.shuffle``).

    ``kind="full"`` (the default): a permutation of the whole store, each batch random indices.
    Fast only from RAM: stores up to ``CACHE_BYTES`` (2 GiB) are cached; a larger one reads a
    few thousand samples/s. ``kind="block"``: for stores larger than RAM; each epoch, blocks of
    ``block_chunks`` consecutive chunks (of the store's largest-sample field) are permuted and
    read ``window_blocks`` at a time as contiguous slices, and each window's samples are shuffled
    together. About one window is held in memory (``window_blocks * block_chunks`` chunks: 128 MiB
    with the default 0.5 MiB chunks); the store's RAM cache is not used. Consecutive batches of a
    window share its mix of blocks: see docs/store.md, "Which reader". The sizes are ignored by
    ``"full"``."""

    kind: Literal["full", "block"] = "full"
    block_chunks: int = attrs.field(default=1, validator=v.ge(1))
    window_blocks: int = attrs.field(default=256, validator=v.ge(1))


@attrs.frozen
class BlockPlan:
    """Which samples of one store a rank reads, batch by batch, epoch after epoch (the block
    shuffle's counterpart of the loader's full-shuffle shards: the same ``per_rank`` and
    ``batch``)."""

    size: int
    batch_size: int
    block: int           # samples per block
    window_blocks: int   # blocks (or pieces) per window
    store_index: int
    seed: int
    rank: int
    world_size: int
    _epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = attrs.field(
        factory=collections.OrderedDict, eq=False)
    _windows: dict[tuple[int, int], np.ndarray] = attrs.field(
        factory=collections.OrderedDict, eq=False)

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block)

    def pieces(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's part of ``epoch``: the store ranges ``[starts[i], stops[i])`` it reads in
        order (whole blocks but for its two ends) and the offset in the part where each window
        begins (``window_starts``, with the part's length appended)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, _BLOCKS, self.store_index, epoch])
            order = rng.permutation(self.blocks)
            starts = order * self.block
            stops = np.minimum(starts + self.block, self.size)
            ends = np.cumsum(stops - starts)  # end of each block in the epoch's stream
            lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
            first = int(np.searchsorted(ends, lo, side="right"))
            last = int(np.searchsorted(ends, hi, side="left"))  # the block holding hi - 1
            starts, stops, ends = (a[first:last + 1].copy() for a in (starts, stops, ends))
            starts[0] += lo - (ends[0] - (stops[0] - starts[0]))  # clip to [lo, hi)
            stops[-1] -= ends[-1] - hi
            lengths = np.cumsum(stops - starts)
            window_starts = np.concatenate([[0], lengths[self.window_blocks - 1::
                                                         self.window_blocks]])
            if window_starts[-1] != self.per_rank:
                window_starts = np.append(window_starts, self.per_rank)
            self._epochs[epoch] = (starts, stops, window_starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def window(self, epoch: int, number: int) -> np.ndarray:
        """The sample indices of window ``number`` of ``epoch``, shuffled."""
        key = (epoch, number)
        if key not in self._windows:
            starts, stops, _ = self.pieces(epoch)
            span = slice(number * self.window_blocks, (number + 1) * self.window_blocks)
            samples = np.concatenate([np.arange(a, b) for a, b in zip(starts[span],
                                                                       stops[span])])
            rng = np.random.default_rng([self.seed, _WINDOW, self.store_index, epoch,
                                         self.rank, number])
            self._windows[key] = samples[rng.permutation(len(samples))]
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[key]

    def batch(self, number: int) -> np.ndarray:
        """Sample indices of this rank's batch ``number`` (counted from the first epoch)."""
        out: list[np.ndarray] = []
        position, need = number * self.batch_size, self.batch_size
        while need:
            epoch, offset = divmod(position, self.per_rank)
            window_starts = self.pieces(epoch)[2]
            w = int(np.searchsorted(window_starts, offset, side="right")) - 1
            at = offset - int(window_starts[w])
            take = min(int(window_starts[w + 1]) - offset, need)
            out.append(self.window(epoch, w)[at:at + take])
            position, need = position + take, need - take
        return np.concatenate(out)
