"""Sharded checkpoints (FSDP2 runs) through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a directory ``step-NNNNNNNN.dcp/``. Every rank writes its own shards of
the sharded tensors (``DTensor`` s: model, head, EMA copies, AdamW moments) with DCP, and rank 0
writes everything else (step, config, loader position, RNG, scalar optimizer state ...) as
``meta.pt``: the trainer's state dict in the layout of a file checkpoint, with the sharded
tensors left out and their paths listed in ``meta["sharded"]``. ``meta.pt`` is an ordinary
checkpoint file (checksums, ``weights_only``). The directory is written under a temporary name,
``.step-NNNNNNNN.dcp.tmp``, and renamed when every rank has finished, so a crash never leaves a
half-written checkpoint under a checkpoint's name; the last ``keep`` are kept.

DCP reads its ``.metadata`` with ``pickle`` and non-tensor items with
``torch.load(weights_only=False)``: here ``.metadata`` is unpickled with an allow-list of DCP's
own metadata classes, and a checkpoint holding anything but tensors is refused, so a crafted
directory cannot run code on load either.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfflow_core.errors import CheckpointError
from selfflow_core.runtime.checkpoint.files import fsync_dir, load_file, path_for, prune

META = "meta.pt"


def is_shard(value: Any) -> bool:
    """A sharded (``DTensor``) tensor: saved by DCP, one part per rank."""
    return torch.is_tensor(value) and hasattr(value, "to_local")


def _key(path: list) -> str:
    return "/".join(map(str, path))  # state-dict names hold dots, never slashes


def split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``state`` without its sharded tensors, their paths listed as ``"sharded"``; the sharded
    tensors in a flat dict keyed by path)."""
    shards: dict[str, Any] = {}
    paths: list[list] = []

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if is_shard(v):
                paths.append([*path, k])
                shards[_key(paths[-1])] = v
            else:
                out[k] = walk(v, [*path, k])
        return out

    rest = walk(state, [])
    rest["sharded"] = paths
    return rest, shards


def _insert(state: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """Put the tensors :func:`split` took out (``flat``, keyed by path) back into ``state``."""
    for path in state.pop("sharded"):
        node = state
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = flat[_key(path)]
    return state


def save(state: dict[str, Any], directory: Path, step: int, *, keep: int, is_main: bool,
         barrier: Callable[[], None]) -> Path:
    """Collective (every rank calls it with its own ``state``): the checkpoint of ``step``."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = path_for(directory, step, sharded=True)
    tmp = directory / f".{final.name}.tmp"  # one name for all ranks
    meta, shards = split(state)
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".step-*.dcp.tmp"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if is_main:
        with open(tmp / META, "wb") as fh:
            torch.save(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(directory)
        prune(directory, keep)
    barrier()
    return final


def load_meta(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state without its sharded tensors (their paths listed in ``"sharded"``):
    a resuming rank then reads its own part with :func:`load_shards`."""
    path = Path(path)
    state = load_file(path / META, map_location)
    if not isinstance(state.get("sharded"), list):
        raise CheckpointError(f"checkpoint {path}: {META} lists no sharded tensors")
    return state


def load_full(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state with its sharded tensors read *in full* into this process (no
    process group needed: to sample from or inspect an FSDP2 run)."""
    state = load_meta(path, map_location)
    sizes = _reader(path).read_metadata().state_dict_metadata
    missing = [_key(p) for p in state["sharded"] if _key(p) not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks shards of {missing[:5]}")
    flat = {k: torch.empty(sizes[k].size, dtype=sizes[k].properties.dtype)
            for k in map(_key, state["sharded"])}
    _read(Path(path), flat, no_dist=True)
    return _insert(state, {k: v.to(map_location) for k, v in flat.items()})


def load_shards(path: Path, state: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """Collective: ``state`` (from :func:`load_meta`) completed with this rank's part of
    every sharded tensor, read in place into the sharded tensors of ``template`` (this run's own
    state dict, same layout)."""
    rest, shards = split(template)
    # entries this run keeps nothing of (an evaluation EMA switched off on resume): not read
    unused = [p for p in state["sharded"] if _key(p) not in shards and rest.get(p[0]) == {}]
    for p in unused:
        state[p[0]] = {}
    state = {**state, "sharded": [p for p in state["sharded"] if p not in unused]}
    wanted = {_key(p) for p in state["sharded"]}
    if wanted != set(shards):
        raise CheckpointError(f"checkpoint {path}: its sharded tensors are not this run's "
                              f"(e.g. {sorted(wanted ^ set(shards))[:3]})")
    try:
        _read(Path(path), shards, no_dist=False)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of DCP: a clear error naming the path
        first = (str(exc).splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {path}: its shards do not fit this run "
                              f"({type(exc).__name__}: {first})") from None
    return _insert(state, shards)


def _read(path: Path, flat: dict[str, Any], *, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(flat, storage_reader=_reader(path), no_dist=no_dist)


#: the globals that a DCP ``.metadata`` pickle may name
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _reader(path: Path):
    """DCP's file reader, reading ``.metadata`` with the allow-list and refusing non-tensors."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            try:
                data = Path(self._get_metadata_path(kwargs.get("rank"))).read_bytes()
                metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            except Exception as exc:  # noqa: BLE001 - missing, truncated or crafted: refused
                raise CheckpointError(f"checkpoint {path} cannot be loaded safely (.metadata: "
                                      f"{type(exc).__name__}: {exc})") from None
            if not isinstance(metadata, Metadata) or not all(
                    isinstance(m, TensorStorageMetadata)
                    for m in metadata.state_dict_metadata.values()):
                raise CheckpointError(f"checkpoint {path} holds more than tensors; refused")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)
