"""Checkpoints: atomic writes (temp file, fsync, rename), the last N kept, loaded without pickle.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it loads with
``torch.load(weights_only=True)``: a crafted file cannot run code on load. ``torch.save`` writes a
zip archive holding a CRC-32 of every member, which ``torch.load`` does not check; :func:`load`
checks them first, so a damaged file is refused instead of resuming from wrong weights.

FSDP2 runs write *sharded* checkpoints instead, directories ``step-NNNNNNNN.dcp/`` of
``torch.distributed.checkpoint`` shards (:mod:`selfflow_core.runtime.checkpoint.dcp`);
:func:`list_checkpoints`, :func:`latest` and :func:`prune` take both kinds.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from selfflow_core.errors import CheckpointError

PATTERN = re.compile(r"^step-(\d{8})\.(pt|dcp)$")
#: temp files of :func:`save`; the number is the writing process's id
TEMP_PATTERN = re.compile(r"^\.step-\d{8}\.pt\.tmp-(\d+)$")


def path_for(directory: Path, step: int, *, sharded: bool = False) -> Path:
    return Path(directory) / f"step-{step:08d}.{'dcp' if sharded else 'pt'}"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict[str, Any], directory: Path, step: int, *, keep: int) -> Path:
    """Write ``state`` as ``step-NNNNNNNN.pt`` atomically, then delete all but the last ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(directory)
    prune(directory, keep)
    return final


def prune(directory: Path, keep: int) -> None:
    """Delete all but the last ``keep`` checkpoints (files or sharded directories)."""
    for old in list_checkpoints(directory)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if (m := PATTERN.match(p.name))
                  and (p.is_file() if m.group(2) == "pt" else (p / "meta.pt").is_file()))


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files that :func:`save` calls killed mid-write left behind (their writer
    process is gone); a crash costs no disk space. Returns what was deleted."""
    removed = []
    for p in (Path(directory).iterdir() if Path(directory).is_dir() else ()):
        m = TEMP_PATTERN.match(p.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer is alive (or the id was reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _verify_archive(path: Path) -> None:
    """Check the zip structure and every member's CRC-32 (``torch.load`` checks neither)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                # torch's reader takes a member flagged as a directory (MS-DOS attribute 0x10)
                # for an empty one and loads garbage; torch never writes directories
                if info.is_dir() or info.external_attr & 0x10:
                    raise zipfile.BadZipFile(f"member {info.filename} is flagged a directory")
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except Exception as exc:  # noqa: BLE001 - bad CRC, bad header, odd method bits: all damage
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupt: "
                              f"{type(exc).__name__}: {exc})") from None


def load_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True`` after checking its checksums; a clear
    :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, wrong format ...
        first = (str(exc).splitlines() or [""])[0][:200]  # some (EOFError) have no message
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely "
                              f"({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"checkpoint {path} is not a selfflow checkpoint")
    return state


def latest(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None
