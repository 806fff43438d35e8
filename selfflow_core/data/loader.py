"""The resumable training data pipeline (``torchdata.nodes``): stores -> token batches, forever.

Per store, every epoch is a fresh permutation seeded by ``(seed, store index, epoch)``, cut into
``world_size`` equal shards (the last ``len % world_size`` samples of the permutation are left out
that epoch, so ranks get equal counts). Each rank's shards, epoch after epoch, form one stream
that is cut into batches, so a batch may hold the end of one epoch and the start of the next.
With several stores, a mixing draw seeded by ``(seed, group number)`` picks the store of each
group of ``group`` consecutive batches (the trainer's ``grad_accum`` micro-batches of one optimizer
step: paper App. D holds one modality per batch); the draw is the same on every rank, so all ranks
see the same modality at each step.

Stores holding ``<name>_mean`` / ``<name>_std`` get ``<name>`` drawn by :func:`sample_posterior`
with noise seeded by ``(seed, rank, step)``; stores holding ``captions`` (prompt-conditioned
runs) get one caption per sample drawn the same way (:mod:`selfflow_core.prompts`).

``shuffle=ShuffleConfig(kind="block")`` (stores larger than RAM) replaces the per-epoch
permutation by a block shuffle (:mod:`selfflow_core.data.blocks`): permuted chunk-aligned blocks,
split across ranks the same way, shuffled within windows of ``window_blocks`` blocks, each block
read whole, once per epoch; only about the current window is held in memory.

The pipeline's whole state is ``{"step", "counts"}`` (batches given overall and per store) plus
what checks that a state fits the loader: plain ints, floats, lists and dicts, safe for JSON and
``torch.save(weights_only=True)``.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import google_crc32c
import numpy as np
import torch
import zarr
from attrs import validators as v
from torch import Tensor
from torchdata.nodes import BaseNode, Loader, Mapper, ParallelMapper, Prefetcher
from zarr.codecs import BytesCodec, Crc32cCodec

from selfflow_core.data.blocks import BlockPlan, ShuffleConfig
from selfflow_core.data.check import (
    is_text,
    nonfinite_problem,
    parse_shard_index,
    shard_index_layout,
)
from selfflow_core.data.store import TEXT_BYTES, LatentStore, StoreError
from selfflow_core.interfaces import TextEncoder
from selfflow_core.prompts import (
    TEXT_EMBEDDINGS,
    caption_fields,
    choose_caption_indices,
    stored_encoding,
    with_text,
)
from selfflow_core.types import TokenBatch

STATE_VERSION = 1
#: what a state saved before a key existed had
LEGACY_IDENTITY: dict[str, Any] = {"group": 1, "shuffle": "full"}
_PERMUTATION, _MIXING, _POSTERIOR, _CAPTION = 0, 1, 2, 3  # keep the seeded streams apart
_PAGE = 4096


def sample_posterior(fields: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """For every pair ``<name>_mean`` / ``<name>_std`` (a stored Gaussian posterior), add
    ``<name> = mean + std * noise`` (float32; noise from ``generator``). Other fields pass as is."""
    out = dict(fields)
    for key in fields:
        if key.endswith("_mean") and (std_key := key[: -len("_mean")] + "_std") in fields:
            mean, std = fields[key].float(), fields[std_key].float()
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            out[key[: -len("_mean")]] = mean + std * noise
    return out


def _has_posterior(fields: Sequence[str]) -> bool:
    return any(k.endswith("_mean") and k[: -len("_mean")] + "_std" in fields for k in fields)


@attrs.frozen(kw_only=True)
class LoaderSource:
    """One store in the mix: how to tokenize its batches, its batch size and mixing weight."""

    store: LatentStore
    tokenize: Callable[[dict[str, Tensor]], TokenBatch]
    batch_size: int = attrs.field(validator=v.ge(1))
    probability: float = attrs.field(default=1.0, validator=v.gt(0.0))
    #: the run's text encoder (prompt-conditioned runs): one of each sample's stored captions,
    #: drawn per step, becomes the batch's text (:mod:`selfflow_core.prompts`)
    text: TextEncoder | None = None


@attrs.frozen
class _Shards:
    """Which samples of one store a rank reads, batch by batch, epoch after epoch."""

    size: int
    batch_size: int
    store_index: int
    seed: int
    rank: int
    world_size: int
    _cache: dict[int, np.ndarray] = attrs.field(factory=collections.OrderedDict, eq=False)

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's samples of ``epoch``, in order."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, _PERMUTATION, self.store_index, epoch])
            perm = rng.permutation(self.size)[: self.per_rank * self.world_size]
            self._cache[epoch] = perm[self.rank:: self.world_size]
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def batch(self, number: int) -> np.ndarray:
        """Sample indices of this rank's batch ``number`` (counted from the first epoch)."""
        out, position = [], number * self.batch_size
        while sum(map(len, out)) < self.batch_size:
            epoch, offset = divmod(position, self.per_rank)
            take = min(self.per_rank - offset, self.batch_size - sum(map(len, out)))
            out.append(self.shard(epoch)[offset: offset + take])
            position += take
        return np.concatenate(out)


def block_samples(store: LatentStore, block_chunks: int) -> int:
    """Samples per block of the block shuffle: ``block_chunks`` chunks (as the zarr array has
    them) of the store's field with the largest samples (a text field counting
    :data:`~selfflow_core.data.store.TEXT_BYTES` per string), so each block of that field is
    whole chunks."""
    def sample_bytes(name: str) -> int:
        spec = store.fields[name]
        itemsize = TEXT_BYTES if is_text(spec.dtype) else np.dtype(spec.dtype).itemsize
        return itemsize * math.prod(spec.shape)
    largest = max(store.fields, key=sample_bytes)  # the first of equals, in schema order
    return int(store._arrays[largest].chunks[0]) * block_chunks


def _all_finite(values: np.ndarray) -> bool:
    """No NaN/Inf in ``values`` (float16 by its exponent bits: NumPy's isfinite is slow on it)."""
    if values.dtype == np.float16:  # NaN/Inf: all exponent bits set
        return not values.size or int((values.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return values.dtype.kind not in "fc" or bool(np.isfinite(values).all())


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty``, a numeric array's data starting on a page boundary. The block reader's
    chunk reads and gathers are much faster into such arrays than into NumPy's own, which
    start part-way into a page: the uncached block-shuffle pipeline reached 55% of memmap with
    them and 38% without, in the same benchmark (benchmarks/RESULTS.md, "Stores larger than
    RAM")."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        return np.empty(shape, dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + _PAGE, np.uint8)
    start = -raw.ctypes.data % _PAGE
    return raw[start:start + size].view(dtype).reshape(shape)


class _ChunkFiles:
    """One field of a local store read straight from its chunk files (the block shuffle): through
    zarr, a 0.5 MiB chunk cost 0.7-1.6 ms of CPU on a shared 2-core machine (event loop and
    thread hand-offs, indexing), 6-13x reading its file into memory and checking its CRC-32C
    (benchmarks/RESULTS.md, "Stores larger than RAM"). Only for the layout the store writer
    makes uncompressed (``compressor="none"``): zarr v3, chunked along samples only, codecs
    ``bytes`` (native byte order) then ``crc32c``, a numeric dtype; any other field is read
    through zarr. A sharded field with those inner codecs is read the same way, chunk by chunk
    from its shard files, found by the shard's index (read once per shard and checked against
    its CRC-32C). A chunk whose file is missing, has another size, fails its checksum or holds
    NaN/Inf is read through zarr too, which names the damage (a :class:`StoreError`), as the
    store's own reads do, or the caller the samples holding NaN/Inf."""

    #: shard indexes held (4 KiB each for 256 chunks per shard)
    INDEXES = 1024
    #: chunks held that hold samples of several blocks (of labels: all a fill needs, mostly)
    SHARED = 4

    def __init__(self, arr: zarr.Array, root: str, index_bytes: int | None = None) -> None:
        self.arr = arr
        #: a chunk file's path, but for its key
        self.prefix = "/".join(p for p in (root, arr.store_path.path) if p) + "/"
        self.step = int(arr.chunks[0])
        self.dtype = np.dtype(arr.dtype)
        self.shape = tuple(int(n) for n in arr.chunks)
        self.nbytes = self.dtype.itemsize * math.prod(self.shape)
        #: a sharded array: the size of a shard's index and the chunks per shard
        self.index_bytes = index_bytes
        self.per_shard = int(arr.shards[0]) // self.step if index_bytes else 1
        self._indexes: collections.OrderedDict[int, np.ndarray | None] = (
            collections.OrderedDict())
        self._chunks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    @classmethod
    def of(cls, arr: zarr.Array) -> _ChunkFiles | None:
        store = arr.store_path.store
        codecs = getattr(arr.metadata, "codecs", ())
        index_bytes = shard_index_layout(arr)
        if index_bytes is not None:
            if tuple(arr.shards[1:]) != tuple(arr.shape[1:]):
                return None
            codecs = codecs[0].codecs  # the codecs of each chunk inside a shard
        elif arr.shards:
            return None
        if not (isinstance(store, zarr.storage.LocalStore) and arr.metadata.zarr_format == 3
                and tuple(arr.chunks[1:]) == tuple(arr.shape[1:]) and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)):
            return None
        try:
            dtype = np.dtype(arr.dtype)
        except TypeError:
            return None
        endian = codecs[0].endian.value if codecs[0].endian is not None else None
        if dtype.kind not in "biuf" or (dtype.itemsize > 1 and endian != sys.byteorder):
            return None
        return cls(arr, str(store.root), index_bytes)

    def _index(self, shard: int, fd: int) -> np.ndarray | None:
        """Shard ``shard``'s index (its open file ``fd``), or None when it fails its checksum."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        size = os.fstat(fd).st_size
        index = (parse_shard_index(os.pread(fd, self.index_bytes, size - self.index_bytes),
                                   self.per_shard)
                 if size >= self.index_bytes else None)
        self._indexes[shard] = index
        while len(self._indexes) > self.INDEXES:
            self._indexes.popitem(last=False)
        return index

    def _read(self, k: int, out: np.ndarray) -> bool:
        """Chunk ``k`` into ``out`` (C-contiguous, the chunk's shape); False when its file is
        missing, has another size or fails its checksum (of a sharded array: when its shard is
        missing, its index fails its checksum or does not hold the chunk whole) or holds NaN/Inf.
        One system call reads the chunk and its CRC-32C; both checks follow at once, while the
        chunk is still in the CPU's cache."""
        shard, inner = divmod(k, self.per_shard)
        key = self.arr.metadata.encode_chunk_key((shard, *([0] * (self.arr.ndim - 1))))
        # the CRC-32C after the chunk; of a whole file, one byte more: a longer file fails
        crc = bytearray(4 if self.index_bytes is not None else 5)
        try:
            fd = os.open(f"{self.prefix}{key}", os.O_RDONLY)
        except OSError:
            return False
        try:
            offset = 0
            if self.index_bytes is not None:
                index = self._index(shard, fd)
                if index is None or int(index[inner, 1]) != self.nbytes + 4:
                    return False
                offset = int(index[inner, 0])
            got = os.preadv(fd, [memoryview(out).cast("B"), crc], offset)
        except OSError:
            return False
        finally:
            os.close(fd)
        return (got == self.nbytes + 4
                and np.uint32(google_crc32c.value(out.view(np.uint8).reshape(-1))).tobytes()
                == crc[:4] and _all_finite(out))

    def _shared(self, k: int) -> np.ndarray | None:
        """Chunk ``k``, one holding samples of several blocks: read once and kept (the last
        :attr:`SHARED` read), so that the fills of a window read it once; None when it fails."""
        chunk = self._chunks.get(k)
        if chunk is None:
            chunk = _empty(self.shape, self.dtype)
            if not self._read(k, chunk):
                return None
            self._chunks[k] = chunk
            while len(self._chunks) > self.SHARED:
                self._chunks.popitem(last=False)
        return chunk

    def fill(self, span: tuple[int, int], block: int, slab: np.ndarray, base: int) -> bool:
        """Samples ``span`` (a block's) into ``slab`` rows from ``base`` (``block`` rows are
        there): chunks inside the block read straight into them, others (:meth:`_shared`)
        copied; False when a chunk fails (``slab`` is then partly written)."""
        a, z = span
        for k in range(a // self.step, (z - 1) // self.step + 1):
            lo = k * self.step
            if lo >= a and lo + self.step <= a + block:  # whole in the block's rows
                if not self._read(k, slab[base + lo - a:base + lo - a + self.step]):
                    return False
                continue
            chunk = self._shared(k)
            if chunk is None:
                return False
            first, last = max(a, lo), min(z, lo + self.step)
            slab[base + first - a:base + last - a] = chunk[first - lo:last - lo]
        return True


class _BlockReader:
    """A store read block by block (the block shuffle): ``read(indices)`` gathers the samples
    from the blocks holding them.

    - A block is read whole (never from the store's RAM cache), field by field: one zarr slice
      each, or its chunk files straight (:class:`_ChunkFiles`); a field whose chunk holds
      several blocks (labels) is read once and kept while the blocks that need it are read.
      Its values are checked for NaN/Inf.
    - Blocks are held in one array per field, a slot of ``block`` rows each, so a batch is one
      NumPy gather per field, as from memory. Which block each slot holds, how many of its
      samples were taken and when it was last read are arrays over the slots, so a batch's
      bookkeeping is a few NumPy operations whatever the blocks it touches.
    - The loader takes each sample of a block once per epoch, so a block is dropped once as many
      samples were taken from it as it holds; blocks a rank takes only part of (at most one at
      each end of its epoch's part) go when they are the least recently used of more than
      ``capacity``. The blocks held are thus the current window's (and, at its end, those of
      the next window that its last batches touch).
    """

    def __init__(self, store: LatentStore, block: int, capacity: int) -> None:
        self.store, self.block, self.capacity = store, block, capacity
        self.path = store.path
        #: blocks read so far, and the most held at once (for tests and the benchmark)
        self.blocks_read = self.most_held = 0
        self._held = np.empty(0, np.int64)   # the block in each slot (-1: a free slot)
        self._taken = np.empty(0, np.int64)  # samples taken from it
        self._used = np.empty(0, np.int64)   # the last call reading it (the LRU goes first)
        self._calls = 0
        self._slab: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._files = {k: f for k in store.fields
                       if (f := _ChunkFiles.of(store._arrays[k])) is not None}

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"_BlockReader({self.store!r}, block={self.block}, capacity={self.capacity})"

    def _span(self, number: int) -> tuple[int, int]:
        return number * self.block, min((number + 1) * self.block, len(self.store))

    def _slab_of(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._slab:  # pages are only touched as slots fill
            self._slab[name] = _empty((len(self._held) * self.block, *shape), dtype)
        return self._slab[name]

    def _slots_of(self, blocks: np.ndarray) -> np.ndarray:
        """The slot holding each of ``blocks`` (sorted, unique), -1 for those not held."""
        if not len(self._held):
            return np.full(len(blocks), -1, np.int64)
        order = np.argsort(self._held)
        at = np.searchsorted(self._held[order], blocks).clip(max=len(order) - 1)
        return np.where(self._held[order[at]] == blocks, order[at], -1)

    def _free(self, slots: np.ndarray, count: int) -> None:
        """Drop the blocks of the ``count`` least recently used of ``slots``."""
        self._held[slots[np.argsort(self._used[slots], kind="stable")[:count]]] = -1

    def _take_slots(self, count: int, keep: np.ndarray) -> np.ndarray:
        """``count`` free slots (the lowest, so that few pages are touched): else the least
        recently used blocks not in slots ``keep`` make room; else (at first, or for a call
        needing more blocks than ``capacity``) the slots double."""
        free = np.flatnonzero(self._held < 0)
        if len(free) < count:
            others = np.flatnonzero(self._held >= 0)
            self._free(others[~np.isin(others, keep)], count - len(free))
            free = np.flatnonzero(self._held < 0)
        while len(free) < count:
            have = len(self._held)
            more = max(2 * have, self.capacity, 1) - have
            self._held = np.concatenate([self._held, np.full(more, -1, np.int64)])
            self._taken, self._used = (np.concatenate([a, np.zeros(more, np.int64)])
                                       for a in (self._taken, self._used))
            for k, slab in self._slab.items():
                grown = _empty((len(self._held) * self.block, *slab.shape[1:]), slab.dtype)
                grown[:len(slab)] = slab
                self._slab[k] = grown
            free = np.flatnonzero(self._held < 0)
        return free[:count]

    def _through_zarr(self, name: str, spans: list[tuple[int, int]]) -> list[np.ndarray]:
        """Field ``name`` at each sample range of ``spans`` (sorted) through zarr: one slice per
        range where the field's chunks are no larger than a block and the store is local, else
        one read of all their rows (each chunk decoded once, not once per block; from object
        storage, its chunks requested concurrently instead of one block after another)."""
        arr = self.store._arrays[name]
        local = isinstance(arr.store_path.store, zarr.storage.LocalStore)
        if len(spans) == 1 or arr.chunks[0] <= self.block and local:
            return [self.store._get(name, slice(a, b), range(a, b)) for a, b in spans]
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        ends = np.cumsum([b - a for a, b in spans])
        return np.split(self.store._get(name, rows, rows), ends[:-1])

    def _fill(self, numbers: list[int], slots: list[int]) -> None:
        """Read blocks ``numbers`` (sorted) into ``slots``, every field, and check them. Chunk
        files are read straight and checked as read; any other field, and any block failing
        there, is read through zarr and checked here, which names the damaged chunk or the
        samples holding NaN/Inf (all of them this call reads, field by field)."""
        spans = [self._span(b) for b in numbers]
        bases = [slot * self.block for slot in slots]
        problems = []
        for name in self.store.fields:
            todo = list(range(len(numbers)))
            if (files := self._files.get(name)) is not None:
                slab = self._slab_of(name, files.dtype, files.shape[1:])
                todo = [i for i in todo if not files.fill(spans[i], self.block, slab, bases[i])]
            if not todo:
                continue
            got = self._through_zarr(name, [spans[i] for i in todo])
            for i, values in zip(todo, got):
                slab = self._slab_of(name, values.dtype, values.shape[1:])
                slab[bases[i]:bases[i] + len(values)] = values
            bad = [(i, values) for i, values in zip(todo, got) if not _all_finite(values)]
            if bad and (p := nonfinite_problem(
                    name, np.concatenate([values for _, values in bad]),
                    np.concatenate([np.arange(*spans[i]) for i, _ in bad]))):
                problems.append(p)
        if problems:
            raise StoreError(self.path, problems)

    def read(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Samples at ``indices`` (any order, repeats allowed), one array per field."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.store)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise IndexError(f"latent store {self.path}: sample index {bad} out of range "
                             f"0..{n - 1}")
        if not idx.size:  # nothing asked: empty fields of the right shapes
            return {k: self.store._get(k, slice(0, 0), range(0)) for k in self.store.fields}
        ids = idx // self.block
        needed, where, counts = np.unique(ids, return_inverse=True, return_counts=True)
        # reads, slots and the gather: one call at a time (gathers beside another call's read
        # were slower on the memory-bound benchmark machine: benchmarks/RESULTS.md)
        with self._lock:
            self._calls += 1
            slots = self._slots_of(needed)
            missing = np.flatnonzero(slots < 0)
            if missing.size:
                new = self._take_slots(len(missing), slots[slots >= 0])
                self._fill(needed[missing].tolist(), new.tolist())  # failing: they stay free
                self._held[new], self._taken[new] = needed[missing], 0
                self.blocks_read += len(new)
                slots[missing] = new
            self._used[slots] = self._calls
            self.most_held = max(self.most_held, int((self._held >= 0).sum()))
            rows = slots[where.reshape(-1)] * self.block + (idx - ids * self.block)
            out = {k: self._slab[k][rows] for k in self.store.fields}
            self._taken[slots] += counts
            sizes = np.minimum(needed * self.block + self.block, n) - needed * self.block
            self._held[slots[self._taken[slots] >= sizes]] = -1  # all taken: done this epoch
            held = np.flatnonzero(self._held >= 0)
            if len(held) > self.capacity:
                self._free(held, len(held) - self.capacity)
        return out


class _BatchPlan(BaseNode):
    """Yields ``(store index, sample indices, state after this batch)``; starts from ``start``."""

    def __init__(self, shards: Sequence[_Shards | BlockPlan], probabilities: np.ndarray, seed: int,
                 start: Mapping[str, Any], group: int = 1) -> None:
        super().__init__()
        self.shards, self.seed, self.group = shards, seed, group
        self.cumulative = np.cumsum(probabilities / probabilities.sum())
        self.start = {"step": int(start["step"]), "counts": [int(c) for c in start["counts"]]}

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or self.start
        self.step, self.counts = int(state["step"]), [int(c) for c in state["counts"]]

    def choose(self, step: int) -> int:
        """The store giving batch ``step``: a draw seeded by ``(seed, step // group)``, one for
        each group of ``group`` consecutive batches."""
        if len(self.shards) == 1:
            return 0
        u = np.random.default_rng([self.seed, _MIXING, step // self.group]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.shards) - 1)

    def next(self) -> tuple[int, np.ndarray, int, dict[str, Any]]:
        step, s = self.step, self.choose(self.step)
        indices = self.shards[s].batch(self.counts[s])
        self.step += 1
        self.counts[s] += 1
        return s, indices, step, self.get_state()

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "counts": list(self.counts)}


def _stop_threads(node: Any, seen: set[int]) -> None:
    """Stop a torchdata pipeline's threads now, outermost first, from this thread (left to the
    garbage collector, a worker thread may end up joining itself)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if callable(getattr(node, "_shutdown", None)):
        node._shutdown()
    for child in ("root", "_it", "source"):
        _stop_threads(getattr(node, child, None), seen)


@attrs.frozen
class _Failure:
    """An exception raised while loading a batch on a pipeline thread."""

    error: Exception


class LatentLoader:
    """An endless, resumable iterable of ``(source index, TokenBatch)``; build it with
    :func:`build_loader`. ``state_dict()`` is the position after the last batch handed out;
    a loader built with the same arguments continues exactly from it after ``load_state_dict``.
    With ``shuffle.kind == "block"`` each source's store is read through a block reader
    (``sources[i].store``), which holds the current window's blocks only."""

    def __init__(self, sources: Sequence[LoaderSource], *, seed: int, rank: int, world_size: int,
                 num_workers: int, prefetch: int, group: int = 1,
                 shuffle: ShuffleConfig | None = None) -> None:
        self.shuffle = shuffle or ShuffleConfig()
        self.sources = list(sources)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # batches that share one mixing draw; with one store there is nothing to draw
        self.group = group if len(self.sources) > 1 else 1
        self.num_workers, self.prefetch = num_workers, prefetch
        self.shards: list[_Shards | BlockPlan]
        #: samples per block of each store (the block shuffle)
        self.blocks: list[int] = []
        if self.shuffle.kind == "full":
            self.shards = [_Shards(len(s.store), s.batch_size, i, seed, rank, world_size)
                           for i, s in enumerate(self.sources)]
        else:
            self.blocks = [block_samples(s.store, self.shuffle.block_chunks)
                           for s in self.sources]
            self.shards = [BlockPlan(len(s.store), s.batch_size, b, self.shuffle.window_blocks,
                                     i, seed, rank, world_size)
                           for i, (s, b) in enumerate(zip(self.sources, self.blocks))]
            # partly taken blocks are kept up to two windows' worth (the current and the next,
            # which workers start on while the current one's last batches are gathered)
            self.sources = [attrs.evolve(s, store=_BlockReader(s.store, b,
                                                               2 * self.shuffle.window_blocks))
                            for s, b in zip(self.sources, self.blocks)]
        self._state: dict[str, Any] = {"step": 0, "counts": [0] * len(self.sources)}
        self._generation = 0

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [[len(s.store), s.batch_size, s.probability] for s in self.sources],
                "group": self.group, "shuffle": self._shuffle_identity()}

    def _shuffle_identity(self) -> str | dict[str, Any]:
        if self.shuffle.kind == "full":
            return "full"
        return {"kind": "block", "block_samples": list(self.blocks),
                "window_blocks": self.shuffle.window_blocks}

    def _load(self, item: tuple[int, np.ndarray, int, dict]
              ) -> tuple[int, TokenBatch | _Failure, dict]:
        s, indices, step, state = item
        source = self.sources[s]
        try:
            numeric, captions = caption_fields(source.store.read(indices))
            fields = {k: torch.from_numpy(a) for k, a in numeric.items()}
            if _has_posterior(list(fields)):
                fields = sample_posterior(fields, self._generator(_POSTERIOR, step))
            batch = source.tokenize(fields)
            if source.text is not None and captions is not None:
                chosen = choose_caption_indices(captions, self._generator(_CAPTION, step))
                if TEXT_EMBEDDINGS in numeric:  # a frozen encoder's, precomputed
                    encoding = stored_encoding(numeric, chosen)
                else:                          # a trainable encoder's ids, online
                    encoding = source.text.encode([str(captions[i, k]) if k >= 0 else ""
                                                   for i, k in enumerate(chosen)])
                batch = with_text(batch, encoding)
            return s, batch.with_padding_hint(), state
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there as is
            return s, _Failure(exc), state

    def _generator(self, stream: int, step: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, stream, self.rank, step])
        return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def _pipeline(self) -> Loader:
        node: BaseNode = _BatchPlan(self.shards, np.array([s.probability for s in self.sources]),
                                    self.seed, self._state, self.group)
        if self.num_workers > 0:
            node = ParallelMapper(node, self._load, num_workers=self.num_workers, method="thread",
                                  in_order=True)
        else:
            node = Mapper(node, self._load)
        if self.prefetch > 0:
            node = Prefetcher(node, prefetch_factor=self.prefetch)
        return Loader(node, restart_on_stop_iteration=False)

    def __iter__(self) -> Iterator[tuple[int, TokenBatch]]:
        self._generation += 1
        generation = self._generation
        pipeline = self._pipeline()
        try:
            for s, batch, state in pipeline:
                if generation != self._generation:  # superseded by load_state_dict or iter()
                    return
                if isinstance(batch, _Failure):
                    # raised in the consumer's thread with its own type (a StoreError naming
                    # the damaged chunk), not torchdata's RuntimeError holding a traceback text
                    raise batch.error
                self._state = state
                yield s, batch
        finally:
            _stop_threads(pipeline, set())

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, lists and dicts: the position after the last batch handed out."""
        return {"version": STATE_VERSION, "step": self._state["step"],
                "counts": list(self._state["counts"]), **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` on the next ``iter()``; refuses a state of another setup."""
        mine = self._identity()
        # a state from before groups: each batch had its own draw (the same as a group of 1)
        theirs = {k: state.get(k, LEGACY_IDENTITY.get(k)) for k in mine}
        if theirs != mine or state.get("version") != STATE_VERSION:
            differ = [k for k in (*mine, "version")
                      if state.get(k, LEGACY_IDENTITY.get(k))
                      != {**mine, "version": STATE_VERSION}[k]]
            raise ValueError(f"loader state does not fit this loader (differs in {differ}): it "
                             "was saved with other seed, rank, world size, stores, group of "
                             "batches per modality draw (grad_accum) or shuffle")
        self._state = {"step": int(state["step"]), "counts": [int(c) for c in state["counts"]]}
        self._generation += 1


def build_loader(sources: Sequence[LoaderSource], *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch: int = 2,
                 group: int = 1, shuffle: ShuffleConfig | None = None) -> LatentLoader:
    """The training loader over ``sources`` for ``rank`` of ``world_size``: each batch is one
    store read, tokenized on ``num_workers`` threads (0: inline), ``prefetch`` batches ahead.
    With several sources, each run of ``group`` consecutive batches (counted from the first:
    the trainer's ``grad_accum`` micro-batches of one optimizer step) comes from one source.
    ``shuffle``: the epoch order (:class:`~selfflow_core.data.blocks.ShuffleConfig`; None: the
    full shuffle)."""
    if not sources:
        raise ValueError("build_loader: no sources")
    if group < 1:
        raise ValueError(f"build_loader: group must be at least 1, got {group}")
    if not 0 <= rank < world_size:
        raise ValueError(f"build_loader: rank {rank} not in 0..{world_size - 1}")
    for s in sources:
        if len(s.store) // world_size < s.batch_size:
            raise ValueError(f"latent store {s.store.path}: {len(s.store)} samples give each of "
                             f"{world_size} rank(s) {len(s.store) // world_size}, fewer than "
                             f"the batch size {s.batch_size}")
    return LatentLoader(sources, seed=seed, rank=rank, world_size=world_size,
                        num_workers=num_workers, prefetch=prefetch, group=group,
                        shuffle=shuffle)
