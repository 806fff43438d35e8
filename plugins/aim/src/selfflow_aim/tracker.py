"""An aim tracker for selfflow: hyper-parameters, metrics, timestep histograms, sample grids and
sample sounds.

One selfflow run is one aim run. The repo defaults to ``<run_dir>/../aim`` so every run under
``runs/`` lands in one repo (``aim up --repo runs/aim``). The aim run's hash is written to
``<run_dir>/aim.json``; a resumed selfflow run appends to the same aim run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from selfflow_core import Tracker, TrackerConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"})
AUDIO_SUFFIXES = {".wav": "wav", ".mp3": "mp3", ".flac": "flac"}
MARKER = "aim.json"
DEFAULT_EXPERIMENT = "selfflow"


def images_sequence(name: str) -> str:
    """The aim sequence of the images logged by ``log_images(name, ...)``: ``<name>/images``."""
    return f"{name}/images"


def audio_sequence(name: str) -> str:
    """The aim sequence of the sound files logged by ``log_images(name, ...)``: ``<name>/audio``."""
    return f"{name}/audio"


def _json_safe(value: Any) -> Any:
    """Hyper-parameters as plain JSON data (tuples -> lists, paths and others -> str)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def _as_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


class AimTracker(Tracker):
    """Writes to an aim repo. Only rank 0 builds one (the trainer's rule for trackers)."""

    @attrs.frozen(kw_only=True)
    class Config(TrackerConfig):
        """- ``repo``: the aim repo directory (aim keeps its data in ``<repo>/.aim``); empty: the
          ``aim`` folder next to the run directory (``runs/<name>`` -> ``runs/aim``).
        - ``experiment``: the aim experiment; when left at ``"selfflow"``, the experiment name
          the trainer passes to ``build`` is used instead.
        - ``system_tracking``: also record CPU/GPU/memory use and system params (off: no extra
          thread). Terminal output is never captured.
        """

        kind = "aim"
        repo: str = ""
        experiment: str = DEFAULT_EXPERIMENT
        system_tracking: bool = False

        def build(self, *, run_dir: Path, experiment: str = DEFAULT_EXPERIMENT) -> AimTracker:
            run_dir = Path(run_dir)
            repo = Path(self.repo).expanduser() if self.repo else run_dir.resolve().parent / "aim"
            name = self.experiment if self.experiment != DEFAULT_EXPERIMENT else experiment
            return AimTracker(repo=repo, run_dir=run_dir, experiment=name,
                              system_tracking=self.system_tracking)

    def __init__(self, *, repo: Path, run_dir: Path, experiment: str = DEFAULT_EXPERIMENT,
                 system_tracking: bool = False) -> None:
        from aim import Repo, Run

        self.repo_path = Path(repo)
        self.repo_path.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(run_dir)
        marker = self.run_dir / MARKER
        run_hash = None
        if marker.is_file():  # a resumed selfflow run continues its aim run
            try:
                previous = json.loads(marker.read_text())
            except (OSError, ValueError):
                previous = {}
            same_repo = Path(previous.get("repo", "")).resolve() == self.repo_path.resolve()
            if same_repo and Repo.exists(str(self.repo_path)) and Repo.from_path(
                    str(self.repo_path)).run_exists(str(previous.get("run_hash", ""))):
                run_hash = previous["run_hash"]
        self.run = Run(
            run_hash, repo=str(self.repo_path), experiment=experiment,
            force_resume=run_hash is not None,
            system_tracking_interval=10 if system_tracking else None,
            log_system_params=system_tracking, capture_terminal_logs=False)
        self.resumed = run_hash is not None
        if not self.resumed:
            self.run.name = self.run_dir.name or "selfflow"
        self.run["run_dir"] = str(self.run_dir.resolve())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"repo": str(self.repo_path.resolve()),
                                      "run_hash": self.run.hash, "experiment": experiment},
                                     indent=1) + "\n")
        self._closed = False

    @property
    def hash(self) -> str:
        return self.run.hash

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run["hparams"] = _json_safe(dict(hparams))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        for name, value in metrics.items():
            self.run.track(float(value), name=str(name), step=int(step))

    def log_distribution(self, name: str, values: Any, *, step: int) -> None:
        from aim import Distribution

        x = _as_numpy(values)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if 0.0 <= lo and hi <= 1.0:  # timesteps: a fixed [0, 1] range keeps steps comparable
            lo, hi = 0.0, 1.0
        elif math.isclose(lo, hi):
            lo, hi = lo - 0.5, hi + 0.5
        hist, _ = np.histogram(x, bins=64, range=(lo, hi))
        self.run.track(Distribution(hist=hist, bin_range=(lo, hi)), name=str(name), step=int(step))

    def log_images(self, name: str, paths: list[Path], *, step: int) -> None:
        """Image files go to the aim sequence ``<name>/images`` as aim ``Image`` objects, sound
        files to ``<name>/audio`` as aim ``Audio`` objects (an aim sequence holds one data type,
        so a list of both cannot be tracked under one name); each is captioned with its file
        name. Other files are skipped."""
        from aim import Audio, Image

        images, audios = [], []
        for p in map(Path, paths):
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images.append(Image(str(p), caption=p.name))
            elif suffix in AUDIO_SUFFIXES:
                audios.append(Audio(str(p), format=AUDIO_SUFFIXES[suffix], caption=p.name))
        if images:
            self.run.track(images, name=images_sequence(name), step=int(step))
        if audios:
            self.run.track(audios, name=audio_sequence(name), step=int(step))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.close()
