"""The block shuffle's reader: whole blocks of a store read into slabs, batches gathered from
them as from memory (:class:`BlockReader`), the chunk files of a local store read straight
(:class:`ChunkFiles`), and the block size (:func:`block_samples`). The order of the blocks
and samples is :mod:`selfflow_core.data.blocks`'; the loader (:mod:`selfflow_core.data.loader`)
puts a reader in place of each store when ``shuffle.kind`` is ``"block"``."""

from __future__ import annotations

import collections
import math
import os
import sys
import threading

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from selfflow_core.data.check import (
    is_text,
    nonfinite_problem,
    parse_shard_index,
    shard_index_layout,
)
from selfflow_core.data.store import TEXT_BYTES, LatentStore, StoreError

_PAGE = 4096


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


class ChunkFiles:
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
    def of(cls, arr: zarr.Array) -> ChunkFiles | None:
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


class BlockReader:
    """A store read block by block (the block shuffle): ``read(indices)`` gathers the samples
    from the blocks holding them.

    - A block is read whole (never from the store's RAM cache), field by field: one zarr slice
      each, or its chunk files straight (:class:`ChunkFiles`); a field whose chunk holds
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
                       if (f := ChunkFiles.of(store._arrays[k])) is not None}

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"BlockReader({self.store!r}, block={self.block}, capacity={self.capacity})"

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
