"""Time distributions p(t) and timestep schedulers (per-token plans)."""

from __future__ import annotations

import abc

import attrs
import torch
from torch import Tensor

from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.types import TimestepPlan, TokenBatch


@attrs.frozen(kw_only=True)
class TimeDistributionConfig(ComponentConfig):
    """Base config of time distributions; ``build()`` -> :class:`TimeDistribution`."""


@attrs.frozen(kw_only=True)
class SchedulerConfig(ComponentConfig):
    """Base config of timestep schedulers; ``build()`` -> :class:`TimestepScheduler`."""


class TimeDistribution(abc.ABC):
    """A distribution over [0, 1] (t = 0 data, t = 1 noise)."""

    @abc.abstractmethod
    def sample(self, n: int, *, generator: torch.Generator, device: torch.device | str = "cpu"
               ) -> Tensor:
        """``n`` i.i.d. draws, shape [n]."""

    def cdf(self, t: Tensor) -> Tensor:
        """The CDF (used by tests and diagnostics)."""
        raise NotImplementedError


class TimestepScheduler(abc.ABC):
    """Draws the per-token plan of one training step."""

    @abc.abstractmethod
    def plan(self, batch: TokenBatch, *, generator: torch.Generator) -> TimestepPlan: ...
