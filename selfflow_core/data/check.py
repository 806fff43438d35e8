"""Schema and validation of latent stores: what the group attributes hold, the problems
:func:`~selfflow_core.data.store.open_store` refuses and :func:`check_store` lists.

Every problem is one line naming the field and, where it applies, the sample index, so that a
:class:`StoreError` tells exactly what is wrong with which store. See ``docs/store.md``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import Store, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from selfflow_core.data.objects import S3ZarrStore, is_object_url
from selfflow_core.errors import ConfigError, ObjectStoreError, StoreError
from selfflow_core.interfaces import FieldSpec, ModalityAdapter
from selfflow_core.prompts import EMPTY_PROMPT, TEXT_EMBEDDINGS, record_problems

#: the newest layout this selfflow reads and the one it writes
FORMAT_VERSION = 1
#: group attributes every store carries
REQUIRED_KEYS = ("format_version", "modality", "fields", "config_hash", "committed", "complete")
StoreLike = str | os.PathLike | Store
#: the schema keys that identify what a store holds; their hash must match to resume or re-run
HASHED_KEYS = ("format_version", "modality", "fields", "num_classes", "encoder", "normalization",
               "adapter_config", "source")
_MAX_LISTED = 10


def store_name(path: StoreLike) -> str:
    """How a store is named in messages: the local path, the URL, or the in-memory store's URL."""
    return str(path) if isinstance(path, Store) else os.fspath(path)


def is_local(path: StoreLike) -> bool:
    """Whether ``path`` is a local filesystem path (not a store object or a URL)."""
    return not isinstance(path, Store) and "://" not in os.fspath(path)


def zarr_target(path: StoreLike, mode: str = "r") -> str | Store:
    """What zarr opens for ``path``: a local path as a string, an ``s3://`` URL as an
    :class:`~selfflow_core.data.objects.S3ZarrStore` (credentials from the environment, see
    :mod:`selfflow_core.data.objects`), any other URL or store as given."""
    if is_object_url(path):
        return S3ZarrStore(path, read_only=mode == "r")
    return os.fspath(path) if is_local(path) else path


def open_group(path: StoreLike, mode: str = "r") -> zarr.Group:
    """Open the store's zarr group; a missing path or a non-group is a :class:`StoreError`
    (a store in object storage that cannot be reached: an :class:`ObjectStoreError`)."""
    name = store_name(path)
    if is_local(path) and mode == "r" and not os.path.exists(path):
        raise StoreError(name, [f"no such store: {name} does not exist"])
    target = zarr_target(path, mode)
    if isinstance(target, S3ZarrStore) and not target.probe() and mode == "r":
        raise StoreError(name, [f"no such store: nothing is stored at {name}"])
    try:
        return zarr.open_group(target, mode=mode)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.ContainsArrayError) as e:
        raise StoreError(name, [f"not a zarr group ({type(e).__name__}: {e})"]) from None


def _plain(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"store schema: {where} is not plain JSON data ({e})") from None


#: the ``FieldSpec.dtype`` of a variable-length UTF-8 text field (e.g. ``captions``)
TEXT_DTYPE = "str"


def is_text(dtype: Any) -> bool:
    """Whether ``dtype`` (a schema name, or a numpy/zarr dtype) is the text field dtype."""
    return str(dtype) == TEXT_DTYPE or np.dtype(dtype).kind in "UT"


def config_hash(schema: Mapping[str, Any]) -> str:
    """Hash of what the store holds (:data:`HASHED_KEYS`): equal hashes mean the same encoding."""
    data = json.dumps({k: schema.get(k) for k in HASHED_KEYS}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def store_schema(adapter: ModalityAdapter, *, source: str, source_description: str,
                 adapter_config: Mapping[str, Any]) -> dict[str, Any]:
    """The group attributes describing a store of ``adapter``'s fields encoded from ``source``."""
    schema = {
        "format_version": FORMAT_VERSION, "modality": adapter.name,
        "fields": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name}
                   for k, s in adapter.fields().items()},
        "num_classes": int(adapter.num_classes),
        "encoder": _plain(dict(adapter.encoder_info()), "encoder_info()"),
        "normalization": _plain(dict(adapter.normalization()), "normalization()"),
        "adapter_config": _plain(dict(adapter_config), "adapter_config"),
        "source": {"name": source, "description": source_description},
    }
    # written once, outside the hash: what the adapter derives from its configuration (the
    # frozen text encoder's encoding of the empty prompt)
    extras = _plain(dict(getattr(adapter, "schema_extras", dict)()), "schema_extras()")
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {**schema, **extras, "config_hash": config_hash(schema), "created_at": created}


def field_specs(schema: Mapping[str, Any]) -> dict[str, FieldSpec]:
    """The schema's fields as :class:`FieldSpec` by name."""
    return {k: FieldSpec(shape=tuple(v["shape"]), dtype=str(v["dtype"]))
            for k, v in schema["fields"].items()}


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def field_text(shape: Any, dtype: Any) -> str:
    """A field in words: ``[16, 8] float32`` (a scalar per sample: ``[] int64``)."""
    return f"{list(shape)} {dtype}"


def fields_text(fields: Any) -> str:
    """The schema's ``fields`` in words: ``latents [16, 8] float32, labels [] int64``."""
    try:
        return ", ".join(f"{k} {field_text(v['shape'], v['dtype'])}" for k, v in fields.items())
    except (AttributeError, KeyError, TypeError):
        return _value(fields)


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        return {k: v for key, item in value.items()
                for k, v in _leaves(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def schema_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                       limit: int = 8) -> list[str]:
    """How the store's identifying keys (:data:`HASHED_KEYS`) differ from ``wanted``, in words:
    ``modality 'audio', expected 'image'``, ``field 'latents' [1, 8, 8] float32, expected
    [4, 8, 8] float32``, ``adapter_config.seed 0, expected 1``. Another modality is said with
    its fields only (the rest differs too); at most ``limit`` lines, then how many more."""
    keys = HASHED_KEYS
    if stored.get("modality") != wanted.get("modality"):
        keys = ("modality", "fields")
    out, more = [], {}
    for key in keys:
        have, want = stored.get(key), wanted.get(key)
        if have == want:
            continue
        if key == "fields":
            same_names = (isinstance(have, Mapping) and isinstance(want, Mapping)
                          and list(have) == list(want))
            if same_names:
                diffs = [f"field {k!r} {fields_text({k: have[k]})[len(k) + 1:]}, expected "
                         f"{fields_text({k: want[k]})[len(k) + 1:]}"
                         for k in have if have[k] != want[k]]
            else:
                diffs = [f"fields ({fields_text(have)}), expected ({fields_text(want)})"]
        elif isinstance(have, Mapping) and isinstance(want, Mapping):
            x, y = _leaves(have, key), _leaves(want, key)
            diffs = [f"{k} {_value(x[k]) if k in x else '(not set)'}, expected "
                     f"{_value(y[k]) if k in y else '(not set)'}"
                     for k in sorted(set(x) | set(y)) if x.get(k, ...) != y.get(k, ...)]
        else:
            diffs = [f"{key} {_value(have)}, expected {_value(want)}"]
        room = max(0, limit - len(out))
        out += diffs[:room]
        if len(diffs) > room:
            more[key] = len(diffs) - room
    if more:
        out.append(f"and {sum(more.values())} more difference(s) in {', '.join(more)}")
    return out


def schema_problems(group: zarr.Group, *, require_complete: bool = True) -> list[str]:
    """Cheap checks (metadata only): format version, schema keys, arrays, dtypes, shapes, lengths,
    completeness."""
    attrs = dict(group.attrs)
    version = attrs.get("format_version")
    if version is None:
        return ["not a selfflow latent store (no 'format_version' in the group attributes)"]
    if not isinstance(version, int) or isinstance(version, bool):
        return [f"format_version {version!r} is not an integer"]
    if version > FORMAT_VERSION:
        return [f"written by a newer selfflow (format {version} > {FORMAT_VERSION}); "
                "upgrade selfflow to read it"]
    missing = [k for k in REQUIRED_KEYS if k not in attrs]
    if missing:
        return [f"schema key(s) missing from the group attributes: {missing}"]
    try:
        specs = field_specs(attrs)
    except (AttributeError, KeyError, TypeError) as e:
        return [f"malformed 'fields' in the schema: {type(e).__name__}: {e}"]
    problems = []
    committed, complete, count = attrs["committed"], attrs["complete"], attrs.get("count")
    if complete and count != committed:
        problems.append(f"completeness marker says {count} samples but {committed} are committed")
    arrays = dict(group.arrays())
    for name, spec in specs.items():
        arr = arrays.get(name)
        if arr is None:
            problems.append(f"field {name!r}: array missing")
            continue
        if (is_text(arr.dtype) != is_text(spec.dtype)
                or not is_text(spec.dtype) and np.dtype(arr.dtype) != np.dtype(spec.dtype)):
            problems.append(f"field {name!r}: dtype {arr.dtype} but the schema says {spec.dtype}")
        if tuple(arr.shape[1:]) != spec.shape:
            problems.append(f"field {name!r}: per-sample shape {tuple(arr.shape[1:])} but the "
                            f"schema says {spec.shape}")
        if arr.shape[0] < committed:
            problems.append(f"field {name!r}: {arr.shape[0]} samples, fewer than the {committed} "
                            "committed (samples were lost)")
        elif complete and arr.shape[0] != committed:
            problems.append(f"field {name!r}: {arr.shape[0]} samples but the store is complete "
                            f"with {committed}")
    problems += [f"unknown array {name!r} (not a field of the schema)"
                 for name in sorted(set(arrays) - set(specs))]
    if TEXT_EMBEDDINGS in specs:  # a frozen text encoder's store keeps its empty prompt
        problems += record_problems(attrs.get(EMPTY_PROMPT), specs)
    if require_complete and not complete and "ranges" in attrs:  # see data/ranges.py
        problems.append("incomplete: an encode in ranges (over several processes) has not "
                        "finished, so there is no completeness marker (run it again to resume)")
    elif require_complete and not complete:
        problems.append(f"incomplete: {committed} samples committed and no completeness marker "
                        "(the encode was interrupted; run it again to resume)")
    return problems


def adapter_problems(schema: Mapping[str, Any], adapter: ModalityAdapter) -> list[str]:
    """Whether a store was written for ``adapter``: same modality and fields."""
    if schema.get("modality") != adapter.name:
        return [f"modality {schema.get('modality')!r}, but the adapter is {adapter.name!r}"]
    stored, wanted = field_specs(schema), {k: FieldSpec(shape=tuple(s.shape), dtype=str(s.dtype))
                                           for k, s in adapter.fields().items()}

    def text(spec: FieldSpec | None) -> str:
        return "no such field" if spec is None else field_text(spec.shape, spec.dtype)

    return [f"field {k!r}: store has {text(stored.get(k))}, the adapter expects "
            f"{text(wanted.get(k))}"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


def write_unit(arr: zarr.Array) -> int:
    """Samples in one file of ``arr``: its shard length when it is sharded, else its chunk
    length (what a writer writes whole and a repair re-encodes)."""
    return int((arr.shards or arr.chunks)[0])


def _chunks_present(arr: zarr.Array) -> set[int] | None:
    """Indices (along the sample axis) of the files stored for ``arr``: its chunks, or its
    shards when it is sharded; None if the store cannot list them."""
    prefix = f"{arr.store_path.path}/c/" if arr.store_path.path else "c/"

    async def keys() -> list[str]:
        return [k async for k in arr.store_path.store.list_prefix(prefix)]

    try:
        found = sync(keys())
    except ObjectStoreError:
        raise  # the store cannot be reached: not a missing chunk
    except Exception:  # noqa: BLE001 - some stores cannot list; then this check is skipped
        return None
    return {int(k[len(prefix):].split("/")[0]) for k in found
            if k[len(prefix):].split("/")[0].isdigit()}


def shard_index_layout(arr: zarr.Array) -> int | None:
    """The byte size of a shard's index when ``arr`` is sharded with the index this writer
    makes (at the end of the shard file: little-endian uint64 ``(offset, length)`` per inner
    chunk, then its CRC-32C); None otherwise (unsharded, or another index layout)."""
    codecs = getattr(arr.metadata, "codecs", ())
    if not (len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) and arr.shards):
        return None
    index = codecs[0].index_codecs
    if not (codecs[0].index_location.value == "end" and len(index) == 2
            and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)
            and (index[0].endian is None or index[0].endian.value == "little")):
        return None
    return 16 * math.prod(s // c for s, c in zip(arr.shards, arr.chunks, strict=True)) + 4


def parse_shard_index(data: bytes, per_shard: int) -> np.ndarray | None:
    """A shard index's bytes (see :func:`shard_index_layout`) as ``(per_shard, 2)`` offsets and
    lengths (``2**64 - 1``: the chunk is not stored), or None when it fails its checksum."""
    if len(data) != 16 * per_shard + 4:
        return None
    if int.from_bytes(data[-4:], "little") != google_crc32c.value(bytes(data[:-4])):
        return None
    return np.frombuffer(data[:-4], "<u8").reshape(per_shard, 2)


class _Stored:
    """Which chunks of ``arr`` are stored: its files (chunk files, or shard files when sharded)
    listed once; for a sharded array also each shard's index, read when first asked (a chunk
    missing from it would read as fill values; a damaged index makes every chunk of the shard
    unreadable)."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr = arr
        self.files = _chunks_present(arr)
        self.per_file = write_unit(arr) // int(arr.chunks[0])
        self.index_bytes = shard_index_layout(arr)
        self._indexes: dict[int, np.ndarray | str | None] = {}

    def file_missing(self, k: int) -> bool:
        return self.files is not None and k // self.per_file not in self.files

    def _index(self, shard: int) -> np.ndarray | str | None:
        """The shard's index, ``"damaged"`` (it fails its checksum), or None (not known)."""
        if shard not in self._indexes:
            arr = self.arr
            key = arr.metadata.encode_chunk_key((shard, *([0] * (arr.ndim - 1))))
            key = f"{arr.store_path.path}/{key}" if arr.store_path.path else key
            try:
                buf = sync(arr.store_path.store.get(key, default_buffer_prototype(),
                                                    SuffixByteRequest(self.index_bytes)))
            except ObjectStoreError:
                raise  # the store cannot be reached: not a damaged shard
            except Exception:  # noqa: BLE001 - e.g. shorter than an index: damaged
                buf = b""
            data = buf if buf is None or isinstance(buf, bytes) else buf.to_bytes()
            index = None if data is None else parse_shard_index(data, self.per_file)
            self._indexes[shard] = "damaged" if data is not None and index is None else index
        return self._indexes[shard]

    def missing(self, k: int) -> str | None:
        """How chunk ``k`` is not there to read, if it is not: ``"missing"`` (its file, or its
        shard file), ``"missing from its shard"``, ``"damaged index"``."""
        if self.file_missing(k):
            return "missing"
        if self.index_bytes is None or self.files is None:
            return None
        index = self._index(k // self.per_file)
        if isinstance(index, str):
            return "damaged index"
        if index is not None and int(index[k % self.per_file, 0]) == 2**64 - 1:
            return "missing from its shard"
        return None


def _listed(indices: list[int]) -> str:
    more = f" and {len(indices) - _MAX_LISTED} more" if len(indices) > _MAX_LISTED else ""
    return ", ".join(map(str, indices[:_MAX_LISTED])) + more


def _file_path(arr: zarr.Array, f: int, store: str | None) -> str:
    """Where file ``f`` (along the sample axis: a chunk, or a shard) of ``arr`` lives."""
    key = arr.metadata.encode_chunk_key((f, *([0] * (arr.ndim - 1))))
    key = f"{arr.path}/{key}" if arr.path else key
    if store is not None and is_object_url(store):
        return f"{store.rstrip('/')}/{key}"
    return os.path.join(store, key) if store is not None and "://" not in store else key


def _chunk_file(arr: zarr.Array, k: int, store: str | None) -> str:
    """Where chunk ``k`` (along the sample axis) of ``arr`` lives: its path or key; for a sharded
    array its shard file's, and which inner chunk of it it is."""
    if not arr.shards:
        return _file_path(arr, k, store)
    per = write_unit(arr) // int(arr.chunks[0])
    return f"shard file {_file_path(arr, k // per, store)}, inner chunk {k % per} of {per}"


def nonfinite_problem(name: str, values: np.ndarray, samples: np.ndarray) -> str | None:
    """The problem line for NaN/Inf in ``values`` (rows are the samples ``samples``), if any."""
    if values.dtype.kind not in "fc" or not len(values):
        return None
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if finite.all():
        return None
    bad = np.asarray(samples)[~finite].tolist()
    return (f"field {name!r}: NaN/Inf at sample index {_listed(bad)} ({len(bad)} sample(s)); "
            "`selfflow store check` lists every damaged sample")


def _where(arr: zarr.Array, name: str, k: int, count: int) -> str:
    step = arr.chunks[0]
    return f"field {name!r}: chunk {k} (samples {k * step}..{min((k + 1) * step, count) - 1})"


def _missing_problem(arr: zarr.Array, name: str, k: int, count: int, how: str,
                     store: str | None) -> str:
    """The problem line of chunk ``k`` not there to read (``how``: see :meth:`_Stored.missing`);
    one for all chunks of a shard whose file is missing or whose index is damaged."""
    if arr.shards and how in ("missing", "damaged index"):
        step, unit = int(arr.chunks[0]), write_unit(arr)
        f = k // (unit // step)
        last = min((f + 1) * unit, count) - 1
        where = (f"field {name!r}: shard {f} (chunks {f * unit // step}..{last // step}, "
                 f"samples {f * unit}..{last})")
        what = ("is missing (it would read as fill values)" if how == "missing" else
                "is unreadable (truncated or corrupt: its index fails its checksum)")
        return f"{where} {what}: shard file {_file_path(arr, f, store)}"
    return (f"{_where(arr, name, k, count)} is {how} (it would read as fill values): "
            f"{_chunk_file(arr, k, store)}")


def _read_chunk(arr: zarr.Array, name: str, k: int, count: int, present: _Stored | None,
                store: str | None) -> tuple[np.ndarray | None, str | None]:
    """Chunk ``k`` of ``arr`` (its samples below ``count``), or the problem that it is missing
    or cannot be decoded (truncated, corrupt, checksum mismatch), naming its file (for a
    sharded array: its shard file and which chunk inside)."""
    step = arr.chunks[0]
    start, stop = k * step, min((k + 1) * step, count)
    if present is not None and (how := present.missing(k)):
        return None, _missing_problem(arr, name, k, count, how, store)
    try:
        return np.asarray(arr[start:stop]), None
    except ObjectStoreError:
        raise  # the store cannot be reached: not a damaged chunk
    except Exception as e:  # noqa: BLE001 - any decode error means a damaged chunk
        return None, (f"{_where(arr, name, k, count)} is unreadable (truncated or corrupt: "
                      f"{_chunk_file(arr, k, store)}): {type(e).__name__}: {e}")


def chunk_problems(arr: zarr.Array, name: str, chunks: list[int], count: int,
                   store: str | None = None) -> list[str]:
    """Missing or undecodable chunks among ``chunks`` (indices along the sample axis; one line
    for all the chunks of a shard that is missing or whose index is damaged)."""
    present = _Stored(arr)
    found = (_read_chunk(arr, name, k, count, present, store)[1] for k in chunks)
    return list(dict.fromkeys(p for p in found if p))


def sample_chunks(n: int, fraction: float = 1.0, seed: int = 0, name: str = "") -> range | set[int]:
    """The chunks (of ``n``) of field ``name`` a check reading ``fraction`` of them reads: all
    at 1, else ``ceil(fraction * n)`` drawn by a generator seeded by ``(seed, name)`` (the same
    for the same seed), the last chunk (the partly filled one) always among them."""
    if not 0 < fraction <= 1:  # refuses nan
        raise ConfigError([f"{fraction!r}: the share of chunks to check must be in (0, 1]"],
                          "the fraction of a sampled check")
    if fraction >= 1 or n <= 1:
        return range(n)
    want = min(n, max(1, math.ceil(fraction * n)))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return {n - 1, *map(int, rng.choice(n - 1, size=want - 1, replace=False))}


def scan(group: zarr.Group, specs: Mapping[str, FieldSpec], count: int,
         store: str | None = None, *, fraction: float = 1.0,
         seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan of samples ``0..count``: the problems (missing or unreadable chunks, a checksum
    mismatch included; NaN/Inf per sample) and the damaged chunks as ``(field, chunk index)``,
    those holding NaN/Inf included (what re-encoding them from the source would replace).

    ``fraction < 1``: a sampled check. Every chunk's file is still looked for (the store's
    listing: a missing chunk or shard file is found wherever it is), but only the chunks
    :func:`sample_chunks` draws with ``seed`` are read (decoded, checksum verified, NaN/Inf)."""
    problems, damaged = [], []
    for name in specs:
        arr = group[name]
        step, n = arr.chunks[0], min(count, arr.shape[0])
        present = _Stored(arr)
        total = -(-n // step)
        chosen = sample_chunks(total, fraction, seed, name)
        bad: list[int] = []
        for k in range(total):
            if k not in chosen:
                if present.file_missing(k):
                    problem = _missing_problem(arr, name, k, n, "missing", store)
                    problems += [problem] if problem not in problems[-1:] else []
                    damaged.append((name, k))
                continue
            block, problem = _read_chunk(arr, name, k, n, present, store)
            if problem:
                problems += [problem] if problem not in problems[-1:] else []  # (one a shard)
                damaged.append((name, k))
            elif block.dtype.kind in "fc":
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                if not finite.all():
                    bad += (np.flatnonzero(~finite) + k * step).tolist()
                    damaged.append((name, k))
        if bad:
            problems.append(f"field {name!r}: NaN/Inf at sample index {_listed(bad)} "
                            f"({len(bad)} sample(s))")
    return problems, damaged


def data_problems(group: zarr.Group, specs: Mapping[str, FieldSpec], count: int,
                  store: str | None = None, *, fraction: float = 1.0,
                  seed: int = 0) -> list[str]:
    """Scan of samples ``0..count`` (all of it, or a sampled ``fraction`` of each field's
    chunks: see :func:`scan`): missing or unreadable chunks (a checksum mismatch included),
    NaN/Inf per sample."""
    return scan(group, specs, count, store, fraction=fraction, seed=seed)[0]


def check_store(path: StoreLike, *, require_complete: bool = True, fraction: float = 1.0,
                seed: int = 0) -> list[str]:
    """Every problem of the store at ``path`` (empty: usable): schema, arrays, dtypes, shapes,
    completeness, then a full read finding damaged chunks and NaN/Inf per field and sample index
    (``fraction < 1``: a sampled read of that share of each field's chunks, drawn with ``seed``;
    every chunk file is still looked for, see :func:`scan`)."""
    try:
        group = open_group(path, "r")
    except StoreError as e:
        return e.problems
    problems = schema_problems(group, require_complete=require_complete)
    attrs = dict(group.attrs)
    if any(k not in attrs for k in REQUIRED_KEYS) or attrs["format_version"] != FORMAT_VERSION:
        return problems
    try:
        specs = {k: s for k, s in field_specs(attrs).items() if k in set(group.array_keys())}
    except (AttributeError, KeyError, TypeError):
        return problems
    return problems + data_problems(group, specs, int(attrs["committed"]), store_name(path),
                                    fraction=fraction, seed=seed)


def _codec_text(codec: Any) -> str:
    data = codec.to_dict()
    config = data.get("configuration", {})
    if data["name"] == "blosc":
        return f"blosc-{config.get('cname')} level {config.get('clevel')}"
    level = f" level {config['level']}" if "level" in config else ""
    return f"{data['name']}{level}"


def describe_store(path: StoreLike) -> list[str]:
    """What the store at ``path`` holds, one ``key: value`` line each (modality, encoder,
    source, samples and completeness, each field's shape, dtype, chunking and codecs); empty
    when it is not a readable selfflow store. Metadata only: reads no chunk."""
    try:
        group = open_group(path, "r")
    except StoreError:
        return []
    a = dict(group.attrs)
    if "format_version" not in a:
        return []
    lines = [f"format: {a.get('format_version')}"]
    classes = a.get("num_classes")
    lines.append(f"modality: {a.get('modality')!r}"
                 + (f", {classes} classes" if classes else ", unconditional"))
    encoder = dict(a.get("encoder") or {})
    name, version = encoder.pop("name", "?"), encoder.pop("version", "?")
    settings = ", ".join(f"{k} {_value(v)}" for k, v in encoder.items())
    lines.append(f"encoder: {name!r} version {version}" + (f" ({settings})" if settings else ""))
    norm = a.get("normalization") or {}
    lines.append("normalization: " + (", ".join(f"{k} {_value(v)}" for k, v in norm.items())
                                      or "none"))
    source = a.get("source") or {}
    if isinstance(source, Mapping):
        described = f" ({source['description']})" if source.get("description") else ""
        lines.append(f"source: {source.get('name')!r}{described}")
    committed, complete = a.get("committed"), a.get("complete")
    lines.append(f"samples: {committed}, complete" if complete else
                 f"samples: {committed} committed, incomplete (no completeness marker: the "
                 "encode was interrupted; run it again to resume)")
    if not complete and "ranges" in a:
        from selfflow_core.data.ranges import progress_line

        lines.append(progress_line(group) or "")
    arrays = dict(group.arrays())
    fields = a.get("fields") if isinstance(a.get("fields"), Mapping) else {}
    for key, spec in fields.items():
        try:
            text = field_text(spec["shape"], spec["dtype"])
        except (KeyError, TypeError):
            text = _value(spec)
        arr = arrays.get(key)
        if arr is None:
            lines.append(f"field {key}: {text}, array missing")
            continue
        codecs = [_codec_text(c) for c in arr.compressors]
        compress = [c for c in codecs if c != "crc32c"] or ["none"]
        check = "crc32c checksum" if "crc32c" in codecs else "no checksum"
        shards = (f" in shards of {arr.shards[0]} samples ({arr.shards[0] // arr.chunks[0]} "
                  "chunks per file)" if arr.shards else "")
        lines.append(f"field {key}: {text}, chunks of {arr.chunks[0]} samples{shards}, "
                     f"compressor {', '.join(compress)}, {check}")
    lines.append(f"config_hash: {a.get('config_hash')}")
    if a.get("created_at"):
        lines.append(f"created: {a['created_at']}")
    return lines
