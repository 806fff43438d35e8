"""The core's trackers: JSON lines on disk (the fallback when no tracker plugin is installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import numpy as np

from selfflow_core.interfaces import Tracker, TrackerConfig


class JsonlTracker(Tracker):
    """Appends one JSON object per event to ``<run_dir>/metrics.jsonl``."""

    @attrs.frozen(kw_only=True)
    class Config(TrackerConfig):
        kind = "jsonl"

        def build(self, *, run_dir: Path, experiment: str = "selfflow") -> JsonlTracker:
            return JsonlTracker(Path(run_dir) / "metrics.jsonl")

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", buffering=1)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def log_hparams(self, hparams):
        self._write({"hparams": hparams})

    def log_metrics(self, metrics, *, step):
        self._write({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_distribution(self, name, values, *, step):
        counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=20, range=(0, 1))
        self._write({"step": step, "histogram": name, "counts": counts.tolist(),
                     "edges": edges.round(4).tolist()})

    def log_images(self, name, paths, *, step):
        self._write({"step": step, "files": name, "paths": [str(p) for p in paths]})

    def close(self):
        self._file.close()


class NullTracker(Tracker):
    """Drops everything (for tests and benchmarks)."""

    @attrs.frozen(kw_only=True)
    class Config(TrackerConfig):
        kind = "none"

        def build(self, *, run_dir: Path, experiment: str = "selfflow") -> NullTracker:
            return NullTracker()

    def log_hparams(self, hparams):
        pass

    def log_metrics(self, metrics, *, step):
        pass
