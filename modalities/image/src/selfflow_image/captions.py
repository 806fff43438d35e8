"""Captions: the ``captions`` store field, and captions of image folders as datasets ship them.

The field (the core's prompt contract): ``K`` captions per sample, a numpy array of Python
``str`` objects ``[n, K]`` (``""``: missing), declared as ``FieldSpec(shape=(K,), dtype="str")``
and passed through ``encode`` unchanged; ``tokenize`` ignores it (the core picks one caption
per sample). :func:`caption_array` builds and checks it.

Folders (:func:`folder_captions`), every source found is used, in this order:

1. ``metadata.jsonl`` / ``metadata.csv`` in the folder or any subfolder (file names are
   relative to the metadata file's own folder, as in Hugging Face's ``imagefolder``):

   - the file column is the first of :data:`FILE_COLUMNS` present, the caption column the first
     of :data:`CAPTION_COLUMNS`;
   - jsonl: one JSON object per line; its caption is a string or a list of strings (several
     captions); ``null`` or ``""`` is none;
   - csv: a header row, then one row per caption (repeat a file's row for several captions);
   - a file named by several rows (or by both files) gets all their captions, in file order.

2. ``<stem>.txt`` beside the image (same folder, same name): each non-blank line is one
   caption (surrounding spaces dropped; UTF-8, a byte-order mark allowed).

A sample keeps its first ``K`` captions; with fewer, the rest are ``""``. An image with none is
a :class:`MissingCaptionError` naming it, unless ``missing_captions = "empty"``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from selfflow_core import SelfFlowError
from selfflow_core.tokens import CAPTIONS_FIELD, caption_array, captions_spec
from selfflow_core.tokens import captions_field as core_captions_field

__all__ = ["CAPTIONS_FIELD", "CaptionMetadataError", "MISSING_CAPTIONS", "MissingCaptionError",
           "caption_array", "captions_field", "captions_spec", "folder_captions"]

#: names of a metadata file's column giving the image file, in order of preference
FILE_COLUMNS = ("file_name", "file", "image", "filename", "image_file")
#: names of its column giving the caption(s), in order of preference
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")
#: the metadata files looked for (anywhere in the folder)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: what a folder source does with an image without captions (``ImageModality.Config``)
MISSING_CAPTIONS = ("stop", "empty")


class MissingCaptionError(SelfFlowError, ValueError):
    """An image of a folder has no caption (no ``.txt`` beside it, no metadata entry); names
    the file, how many others lack one, and how to encode them anyway."""

    def __init__(self, path: str | Path, missing: int = 1, total: int = 1) -> None:
        self.path, self.missing, self.total = str(path), missing, total
        others = (f" ({missing - 1} more of the {total} images have none either)"
                  if missing > 1 else "")
        stem = Path(self.path).with_suffix(".txt").name
        super().__init__(
            f"image file {self.path} has no caption{others}: give it a {stem} beside it (one "
            f"caption per line) or an entry in a metadata.jsonl / metadata.csv, or set "
            f'missing_captions = "empty" in the image modality config to encode images without '
            f'captions (with captions "")')

    def __reduce__(self):
        return (type(self), (self.path, self.missing, self.total))


class CaptionMetadataError(SelfFlowError, ValueError):
    """A ``metadata.jsonl`` / ``metadata.csv`` that cannot be used; names the file (and line)
    and says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"caption metadata {self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


# ---- the field -------------------------------------------------------------------------------

def captions_field(raw: dict, k: int) -> np.ndarray:
    """``raw["captions"]`` checked as the field ``[n, k]`` of ``str`` (what ``encode`` stores)."""
    return core_captions_field(raw, k, modality="the image")


# ---- folders ---------------------------------------------------------------------------------

def _key(path: Path | str) -> str:
    return os.path.normcase(os.path.normpath(os.fspath(path)))


def _pick(columns: Iterable[str], wanted: Sequence[str]) -> str | None:
    present = set(columns)
    return next((c for c in wanted if c in present), None)


def _as_captions(value: object, where: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise CaptionMetadataError(path, f"{where}: a caption must be a string or a list of "
                                     f"strings, got {json.dumps(value)[:80]}")


def _read_jsonl(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionMetadataError(path, f"{where} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CaptionMetadataError(path, f"{where} is not a JSON object")
            file_key, cap_key = _pick(obj, FILE_COLUMNS), _pick(obj, CAPTION_COLUMNS)
            if file_key is None or cap_key is None:
                which = "file" if file_key is None else "caption"
                names = FILE_COLUMNS if file_key is None else CAPTION_COLUMNS
                raise CaptionMetadataError(
                    path, f"{where} has no {which} key (keys {sorted(obj)}; one of "
                          f"{', '.join(names)} is needed)")
            if not isinstance(obj[file_key], str):
                raise CaptionMetadataError(path, f"{where}: {file_key} is not a string")
            rows.append((obj[file_key], _as_captions(obj[cap_key], where, path), where))
    return rows


def _read_csv(path: Path) -> list[tuple[str, list[str], str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        file_key, cap_key = _pick(header, FILE_COLUMNS), _pick(header, CAPTION_COLUMNS)
        if file_key is None or cap_key is None:
            which = "file" if file_key is None else "caption"
            names = FILE_COLUMNS if file_key is None else CAPTION_COLUMNS
            raise CaptionMetadataError(path, f"no {which} column in the header {header} (one "
                                             f"of {', '.join(names)} is needed)")
        rows = []
        for n, row in enumerate(reader, 2):
            name = (row.get(file_key) or "").strip()
            if not name:
                raise CaptionMetadataError(path, f"line {n}: empty {file_key}")
            rows.append((name, _as_captions(row.get(cap_key), f"line {n}", path), f"line {n}"))
    return rows


def read_txt(path: Path) -> list[str]:
    """A caption file's captions: its non-blank lines, stripped."""
    text = path.read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def folder_captions(root: str | Path, files: Sequence[Path]) -> list[list[str]]:
    """The captions of each of ``files`` (images under ``root``), from the folder's metadata
    files and ``.txt`` files (see the module doc); ``[]`` for an image without any."""
    root = Path(root)
    index = {_key(p): i for i, p in enumerate(files)}
    found: list[list[str]] = [[] for _ in files]
    metas = sorted((p for name in METADATA_FILES for p in root.rglob(name) if p.is_file()),
                   key=lambda p: (p.parent.relative_to(root).parts, p.name))
    for meta in metas:
        rows = _read_jsonl(meta) if meta.suffix == ".jsonl" else _read_csv(meta)
        for name, caps, where in rows:
            i = index.get(_key(meta.parent / name))
            if i is None:
                raise CaptionMetadataError(
                    meta, f"{where} names {name!r}, which is not an image of the folder "
                          f"({_key(meta.parent / name)} is not among its PNG/JPG files); names "
                          f"are relative to the metadata file's folder")
            found[i].extend(caps)
    for i, image in enumerate(files):
        txt = image.with_suffix(".txt")
        if txt.is_file():
            found[i].extend(read_txt(txt))
    return found
