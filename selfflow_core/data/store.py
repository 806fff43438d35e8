"""The latent store: one zarr 3 group per dataset, one array per field, sample axis first.

Offline, :func:`~selfflow_core.data.writer.encode_store` runs a modality's encoder over a raw
source and appends the result with a :class:`~selfflow_core.data.writer.StoreWriter`
(:mod:`selfflow_core.data.writer`). Online, :func:`open_store` validates the store and returns a
:class:`LatentStore` whose :meth:`LatentStore.read` gathers a batch of samples with one read per
field. Here too: the layout (chunk sizes, shards, codecs). Layout, schema keys and semantics:
``docs/store.md``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, GzipCodec, ZstdCodec

from selfflow_core.data.check import (
    FORMAT_VERSION,
    StoreError,
    StoreLike,
    adapter_problems,
    check_store,
    chunk_problems,
    data_problems,
    field_specs,
    is_text,
    nonfinite_problem,
    open_group,
    schema_problems,
    store_name,
    store_schema,
)
from selfflow_core.errors import ConfigError, ObjectStoreError
from selfflow_core.interfaces import FieldSpec, ModalityAdapter

__all__ = ["FORMAT_VERSION", "LatentStore", "StoreError", "check_store", "open_store",
           "store_schema"]

#: default chunk size in bytes along the sample axis (see benchmarks/RESULTS.md, "Loader")
CHUNK_BYTES = 512 * 1024
#: stores up to this many bytes are read into memory on first use (random batches then cost no I/O)
CACHE_BYTES = 2 * 1024**3
#: the size of one string of a text field when choosing its chunks (captions are short)
TEXT_BYTES = 128
#: ``shards="auto"``: a field is sharded once it would hold more than this many bytes (more than
#: the RAM cache takes: a store that large is read by the block shuffle)
SHARD_MIN_BYTES = 2 * 1024**3
#: ``shards="auto"``: the bytes of one shard of the field with the largest samples (256 chunks
#: of 0.5 MiB; see benchmarks/RESULTS.md, "Sharded stores, and the sampled pre-check")
SHARD_BYTES = 128 * 1024**2
#: what ``shards=`` takes: ``"auto"``, None (no shards), samples per shard, or that per field
Shards = str | int | Mapping[str, int] | None
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


def sample_bytes(spec: FieldSpec) -> int:
    """Bytes of one sample of a field (a text field counts :data:`TEXT_BYTES` per string)."""
    itemsize = TEXT_BYTES if is_text(spec.dtype) else np.dtype(spec.dtype).itemsize
    return itemsize * math.prod(spec.shape)


def chunk_samples(spec: FieldSpec, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Samples per chunk: the largest power of two whose chunk fits ``chunk_bytes`` (at least 1);
    a text field counts :data:`TEXT_BYTES` per string."""
    return 1 << (max(1, chunk_bytes // max(sample_bytes(spec), 1)).bit_length() - 1)


def choose_shards(specs: Mapping[str, FieldSpec], chunks: Mapping[str, int], total: int | None,
                  shards: Shards = "auto") -> dict[str, int]:
    """Samples per shard of each field to shard (a field left out has a file per chunk).

    - ``"auto"``: the fields that would hold more than :data:`SHARD_MIN_BYTES` in ``total``
      samples (none when ``total`` is unknown) get shards of one length: the power of two of the
      chunks of the field with the largest samples that fills about :data:`SHARD_BYTES`. A field
      whose chunks are that long already (labels) keeps a file per chunk: it has no more files
      than the sharded fields have shards.
    - an int: that many samples per shard for every field whose chunks are shorter (a multiple
      of their length); a mapping: per field. None (or 0): no shards.
    """
    if shards == "auto":
        if not total:
            return {}
        big = [f for f, spec in specs.items() if total * sample_bytes(spec) > SHARD_MIN_BYTES]
        if not big:
            return {}
        largest = max(specs, key=lambda f: sample_bytes(specs[f]))
        per = max(1, SHARD_BYTES // max(1, chunks[largest] * sample_bytes(specs[largest])))
        length = chunks[largest] << (per.bit_length() - 1)
        return {f: length for f in big if chunks[f] < length and length % chunks[f] == 0}
    if not shards:
        return {}
    if isinstance(shards, str | bool):
        raise ConfigError([f"{shards!r}: give 'auto', None, samples per shard or a mapping of "
                           "field to samples per shard"], "shards=")
    wanted = ({f: int(shards) for f in specs if chunks[f] < int(shards)}
              if isinstance(shards, int) else {f: int(n) for f, n in shards.items() if n})
    for f, n in wanted.items():
        if f not in specs:
            raise ConfigError([f"no field {f!r} (fields: {sorted(specs)})"], "shards=")
        if n < 1 or n % chunks[f]:
            raise ConfigError([f"{n} samples per shard for field {f!r} is not a multiple of its "
                               f"chunks of {chunks[f]} samples"], "shards=")
    return wanted


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
        #: the share of each field's chunks read and checked when it was opened: 1.0 every value
        #: (``open_store(verify=True)``, or :func:`encode_store` on a store that was complete
        #: already), less for a sampled check (``verify_fraction``), 0.0 none
        self.verified_fraction = 0.0
        self._memory: dict[str, np.ndarray] | None = None
        self._memory_lock = threading.Lock()

    @property
    def verified(self) -> bool:
        """Every value was read and checked when it was opened (``verified_fraction == 1``)."""
        return self.verified_fraction >= 1.0

    @verified.setter
    def verified(self, value: bool) -> None:
        self.verified_fraction = 1.0 if value else 0.0

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
        except ObjectStoreError:
            raise  # the store cannot be reached: not a damaged chunk
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
               verify_fraction: float = 1.0, verify_seed: int = 0,
               cache_bytes: int = CACHE_BYTES) -> LatentStore:
    """Open a store for reading after validating its schema (and, given ``adapter``, that it
    holds that modality's fields; with ``verify``, also every value, as :func:`check_store`, or
    with ``verify_fraction < 1`` that share of each field's chunks, drawn with ``verify_seed``).
    An invalid or incomplete store is a :class:`StoreError` listing every problem."""
    group = open_group(path, "r")
    problems = schema_problems(group, require_complete=require_complete)
    if not problems and adapter is not None:
        problems = adapter_problems(group.attrs, adapter)
    if not problems and verify:
        problems = data_problems(group, field_specs(group.attrs), int(group.attrs["committed"]),
                                 store_name(path), fraction=verify_fraction, seed=verify_seed)
    if problems:
        raise StoreError(store_name(path), problems)
    store = LatentStore(group, store_name(path), cache_bytes=cache_bytes)
    store.verified_fraction = verify_fraction if verify else 0.0
    return store
