"""Experiment trackers: where metrics, hyper-parameters and sample images go."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from selfflow_core.interfaces.base import ComponentConfig


@attrs.frozen(kw_only=True)
class TrackerConfig(ComponentConfig):
    """Base config of trackers; ``build(run_dir=...)`` -> :class:`Tracker`."""


class Tracker(abc.ABC):
    """Receives what a run produces. Only rank 0 calls it."""

    @abc.abstractmethod
    def log_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_distribution(self, name: str, values: Any, *, step: int) -> None:
        """A histogram (e.g. of timesteps); optional."""

    def log_images(self, name: str, paths: list[Path], *, step: int) -> None:
        """Sample files written by a modality; optional."""

    def close(self) -> None:
        pass
