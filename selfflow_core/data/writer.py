"""Writing a latent store: :func:`encode_store` runs a modality's encoder over a raw source and
appends the result with a :class:`StoreWriter` (resumable, one writer at a time, each batch
checked before it is written and committed after). Reading is :mod:`selfflow_core.data.store`;
layout, schema keys and semantics: ``docs/store.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.sync import sync

from selfflow_core.data.check import (
    HASHED_KEYS,
    StoreError,
    StoreLike,
    chunk_problems,
    field_specs,
    is_local,
    is_text,
    open_group,
    scan,
    schema_differences,
    schema_problems,
    store_name,
    store_schema,
    write_unit,
    zarr_target,
)
from selfflow_core.data.objects import ObjectLock, is_object_url
from selfflow_core.data.store import (
    COMPRESSORS,
    LatentStore,
    Shards,
    choose_shards,
    chunk_samples,
    codecs,
    open_store,
)
from selfflow_core.errors import ObjectStoreError
from selfflow_core.interfaces import FieldSpec, ModalityAdapter
from selfflow_core.runtime.locking import LockHeld, PidLock

__all__ = ["EncodedSource", "StoreWriter", "check_existing", "encode_store"]


class _WriteLock:
    """One writer per store. Local paths: a ``<path>.lock``
    :class:`~selfflow_core.runtime.locking.PidLock` (a lock left by a dead process on this host
    is taken over); ``s3://`` URLs: the object ``<url>.lock``, written only if absent
    (:class:`~selfflow_core.data.objects.ObjectLock`). Other stores: a lock within this process
    only."""

    _held: set[str] = set()

    def __init__(self, path: StoreLike) -> None:
        self.name = store_name(path)
        self.file = (f"{os.fspath(path).rstrip('/')}.lock"
                     if is_local(path) or is_object_url(path) else None)
        if self.file is None:
            if self.name in self._held:
                raise StoreError(self.name, ["another writer in this process is writing it"])
            self._held.add(self.name)
            return
        self._lock = PidLock(self.file) if is_local(path) else ObjectLock(path)
        try:
            self._lock.acquire()
        except LockHeld as exc:
            raise StoreError(self.name, [
                f"another writer holds the lock {self.file} ({exc.who}); two writers on one "
                f"store are refused. If none is running, delete {self.file}."]) from None

    def release(self) -> None:
        if self.file is None:
            self._held.discard(self.name)
        else:
            self._lock.release()


class _Pending:
    """Batches held back until they fill whole shards: ``add`` each, ``take(n)`` the first ``n``
    samples as one batch (the rest stay)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []
        self.n = 0

    def add(self, data: dict[str, np.ndarray], n: int) -> None:
        self.parts.append(data)
        self.n += n

    def take(self, n: int) -> dict[str, np.ndarray]:
        data = {k: (np.concatenate([p[k] for p in self.parts]) if len(self.parts) > 1 else v)
                for k, v in self.parts[0].items()}
        self.n -= n
        self.parts = [{k: v[n:] for k, v in data.items()}] if self.n else []
        return {k: v[:n] for k, v in data.items()}


def flush_unit(arrays: Mapping[str, zarr.Array]) -> int:
    """Samples a writer holds back to write whole shards: the least common multiple of the shard
    lengths of the sharded arrays (1: none is sharded, every batch is written as it comes)."""
    return math.lcm(1, *(write_unit(a) for a in arrays.values() if a.shards))


class EncodedSource:
    """A raw source through the adapter's encoder: ``read(start, stop)`` is samples
    ``start..stop`` as the store holds them (encoded ``batch_size`` at a time)."""

    def __init__(self, adapter: ModalityAdapter, raw: Any, batch_size: int = 256) -> None:
        self.adapter, self.raw, self.batch_size = adapter, raw, batch_size

    def __len__(self) -> int:
        return len(self.raw)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        parts = [self.adapter.encode(self.raw.read(i, min(i + self.batch_size, stop)))
                 for i in range(start, stop, self.batch_size)]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


#: the samples re-encoded to tell whether an interrupted store's source still yields them
SAME_SOURCE_SAMPLES = 64
#: float fields: the largest relative difference (L2) between stored and re-encoded samples
#: that still counts as the same data (encoders on accelerators are not bitwise repeatable)
SAME_SOURCE_RTOL = 1e-2


def _same(stored: np.ndarray, fresh: np.ndarray) -> bool:
    fresh = fresh.astype(stored.dtype, copy=False)
    if stored.shape != fresh.shape:
        return False
    if np.array_equal(stored, fresh, equal_nan=stored.dtype.kind in "fc"):
        return True
    if stored.dtype.kind not in "fc" or not (np.isfinite(stored).all()
                                           and np.isfinite(fresh).all()):
        return False
    a, b = stored.astype(np.float64), fresh.astype(np.float64)
    return bool(np.linalg.norm(a - b) <= SAME_SOURCE_RTOL * max(np.linalg.norm(a), 1e-12))


def check_batch(store: str, specs: Mapping[str, FieldSpec],
                batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """``batch`` checked against the schema's fields (names, equal sample counts, per-sample
    shapes, dtypes that cast; text as ``StringDType``) and its sample count; a
    :class:`StoreError` naming the field otherwise."""
    if set(batch) != set(specs):
        raise StoreError(store, [f"batch fields {sorted(batch)} != schema fields "
                                 f"{sorted(specs)}"])
    data = {k: np.asarray(v) for k, v in batch.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in data.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise StoreError(store, [f"batch fields have different sample counts: {sizes}"])
    for name, spec in specs.items():
        value = data[name]
        if tuple(value.shape[1:]) != spec.shape:
            raise StoreError(store, [f"field {name!r}: batch per-sample shape "
                                     f"{tuple(value.shape[1:])} != schema {spec.shape}"])
        if is_text(spec.dtype):
            if value.size and not all(isinstance(x, str) for x in value.reshape(-1).tolist()):
                raise StoreError(store, [f"field {name!r}: a text field takes str values only"])
            data[name] = value.astype(np.dtypes.StringDType())
            continue
        dtype = np.dtype(spec.dtype)
        if not np.can_cast(value.dtype, dtype, casting="same_kind"):
            raise StoreError(store, [f"field {name!r}: batch dtype {value.dtype} cannot be "
                                     f"stored as {dtype}"])
    return data, next(iter(sizes.values()))


class StoreWriter:
    """Appends batches to a store, resumably: a batch counts only once every array holds it and
    the ``committed`` attribute says so; reopening cuts arrays back to ``committed``. Use as a
    context manager (it holds the store's write lock) and call :meth:`finish` at the end.

    ``source`` (an :class:`EncodedSource`, as :func:`encode_store` passes) lets an interrupted
    store continue from a source whose name or description changed, if its last committed samples
    re-encode to the stored values; and :meth:`repair` re-encode damaged chunks. With ``repair``,
    a damaged last chunk of an interrupted store is left for :meth:`repair` instead of refused.

    ``shards`` (new stores): which fields are sharded, many chunks per file (see
    :func:`choose_shards`; ``"auto"`` needs ``total``, the samples the store will hold, and
    shards only fields larger than :data:`SHARD_MIN_BYTES`). The chosen shard lengths are the
    schema's ``shards``. With sharded fields, batches are held back and written a whole shard at
    a time (zarr rewrites a whole shard file on every write into it), so ``committed`` advances
    by whole shards, and :meth:`finish` writes the last, partly filled one."""

    def __init__(self, path: StoreLike, schema: Mapping[str, Any], *,
                 chunks: int | Mapping[str, int] | None = None, compressor: str = "none",
                 source: EncodedSource | None = None, repair: bool = False,
                 shards: Shards = "auto", total: int | None = None) -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {compressor!r}; choose from {list(COMPRESSORS)}")
        self.name = store_name(path)
        self.specs = field_specs(schema)
        self.source = source
        #: the source the store was started from, when it was another (see ``source``)
        self.previous_source: Any = None
        lengths = {name: (chunks if isinstance(chunks, int) else (chunks or {}).get(name))
                   or chunk_samples(spec) for name, spec in self.specs.items()}
        sharded = choose_shards(self.specs, lengths, total, shards)
        self._pending = _Pending()
        self._lock = _WriteLock(path)
        try:
            self.group = self._open(path, {**schema, "shards": sharded})
            fresh = self.group.attrs["committed"] == 0  # new, or stopped while being created
            for name, spec in self.specs.items():
                if fresh and name not in self.group:
                    n = lengths[name]
                    self.group.create_array(
                        name, shape=(0, *spec.shape),
                        dtype=str if is_text(spec.dtype) else spec.dtype, chunks=(n, *spec.shape),
                        shards=(sharded[name], *spec.shape) if name in sharded else None,
                        compressors=codecs(compressor),
                        config={"write_empty_chunks": True})
            problems = schema_problems(self.group, require_complete=False)
            if problems:
                raise StoreError(self.name, [*problems, (
                    f"this cannot be repaired in place: delete {self.name} (or use another "
                    "path) and encode it again")])
            self.count = int(self.group.attrs["committed"])
            #: the plan of an unfinished encode in ranges (``selfflow_core.data.ranges``): its
            #: arrays are full-size and its progress is per range, so nothing is cut back here
            self.ranges: dict[str, Any] | None = (None if self.complete
                                                  else self.group.attrs.get("ranges"))
            # every chunk is written, even one of fill values only (the runtime setting is not
            # stored with the array: it is set on each opening)
            self.arrays = {name: self.group[name].with_config({"write_empty_chunks": True})
                           for name in self.specs}
            #: samples held back and written together, so sharded fields get whole shards
            self.unit = flush_unit(self.arrays)
            layout = {name: write_unit(a) for name, a in self.arrays.items() if a.shards}
            if fresh and self.group.attrs.get("shards", {}) != layout:  # made by another call
                self.group.attrs["shards"] = layout
            if self.ranges is not None and self._changed_source is not None:
                was, now = self._changed_source[0].get("source"), schema["source"]
                raise StoreError(self.name, [
                    f"incomplete (an encode in ranges) and started from source "
                    f"{_describe_source(was)}, now given {_describe_source(now)}; it continues "
                    f"from the original source only. Give it, or delete {self.name} and encode "
                    "it again"])
            if not self.complete and self.ranges is None:
                # the next append rewrites the last, partly filled chunk (of a sharded array:
                # its shard): it must decode (a damaged one is reported, and nothing is written)
                problems = [p for name, arr in self.arrays.items()
                            if self.count % write_unit(arr)
                            for p in chunk_problems(arr, name, _last_file_chunks(arr, self.count),
                                                    self.count, self.name)]
                if problems and not repair:
                    raise StoreError(self.name, [*problems, self.repair_hint])
                if self._changed_source is not None:
                    self._adopt_source(*self._changed_source)
                for arr in self.arrays.values():  # drop whatever an interrupted append left
                    if arr.shape[0] != self.count:
                        arr.resize((self.count, *arr.shape[1:]))
        except BaseException:
            self._lock.release()
            raise

    @property
    def repair_hint(self) -> str:
        return (f"re-encode the damaged chunks from the source with `selfflow encode ... "
                f"--repair` (encode_store(..., repair=True)), or delete {self.name} and encode "
                "it again")

    def _open(self, path: StoreLike, schema: dict[str, Any]) -> zarr.Group:
        self._changed_source = None
        try:
            group = open_group(path, "r+")
        except StoreError:
            target = zarr_target(path, "w-")
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
            if differ == ["source"] and not stored.get("complete") and self.source is not None:
                self._changed_source = (stored, schema)  # checked once the arrays are open
                return group
            state = ("" if stored.get("complete") else
                     f" (it is incomplete: {stored.get('committed')} samples committed)")
            raise StoreError(self.name, [
                f"written with a different configuration{state}: it holds "
                f"{'; '.join(schema_differences(stored, schema))}. Use another path, or delete "
                f"{self.name} to encode it again"])
        return group

    def _adopt_source(self, stored: dict[str, Any], schema: dict[str, Any]) -> None:
        """An interrupted store whose source now has another name or description (e.g. a file
        that failed to decode was removed): it continues from the new source only if the
        source still yields the committed samples (the last ones, re-encoded, equal the stored
        ones: a sample added or removed before them would shift them)."""
        was, now = stored.get("source") or {}, schema["source"]
        assert self.source is not None
        n = len(self.source)
        start = max(0, self.count - SAME_SOURCE_SAMPLES)
        where = (f"the encode was started from source {_describe_source(was)} and is now "
                 f"given {_describe_source(now)}")
        if n < self.count:
            differ = [f"{self.count} samples are committed but the source now has {n}"]
        elif self.count > start:
            fresh = self.source.read(start, self.count)
            differ = []
            for name, arr in self.arrays.items():
                try:
                    stored_values = np.asarray(arr[start:self.count])
                except ObjectStoreError:
                    raise  # the store cannot be reached: not a damaged chunk
                except Exception:  # noqa: BLE001 - a damaged chunk: name it
                    step = arr.chunks[0]
                    raise StoreError(self.name, [*chunk_problems(
                        arr, name, list(range(start // step, -(-self.count // step))),
                        self.count, self.name), f"{where}; the committed samples cannot be "
                        f"read to compare them: delete {self.name} and encode it again"]) from None
                if not _same(stored_values, np.asarray(fresh[name])):
                    differ.append(name)
        else:
            differ = []
        if differ:
            raise StoreError(self.name, [
                f"incomplete ({self.count} samples committed) and {where}; the committed "
                f"samples do not match what the source gives now ({', '.join(differ)} of samples "
                f"{start}..{self.count - 1} differ), so the encode cannot continue from it. "
                f"Delete {self.name} and encode it again (or give the original source)"])
        self.previous_source = was
        self.group.attrs.update({"source": now, "config_hash": schema["config_hash"]})

    @property
    def complete(self) -> bool:
        """Whether the completeness marker is set (nothing more can be appended)."""
        return bool(self.group.attrs["complete"])

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append one batch: an array per field, sample axis first, equal lengths."""
        if self.complete:
            raise StoreError(self.name, ["is complete; nothing can be appended"])
        if self.ranges is not None:
            raise StoreError(self.name, [
                "is being encoded in ranges (a parallel encode), so nothing can be appended; "
                "continue it with encode_store or `selfflow encode` (with any --workers)"])
        data, n = check_batch(self.name, self.specs, batch)
        if self.unit == 1:
            self._write(data, n)
            return
        self._pending.add(data, n)  # written once it ends a whole shard of every sharded field
        end = self.count + self._pending.n
        if end - end % self.unit > self.count:
            n = end - end % self.unit - self.count
            self._write(self._pending.take(n), n)

    def _write(self, data: Mapping[str, np.ndarray], n: int) -> None:
        start, stop = self.count, self.count + n
        for name, arr in self.arrays.items():
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = data[name].astype(arr.dtype, copy=False)
        self.group.attrs["committed"] = stop  # the commit point: written after every array
        self.count = stop

    def scan(self, fraction: float = 1.0,
             seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
        """Read of the committed samples (all, or a sampled ``fraction`` of each field's chunks:
        see :func:`~selfflow_core.data.check.scan`): every problem (unreadable or missing chunks,
        NaN/Inf) and the damaged chunks as ``(field, chunk index)``."""
        return scan(self.group, self.specs, self.count, self.name, fraction=fraction, seed=seed)

    def repair(self, damaged: list[tuple[str, int]]) -> list[str]:
        """Re-encode each damaged ``(field, chunk)`` from ``source`` and write it anew (the old
        chunk file is deleted first, so a damaged one is never read; of a sharded field, the
        whole shard holding it). Returns what was done, one line per chunk (shard). The rest of
        the store is not touched."""
        if self.source is None:
            raise StoreError(self.name, ["cannot repair: no source to re-encode from"])
        if len(self.source) < self.count:
            raise StoreError(self.name, [f"cannot repair: {self.count} samples are committed "
                                         f"but the source has {len(self.source)}"])
        files: dict[tuple[str, int], list[int]] = {}
        for name, k in damaged:
            per = write_unit(self.arrays[name]) // self.arrays[name].chunks[0]
            files.setdefault((name, k // per), []).append(k)
        done = []
        for (name, f), ks in files.items():
            arr = self.arrays[name]
            unit = write_unit(arr)
            start, stop = f * unit, min((f + 1) * unit, self.count)
            values = np.asarray(self.source.read(start, stop)[name]).astype(arr.dtype,
                                                                            copy=False)
            _delete_chunk(arr, ks[0])
            arr[start:stop] = values
            if arr.shards:
                listed = ", ".join(map(str, sorted(set(ks))))
                done.append(f"field {name!r}: shard {f} (samples {start}..{stop - 1}; damaged "
                            f"chunk {listed}) re-encoded from the source")
            else:
                done.append(f"field {name!r}: chunk {f} (samples {start}..{stop - 1}) "
                            "re-encoded from the source")
        return done

    def finish(self) -> None:
        """Write what is held back (the last, partly filled shard), then the completeness marker
        (last): the store is now readable for training."""
        if self._pending.n:
            n = self._pending.n
            self._write(self._pending.take(n), n)
        self.group.attrs.update({"complete": True, "count": self.count})

    def close(self) -> None:
        """Release the write lock."""
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe_source(source: Any) -> str:
    if not isinstance(source, Mapping):
        return repr(source)
    described = f" ({source['description']})" if source.get("description") else ""
    return f"{source.get('name')!r}{described}"


def _last_file_chunks(arr: zarr.Array, count: int) -> list[int]:
    """The chunks of the file (chunk, or shard) that holds sample ``count - 1``, up to it."""
    step, unit = arr.chunks[0], write_unit(arr)
    return list(range((count - count % unit) // step, (count - 1) // step + 1))


def _delete_chunk(arr: zarr.Array, k: int) -> None:
    """Delete the file of chunk ``k``: its chunk file, or the shard file holding it."""
    k //= write_unit(arr) // arr.chunks[0]
    key = arr.metadata.encode_chunk_key((k, *([0] * (arr.ndim - 1))))
    prefix = arr.store_path.path
    sync(arr.store_path.store.delete(f"{prefix}/{key}" if prefix else key))


def check_existing(writer: StoreWriter, *, verify: bool, repair: bool,
                   say: Callable[[str], None], fraction: float = 1.0, seed: int = 0) -> float:
    """With ``verify`` or ``repair``, read the committed samples before writing more (``verify``
    alone: a sampled ``fraction`` of each field's chunks, drawn with ``seed``; ``repair``: all):
    a damaged chunk (or NaN/Inf) is a :class:`StoreError` naming it, or with ``repair`` is
    re-encoded from the source. Returns the share of the (complete) store's chunks read: 1.0 the
    whole store, 0.0 none (incomplete, or not asked)."""
    fraction = 1.0 if repair else fraction
    verified = fraction if (verify or repair) and writer.complete else 0.0  # read below
    if (verify or repair) and writer.count:
        problems, damaged = writer.scan(fraction, seed)
        if damaged and repair:
            for line in writer.repair(damaged):
                say(line)
            problems, damaged = writer.scan()
            if problems:
                problems.append("re-encoding the damaged chunks from the source did not "
                                "help (the encoder gives these values)")
        elif damaged:
            problems.append(writer.repair_hint)
        if problems:
            raise StoreError(writer.name, problems)
    return verified


def reporter(path: StoreLike, progress: bool) -> Callable[[str], None]:
    """``say(message)``: one line about the store at ``path`` on stderr (none without
    ``progress``), written so progress bars stay intact."""
    name = store_name(path)

    def say(message: str) -> None:
        if progress:
            tqdm.write(f"store {name}: {message}", file=sys.stderr)

    return say


@contextlib.contextmanager
def writing(adapter: ModalityAdapter, raw: Any, path: StoreLike, schema: Mapping[str, Any], *,
            batch_size: int, chunks: int | Mapping[str, int] | None, shards: Shards,
            compressor: str, repair: bool, verify: bool, fraction: float, seed: int,
            say: Callable[[str], None]) -> Iterator[tuple[StoreWriter, float]]:
    """The store's writer (holding its lock) for encoding ``raw`` with ``adapter``, once the
    samples already committed are checked (:func:`check_existing`), and the share of the
    store's chunks that check read."""
    with StoreWriter(path, schema, chunks=chunks, shards=shards, total=len(raw),
                     compressor=compressor, source=EncodedSource(adapter, raw, batch_size),
                     repair=repair) as writer:
        if writer.previous_source is not None:
            say(f"the source was {_describe_source(writer.previous_source)}; it still yields "
                f"the {writer.count} committed samples, so the encode continues from it")
        yield writer, check_existing(writer, verify=verify, repair=repair, say=say,
                                     fraction=fraction, seed=seed)


def _ready(path: StoreLike, schema: Mapping[str, Any], verify: bool, fraction: float,
           seed: int) -> LatentStore | None:
    """The store at ``path`` opened for reading when it is complete, made with ``schema``'s
    configuration and (with ``verify``) undamaged: nothing to write, so no write lock is taken
    and any number of trainers may start on it at once. None when it needs the writer (missing,
    incomplete, another configuration, left-overs of an encode in ranges, a damaged chunk), which
    then says why."""
    try:
        group = open_group(path, "r")
    except StoreError:
        return None
    stored = group.attrs
    if (stored.get("complete") is not True or stored.get("config_hash") != schema["config_hash"]
            or "_encode" in set(group.group_keys())):
        return None
    try:
        return open_store(path, verify=verify, verify_fraction=fraction, verify_seed=seed)
    except StoreError:
        return None


def encode_store(adapter: ModalityAdapter, source: str, path: StoreLike, *,
                 adapter_config: Mapping[str, Any], batch_size: int = 256, progress: bool = True,
                 chunks: int | Mapping[str, int] | None = None, shards: Shards = "auto",
                 compressor: str = "none", verify: bool = True, verify_fraction: float = 1.0,
                 verify_seed: int = 0, repair: bool = False, workers: int = 1,
                 distributed: bool = False) -> LatentStore:
    """Encode ``adapter.open_source(source)`` into the store at ``path`` and open it.

    - An interrupted encode resumes from its committed samples (also when the source's name or
      description changed, if it still yields them: see :class:`StoreWriter`).
    - A complete store with the same configuration is returned as is; one with another
      configuration is a :class:`StoreError` saying how it differs.
    - ``verify`` (default): the samples already in the store are read first; a damaged chunk
      (or NaN/Inf) is a :class:`StoreError` naming it, so a damaged store is never returned
      as complete. ``repair`` re-encodes those chunks from the source instead.
      ``verify_fraction < 1``: only that share of each field's chunks is read, drawn with
      ``verify_seed`` (every chunk file is still looked for; ``repair`` reads all).
    - ``chunks``, ``shards``, ``compressor``: the layout of a new store (:class:`StoreWriter`;
      ``shards="auto"`` shards the fields larger than :data:`SHARD_MIN_BYTES`).
    - ``workers > 1``: encoded in chunk-aligned ranges by that many spawned processes (the
      adapter is pickled to each); ``distributed``: this process is one rank of a ``torchrun``
      encoding its share of the ranges (every rank calls this). Resumable per range; an
      interrupted encode in ranges is continued by any call, with any number of workers. See
      :mod:`selfflow_core.data.ranges`.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 or distributed:
        from selfflow_core.data.ranges import encode_parallel

        return encode_parallel(adapter, source, path, adapter_config=adapter_config,
                               batch_size=batch_size, progress=progress, chunks=chunks,
                               shards=shards, compressor=compressor, verify=verify,
                               verify_fraction=verify_fraction, verify_seed=verify_seed,
                               repair=repair, workers=workers, distributed=distributed)
    raw = adapter.open_source(source)
    schema = store_schema(adapter, source=source, source_description=raw.description,
                          adapter_config=adapter_config)
    if not repair and (store := _ready(path, schema, verify, verify_fraction, verify_seed)):
        return store
    say = reporter(path, progress)
    with writing(adapter, raw, path, schema, batch_size=batch_size, chunks=chunks, shards=shards,
                 compressor=compressor, repair=repair, verify=verify, fraction=verify_fraction,
                 seed=verify_seed, say=say) as (writer, verified):
        if writer.complete and "_encode" in set(writer.group.group_keys()):
            from selfflow_core.data.ranges import cleanup

            cleanup(writer.group)  # what an encode in ranges stopped right after its marker left
        if writer.ranges is not None:  # an interrupted encode in ranges: continued here
            from selfflow_core.data.ranges import _Here, encode_ranges

            job = {"path": path, "adapter": adapter, "source": source,
                   "adapter_config": dict(adapter_config), "batch_size": batch_size}
            encode_ranges(writer, _Here(), job, total=len(raw), verify=verify, repair=repair,
                          progress=progress, say=say, fraction=verify_fraction, seed=verify_seed)
        elif not writer.complete:
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
    store = open_store(path)
    store.verified_fraction = verified
    return store
