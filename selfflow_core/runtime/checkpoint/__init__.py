"""Checkpoints: files for one process or DDP (:mod:`.files`), directories of DCP shards for FSDP2
(:mod:`.dcp`), and the RNG state that makes a resume exact (:mod:`.rng`). This module is the one
entry point: :func:`load` and :func:`load_meta` take either kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from selfflow_core.errors import CheckpointError
from selfflow_core.runtime.checkpoint import dcp
from selfflow_core.runtime.checkpoint.files import (
    latest,
    list_checkpoints,
    load_file,
    path_for,
    prune,
    remove_stale_temps,
    save,
)
from selfflow_core.runtime.checkpoint.rng import rng_state, set_rng_state

__all__ = ["CheckpointError", "latest", "list_checkpoints", "load", "load_meta", "path_for",
           "prune", "remove_stale_temps", "rng_state", "save", "saved_config", "set_rng_state"]


def _is_sharded(path: Path) -> bool:
    return path.suffix == ".dcp" and path.is_dir()


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The whole checkpoint at ``path`` (a file, or a sharded directory read in full), loaded
    without pickle after its checksums are checked; :class:`CheckpointError` naming it otherwise."""
    path = Path(path)
    return dcp.load_full(path, map_location) if _is_sharded(path) else load_file(path, map_location)


def load_meta(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint without the shards of a sharded one (a resuming FSDP2 rank reads its own
    part later); a file checkpoint comes back whole."""
    path = Path(path)
    return dcp.load_meta(path, map_location) if _is_sharded(path) else load_file(path, map_location)


def saved_config(path: Path) -> dict[str, Any] | None:
    """The run config stored in the checkpoint at ``path``, read without loading its tensors (a
    file is memory-mapped, a sharded one's small meta file read; checksums are not checked);
    None when it cannot be read (damage is for :func:`load` to report)."""
    path = Path(path)
    try:
        state = (dcp.load_meta(path) if _is_sharded(path) else
                 torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return json.loads(state["config"])
    except Exception:  # noqa: BLE001 - any damage: None, and resume() says what is wrong
        return None
