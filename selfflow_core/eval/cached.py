"""Fixed evaluators trained once and cached on disk with the SHA-256 of their weights.

A modality's prompt evaluator (an OCR reader, a digit classifier, ...) must be the same network
every time it scores, or its scores are not comparable. :class:`EvaluatorCache` keeps one per
set of settings:

- the cache root is :func:`default_cache_dir` (``$SELFFLOW_CACHE``, else
  ``$XDG_CACHE_HOME/selfflow``, else ``~/.cache/selfflow``) unless a ``cache_dir`` is given;
- each evaluator lives in ``<root>/<kind>/v<version>/<key>/``, ``key`` being
  :func:`settings_key` of its settings (a JSON-able dict of everything it is made from), as
  ``<stem>.pt`` (its ``state_dict``) and ``<stem>.json`` (its record: the settings, the SHA-256
  of the weights file and whatever the trainer recorded);
- the first use trains it (one line says so) and writes both files atomically (each to a
  temporary name, then ``os.replace``; the weights first, since the record names them), so a
  crash never leaves a half-written entry;
- later uses load the weights with ``weights_only=True``, after checking their SHA-256 and the
  settings against the record: a mismatch is the plugin's own :class:`EvaluatorCacheError`
  (delete the folder to train it again).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import torch
from torch import nn

from selfflow_core.errors import EvaluatorCacheError

__all__ = ["CachedEvaluator", "EvaluatorCache", "default_cache_dir", "settings_key",
           "weights_bytes", "weights_sha256"]


def default_cache_dir() -> Path:
    """``$SELFFLOW_CACHE``, else ``$XDG_CACHE_HOME/selfflow``, else ``~/.cache/selfflow``."""
    if os.environ.get("SELFFLOW_CACHE"):
        return Path(os.environ["SELFFLOW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "selfflow"


def settings_key(settings: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``settings`` as sorted-key JSON."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_bytes(net: nn.Module) -> bytes:
    """``net``'s ``state_dict`` (contiguous tensors) as ``torch.save`` writes it."""
    buf = io.BytesIO()
    torch.save({k: t.contiguous() for k, t in net.state_dict().items()}, buf)
    return buf.getvalue()


def weights_sha256(net: nn.Module) -> str:
    """The SHA-256 of :func:`weights_bytes`: what a cached evaluator's record holds."""
    return hashlib.sha256(weights_bytes(net)).hexdigest()


class CachedEvaluator(Protocol):
    """What :meth:`EvaluatorCache.load_or_train` keeps: a network and its record."""

    net: nn.Module
    info: dict[str, Any]


E = TypeVar("E", bound=CachedEvaluator)


@attrs.frozen(kw_only=True)
class EvaluatorCache:
    """Where and how one kind of evaluator is cached.

    - ``kind`` / ``version``: the folder ``<root>/<kind>/v<version>/`` its entries live in.
    - ``stem``: the files' name, ``<stem>.pt`` and ``<stem>.json``.
    - ``name``: the evaluator in messages (``"OCR reader"``).
    - ``error``: what a tampered entry raises (an :class:`EvaluatorCacheError` subclass).
    - ``verb`` / ``gerund``: how its making is said (``"train"`` / ``"training"``, or
      ``"fit"`` / ``"fitting"``).
    """

    kind: str
    version: int
    stem: str
    name: str
    error: type[EvaluatorCacheError] = EvaluatorCacheError
    verb: str = "train"
    gerund: str = "training"

    def folder(self, settings: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
        """``<root>/<kind>/v<version>/<settings key>``; root: ``cache_dir``, else
        :func:`default_cache_dir`."""
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        return root / f"{self.kind}/v{self.version}/{settings_key(settings)}"

    def load_or_train(self, settings: Mapping[str, Any], *, train: Callable[[], E],
                      empty: Callable[[], nn.Module], wrap: Callable[[nn.Module, dict], E],
                      cache_dir: str | Path | None = None, progress: bool = True) -> E:
        """The evaluator of ``settings`` from the cache, trained and cached first if it is not
        there.

        - ``train()``: a new evaluator (its ``net`` and ``info``, the record to keep; its
          ``sha256`` is added here).
        - ``empty()``: an untrained network of the right shape, to load the weights into.
        - ``wrap(net, record)``: the evaluator of loaded weights and their record.

        A cached entry whose weights' SHA-256 or settings differ from the record raises
        ``error``."""
        folder = self.folder(settings, cache_dir)
        weights, record = folder / f"{self.stem}.pt", folder / f"{self.stem}.json"
        if weights.is_file() and record.is_file():
            info = json.loads(record.read_text())
            data = weights.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != info.get("sha256") or info.get("settings") != settings:
                raise self.error(
                    f"cached {self.name} {weights} does not match its record {record} (SHA-256 "
                    f"{digest[:12]}..., recorded {str(info.get('sha256'))[:12]}...; or other "
                    f"settings); delete {folder} to {self.verb} it again")
            net = empty()
            net.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
            return wrap(net, info)
        if progress:
            print(f"{self.gerund} the {self.name} once (cached in {folder}) ...", flush=True)
        evaluator = train()
        data = weights_bytes(evaluator.net)
        evaluator.info["sha256"] = hashlib.sha256(data).hexdigest()
        text = json.dumps(evaluator.info, indent=2)  # before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        files = [(weights, data), (record, text.encode())]  # weights first: a record names them
        temps = [final.with_name(f"{final.name}.tmp{os.getpid()}") for final, _ in files]
        try:
            for tmp, (_, content) in zip(temps, files):
                tmp.write_bytes(content)
            for tmp, (final, _) in zip(temps, files):
                os.replace(tmp, final)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        return evaluator
