"""The latent store: one zarr 3 group per dataset, one array per field, sample axis first.

Offline, :func:`encode_store` runs a modality's encoder over a raw source and appends the result
with a :class:`StoreWriter` (resumable, one writer at a time). Online, :func:`open_store` validates
the store and returns a :class:`LatentStore` whose :meth:`LatentStore.read` gathers a batch of
samples with one read per field. Layout, schema keys and semantics: ``docs/store.md``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, GzipCodec, ZstdCodec

from selfflow_core.data.check import (
    FORMAT_VERSION,
    HASHED_KEYS,
    StoreError,
    StoreLike,
    adapter_problems,
    check_store,
    chunk_problems,
    data_problems,
    field_specs,
    is_local,
    nonfinite_problem,
    open_group,
    schema_problems,
    store_name,
    store_schema,
)
from selfflow_core.interfaces import FieldSpec, ModalityAdapter
from selfflow_core.runtime.locking import LockHeld, PidLock

__all__ = ["FORMAT_VERSION", "LatentStore", "StoreError", "StoreWriter", "check_store",
           "encode_store", "open_store", "store_schema"]

#: default chunk size in bytes along the sample axis (see benchmarks/RESULTS.md, "Loader")
CHUNK_BYTES = 512 * 1024
#: stores up to this many bytes are read into memory on first use (random batches then cost no I/O)
CACHE_BYTES = 2 * 1024**3
COMPRESSORS = {
    "none": lambda: None,
    "zstd": lambda: ZstdCodec(level=3),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle),
    "gzip": lambda: GzipCodec(level=5),
}


def codecs(compressor: str) -> tuple:
    """The bytes-to-bytes codecs of every array: the compressor (if any), then a CRC-32C
    checksum of each chunk's stored bytes, so a damaged chunk fails to decode instead of
    reading as wrong numbers (see docs/reliability.md for its cost)."""
    compress = COMPRESSORS[compressor]()
    return (*([compress] if compress is not None else []), Crc32cCodec())


def chunk_samples(spec: FieldSpec, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Samples per chunk: the largest power of two whose chunk fits ``chunk_bytes`` (at least 1)."""
    per_sample = np.dtype(spec.dtype).itemsize * math.prod(spec.shape)
    return 1 << (max(1, chunk_bytes // max(per_sample, 1)).bit_length() - 1)


class _WriteLock:
    """One writer per store. Local paths: a ``<path>.lock``
    :class:`~selfflow_core.runtime.locking.PidLock` (a lock left by a dead process on this host
    is taken over). Other stores: a lock within this process only."""

    _held: set[str] = set()

    def __init__(self, path: StoreLike) -> None:
        self.name = store_name(path)
        self.file = f"{os.fspath(path).rstrip('/')}.lock" if is_local(path) else None
        if self.file is None:
            if self.name in self._held:
                raise StoreError(self.name, ["another writer in this process is writing it"])
            self._held.add(self.name)
            return
        self._lock = PidLock(self.file)
        try:
            self._lock.acquire()
        except LockHeld as exc:
            raise StoreError(self.name, [
                f"another writer holds the lock {self.file} "
                f"({exc.holder or 'unknown holder'}); two writers on one store are refused. "
                "If none is running, delete the lock file."]) from None

    def release(self) -> None:
        if self.file is None:
            self._held.discard(self.name)
        else:
            self._lock.release()


class StoreWriter:
    """Appends batches to a store, resumably: a batch counts only once every array holds it and
    the ``committed`` attribute says so; reopening cuts arrays back to ``committed``. Use as a
    context manager (it holds the store's write lock) and call :meth:`finish` at the end."""

    def __init__(self, path: StoreLike, schema: Mapping[str, Any], *,
                 chunks: int | Mapping[str, int] | None = None, compressor: str = "none") -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {compressor!r}; choose from {list(COMPRESSORS)}")
        self.name = store_name(path)
        self.specs = field_specs(schema)
        self._lock = _WriteLock(path)
        try:
            self.group = self._open(path, dict(schema))
            fresh = self.group.attrs["committed"] == 0  # new, or stopped while being created
            for name, spec in self.specs.items():
                if fresh and name not in self.group:
                    n = chunks if isinstance(chunks, int) else (chunks or {}).get(name)
                    n = n or chunk_samples(spec)
                    self.group.create_array(
                        name, shape=(0, *spec.shape), dtype=spec.dtype, chunks=(n, *spec.shape),
                        compressors=codecs(compressor),
                        config={"write_empty_chunks": True})
            problems = schema_problems(self.group, require_complete=False)
            if problems:
                raise StoreError(self.name, problems)
            self.count = int(self.group.attrs["committed"])
            self.arrays = {name: self.group[name] for name in self.specs}
            if not self.complete:
                # the next append rewrites the last, partly filled chunk: it must decode (a
                # damaged one is reported, and nothing is written)
                problems = [p for name, arr in self.arrays.items() if self.count % arr.chunks[0]
                            for p in chunk_problems(arr, name, [self.count // arr.chunks[0]],
                                                    self.count, self.name)]
                if problems:
                    raise StoreError(self.name, problems)
                for arr in self.arrays.values():  # drop whatever an interrupted append left
                    if arr.shape[0] != self.count:
                        arr.resize((self.count, *arr.shape[1:]))
        except BaseException:
            self._lock.release()
            raise

    def _open(self, path: StoreLike, schema: dict[str, Any]) -> zarr.Group:
        try:
            group = open_group(path, "r+")
        except StoreError:
            target = os.fspath(path) if is_local(path) else path
            try:
                return zarr.open_group(target, mode="w-", attributes={
                    **schema, "committed": 0, "complete": False, "count": None})
            except FileExistsError:
                raise StoreError(self.name, ["exists and is not a zarr group; refusing to "
                                             "overwrite it"]) from None
        stored = dict(group.attrs)
        if "format_version" not in stored:
            raise StoreError(self.name, ["a zarr group that is not a selfflow store; refusing to "
                                         "write into it"])
        if stored.get("config_hash") != schema["config_hash"]:
            differ = [k for k in HASHED_KEYS if stored.get(k) != schema.get(k)]
            raise StoreError(self.name, [
                f"written with a different configuration (config hash {stored.get('config_hash')}"
                f" != {schema['config_hash']}; differs in {differ}); use another path or delete "
                "the store to encode again"])
        return group

    @property
    def complete(self) -> bool:
        """Whether the completeness marker is set (nothing more can be appended)."""
        return bool(self.group.attrs["complete"])

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append one batch: an array per field, sample axis first, equal lengths."""
        if self.complete:
            raise StoreError(self.name, ["is complete; nothing can be appended"])
        if set(batch) != set(self.specs):
            raise StoreError(self.name, [f"batch fields {sorted(batch)} != schema fields "
                                         f"{sorted(self.specs)}"])
        data = {k: np.asarray(v) for k, v in batch.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in data.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise StoreError(self.name, [f"batch fields have different sample counts: {sizes}"])
        for name, spec in self.specs.items():
            value, dtype = data[name], np.dtype(spec.dtype)
            if tuple(value.shape[1:]) != spec.shape:
                raise StoreError(self.name, [f"field {name!r}: batch per-sample shape "
                                             f"{tuple(value.shape[1:])} != schema {spec.shape}"])
            if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise StoreError(self.name, [f"field {name!r}: batch dtype {value.dtype} cannot "
                                             f"be stored as {dtype}"])
        start, stop = self.count, self.count + next(iter(sizes.values()))
        for name, arr in self.arrays.items():
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = data[name].astype(arr.dtype, copy=False)
        self.group.attrs["committed"] = stop  # the commit point: written after every array
        self.count = stop

    def finish(self) -> None:
        """Write the completeness marker (last): the store is now readable for training."""
        self.group.attrs.update({"complete": True, "count": self.count})

    def close(self) -> None:
        """Release the write lock."""
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_store(adapter: ModalityAdapter, source: str, path: StoreLike, *,
                 adapter_config: Mapping[str, Any], batch_size: int = 256, progress: bool = True,
                 chunks: int | Mapping[str, int] | None = None,
                 compressor: str = "none") -> LatentStore:
    """Encode ``adapter.open_source(source)`` into the store at ``path`` and open it. Resumes an
    interrupted encode from its committed samples; a complete store with the same configuration
    is returned as is; one with another configuration is a :class:`StoreError`."""
    raw = adapter.open_source(source)
    schema = store_schema(adapter, source=source, source_description=raw.description,
                          adapter_config=adapter_config)
    with StoreWriter(path, schema, chunks=chunks, compressor=compressor) as writer:
        if not writer.complete:
            total = len(raw)
            if writer.count > total:
                raise StoreError(writer.name, [f"holds {writer.count} samples, the source only "
                                               f"{total}"])
            with tqdm(total=total, initial=writer.count, disable=not progress, unit="sample",
                      desc=f"encode {source} -> {writer.name}") as bar:
                for start in range(writer.count, total, batch_size):
                    stop = min(start + batch_size, total)
                    writer.append(adapter.encode(raw.read(start, stop)))
                    bar.update(stop - start)
            writer.finish()
    return open_store(path)


class LatentStore:
    """A validated store opened for reading. ``schema`` is the group attributes, ``fields`` the
    per-sample :class:`FieldSpec` of each array; ``read`` gathers samples by index."""

    def __init__(self, group: zarr.Group, name: str, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = name
        self.schema: dict[str, Any] = dict(group.attrs)
        self.fields = field_specs(self.schema)
        self._arrays = {k: group[k] for k in self.fields}
        self._len = int(self.schema["committed"])
        self.nbytes = sum(self._len * np.dtype(s.dtype).itemsize * math.prod(s.shape)
                          for s in self.fields.values())
        self.cached = self.nbytes <= cache_bytes
        self._memory: dict[str, np.ndarray] | None = None
        self._memory_lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"LatentStore({self.path!r}, {self._len} samples, fields={list(self.fields)})"

    def load(self) -> dict[str, np.ndarray]:
        """Every field read into memory (done once, on first use when the store is ``cached``).
        A damaged chunk or a NaN/Inf value is a :class:`StoreError` naming the field, the chunk
        (its file) or the sample indices."""
        with self._memory_lock:
            if self._memory is None:
                memory = {k: self._get(k, slice(0, self._len), range(self._len))
                          for k in self._arrays}
                problems = [p for k, v in memory.items()
                            if (p := nonfinite_problem(k, v, np.arange(self._len)))]
                if problems:
                    raise StoreError(self.path, problems)
                self._memory = memory
            return self._memory

    def _get(self, name: str, selection: Any, samples: Any) -> np.ndarray:
        """``arrays[name]`` at ``selection`` (a slice, or sorted indices via ``oindex``); a decode
        error (a checksum mismatch, a truncated chunk) becomes a :class:`StoreError` naming
        the damaged chunks among those holding ``samples``."""
        arr = self._arrays[name]
        try:
            return np.asarray(arr[selection] if isinstance(selection, slice)
                              else arr.oindex[selection])
        except Exception as exc:  # noqa: BLE001 - find which chunk is damaged and say so
            step = arr.chunks[0]
            chunks = sorted({int(i) // step for i in samples})
            problems = chunk_problems(arr, name, chunks, self._len, self.path)
            raise StoreError(self.path, problems or [
                f"field {name!r}: read failed ({type(exc).__name__}: {exc})"]) from None

    def read(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Samples at ``indices`` (any order, repeats allowed), one array per field: from memory
        when cached, else one sorted ``oindex`` read per field, put back in the asked order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            bad = idx[(idx < 0) | (idx >= self._len)][0]
            raise IndexError(f"latent store {self.path}: sample index {bad} out of range "
                             f"0..{self._len - 1}")
        if self.cached:
            return {k: v[idx] for k, v in self.load().items()}
        unique, inverse = np.unique(idx, return_inverse=True)
        out = {k: self._get(k, unique, unique) for k in self._arrays}
        problems = [p for k, v in out.items() if (p := nonfinite_problem(k, v, unique))]
        if problems:
            raise StoreError(self.path, problems)
        return {k: v[inverse] for k, v in out.items()}


def open_store(path: StoreLike, *, require_complete: bool = True,
               adapter: ModalityAdapter | None = None, verify: bool = False,
               cache_bytes: int = CACHE_BYTES) -> LatentStore:
    """Open a store for reading after validating its schema (and, given ``adapter``, that it
    holds that modality's fields; with ``verify``, also every value, as :func:`check_store`).
    An invalid or incomplete store is a :class:`StoreError` listing every problem."""
    group = open_group(path, "r")
    problems = schema_problems(group, require_complete=require_complete)
    if not problems and adapter is not None:
        problems = adapter_problems(group.attrs, adapter)
    if not problems and verify:
        problems = data_problems(group, field_specs(group.attrs), int(group.attrs["committed"]),
                                 store_name(path))
    if problems:
        raise StoreError(store_name(path), problems)
    return LatentStore(group, store_name(path), cache_bytes=cache_bytes)
