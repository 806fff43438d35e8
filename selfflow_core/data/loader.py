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


class _ChunkFiles:
    """One field of a local store read straight from its chunk files (the block shuffle): through
    zarr, a 0.5 MiB chunk cost 1.6 ms of CPU on a loaded 2-core machine (event loop and thread
    hand-offs, indexing), 13x reading its file into memory and checking its CRC-32C
    (benchmarks/RESULTS.md, "Stores larger than RAM"). Only for the layout the store writer
    makes uncompressed (``compressor="none"``): zarr v3, chunked along samples only, codecs
    ``bytes`` (native byte order) then ``crc32c``, a numeric dtype; any other field is read
    through zarr. A sharded field with those inner codecs is read the same way, chunk by chunk
    from its shard files, found by the shard's index (read once per shard and checked against
    its CRC-32C). A chunk whose
    file is missing, has another size or fails its checksum is read through zarr too, which
    names the damage (a :class:`StoreError`), as the store's own reads do."""

    #: shard indexes held (4 KiB each for 256 chunks per shard)
    INDEXES = 1024

    def __init__(self, arr: zarr.Array, root: str, index_bytes: int | None = None) -> None:
        self.arr, self.root = arr, root
        self.step = int(arr.chunks[0])
        self.dtype = np.dtype(arr.dtype)
        self.shape = tuple(int(n) for n in arr.chunks)
        self.nbytes = self.dtype.itemsize * math.prod(self.shape)
        #: a sharded array: the size of a shard's index and the chunks per shard
        self.index_bytes = index_bytes
        self.per_shard = int(arr.shards[0]) // self.step if index_bytes else 1
        self._indexes: collections.OrderedDict[int, np.ndarray | None] = (
            collections.OrderedDict())

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

    def _index(self, shard: int, f: Any) -> np.ndarray | None:
        """Shard ``shard``'s index (its open file ``f``), or None when it fails its checksum."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        size = os.fstat(f.fileno()).st_size
        index = (parse_shard_index(os.pread(f.fileno(), self.index_bytes,
                                            size - self.index_bytes), self.per_shard)
                 if size >= self.index_bytes else None)
        self._indexes[shard] = index
        while len(self._indexes) > self.INDEXES:
            self._indexes.popitem(last=False)
        return index

    def _read(self, k: int, out: np.ndarray) -> bool:
        """Chunk ``k`` into ``out`` (C-contiguous, the chunk's shape); False when its file is
        missing, has another size or fails its checksum (of a sharded array: when its shard is
        missing, its index fails its checksum or does not hold the chunk whole)."""
        shard, inner = divmod(k, self.per_shard)
        key = self.arr.metadata.encode_chunk_key((shard, *([0] * (self.arr.ndim - 1))))
        path = "/".join(p for p in (self.root, self.arr.store_path.path, key) if p)
        try:
            with open(path, "rb", buffering=0) as f:
                if self.index_bytes is None:
                    got = f.readinto(memoryview(out).cast("B"))
                    crc = f.read(5)
                else:
                    index = self._index(shard, f)
                    if index is None or int(index[inner, 1]) != self.nbytes + 4:
                        return False
                    f.seek(int(index[inner, 0]))
                    got = f.readinto(memoryview(out).cast("B"))
                    crc = f.read(4)
        except OSError:
            return False
        flat = out.view(np.uint8).reshape(-1)
        return got == self.nbytes and np.uint32(google_crc32c.value(flat)).tobytes() == crc

    def fill(self, span: tuple[int, int], block: int, slab: np.ndarray, base: int,
             chunks: dict[int, np.ndarray | None]) -> bool:
        """Samples ``span`` (a block's) into ``slab`` rows from ``base`` (``block`` rows are
        there): chunks inside the block read straight into them, others read once into
        ``chunks`` and copied; False when a chunk fails (``slab`` is then partly written)."""
        a, z = span
        for k in range(a // self.step, (z - 1) // self.step + 1):
            lo = k * self.step
            if lo >= a and lo + self.step <= a + block:  # whole in the block's rows
                if not self._read(k, slab[base + lo - a:base + lo - a + self.step]):
                    return False
                continue
            if k not in chunks:
                chunk = np.empty(self.shape, self.dtype)
                chunks[k] = chunk if self._read(k, chunk) else None
            chunk = chunks[k]
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
      several blocks (labels) is read once for all the blocks one call lacks. Its values are
      checked for NaN/Inf.
    - Blocks are held in one array per field, a slot of ``block`` rows each, so a batch is one
      NumPy gather per field, as from memory.
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
        self._slot: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU first
        self._taken: dict[int, int] = {}  # samples taken from each held block
        self._free: list[int] = []        # free slots, the last freed on top
        self._slots = 0
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
            self._slab[name] = np.empty((self._slots * self.block, *shape), dtype)
        return self._slab[name]

    def _take_slot(self, keep: set[int]) -> int:
        """A free slot: else the least recently used block not in ``keep`` makes room; else
        (at first, or for a call needing more blocks than ``capacity``) the slots double."""
        if not self._free:
            old = next((b for b in self._slot if b not in keep), None)
            if old is not None:
                self._drop(old)
            else:
                have, self._slots = self._slots, max(2 * self._slots, self.capacity, 1)
                for k, slab in self._slab.items():
                    grown = np.empty((self._slots * self.block, *slab.shape[1:]), slab.dtype)
                    grown[:len(slab)] = slab
                    self._slab[k] = grown
                self._free = list(range(self._slots - 1, have - 1, -1))
        return self._free.pop()

    def _drop(self, number: int) -> None:
        self._free.append(self._slot.pop(number))
        del self._taken[number]

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
        """Read blocks ``numbers`` (sorted) into ``slots``, every field, and check them."""
        spans = [self._span(b) for b in numbers]
        bases = [slot * self.block for slot in slots]
        for name in self.store.fields:
            files, pending = self._files.get(name), list(range(len(numbers)))
            if files is not None:
                slab, chunks = self._slab_of(name, files.dtype, files.shape[1:]), {}
                pending = [i for i in pending
                           if not files.fill(spans[i], self.block, slab, bases[i], chunks)]
            if pending:
                for i, values in zip(pending, self._through_zarr(name, [spans[i]
                                                                        for i in pending])):
                    slab = self._slab_of(name, values.dtype, values.shape[1:])
                    slab[bases[i]:bases[i] + len(values)] = values
        for (a, z), base in zip(spans, bases):
            problems = [p for k, slab in self._slab.items()
                        if not _all_finite(values := slab[base:base + z - a])
                        and (p := nonfinite_problem(k, values, np.arange(a, z)))]
            if problems:
                raise StoreError(self.path, problems)
        self.blocks_read += len(numbers)

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
        blocks = needed.tolist()
        with self._lock:  # reads, slots and the gather: one call at a time
            for b in blocks:
                if b in self._slot:
                    self._slot.move_to_end(b)
            missing = [b for b in blocks if b not in self._slot]
            if missing:
                keep = set(blocks)
                slots = [self._take_slot(keep) for _ in missing]
                try:
                    self._fill(missing, slots)
                except BaseException:
                    self._free += slots
                    raise
                for b, slot in zip(missing, slots):
                    self._slot[b], self._taken[b] = slot, 0
            self.most_held = max(self.most_held, len(self._slot))
            slots_of = np.fromiter((self._slot[b] for b in blocks), np.int64, len(blocks))
            rows = slots_of[where.reshape(-1)] * self.block + (idx - ids * self.block)
            out = {k: self._slab[k][rows] for k in self.store.fields}
            sizes = np.minimum(needed * self.block + self.block, n) - needed * self.block
            for b, count, size in zip(blocks, counts.tolist(), sizes.tolist()):
                self._taken[b] += count
                if self._taken[b] >= size:  # every sample taken: done this epoch
                    self._drop(b)
            while len(self._slot) > self.capacity:
                self._drop(next(iter(self._slot)))
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
