"""Time distributions (uniform, logit-normal with shift) and the two schedulers.

``SingleTimestep`` is vanilla flow matching: one ``t`` per sample. ``DualTimestep`` is Self-Flow's
Dual-Timestep Scheduling: ``t, s`` i.i.d. from p(t) (unsorted), an i.i.d. Bernoulli(R_M) mask per
token gives masked tokens ``s`` and the rest ``t``; the teacher sees ``min(t, s)`` everywhere.
Conditioning tokens are held clean (``t = 0``) in every plan.
"""

from __future__ import annotations

import math

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core.flow import shift_time
from selfflow_core.interfaces import (
    SchedulerConfig,
    TimeDistribution,
    TimeDistributionConfig,
    TimestepScheduler,
)
from selfflow_core.types import TimestepPlan, TokenBatch


def _tail(t: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Replace a ``fraction`` of draws by U[0.95, 1] (the paper's low-SNR tweak for video)."""
    if fraction <= 0:
        return t
    u = torch.rand(t.shape, generator=generator, device=t.device)
    hi = 0.95 + 0.05 * torch.rand(t.shape, generator=generator, device=t.device)
    return torch.where(u < fraction, hi, t)


class Uniform(TimeDistribution):
    @attrs.frozen(kw_only=True)
    class Config(TimeDistributionConfig):
        kind = "uniform"

        def build(self) -> Uniform:
            return Uniform()

    def sample(self, n, *, generator, device="cpu"):
        return torch.rand(n, generator=generator, device=device)

    def cdf(self, t):
        return t.clamp(0, 1)


class LogitNormal(TimeDistribution):
    """``t = shift(sigmoid(mean + std * z), alpha)``, optionally 5 % of draws from U[0.95, 1]."""

    @attrs.frozen(kw_only=True)
    class Config(TimeDistributionConfig):
        kind = "logit_normal"
        mean: float = 0.0
        std: float = attrs.field(default=1.0, validator=v.gt(0))
        shift: float = attrs.field(default=1.0, validator=v.gt(0))
        tail_fraction: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])

        def build(self) -> LogitNormal:
            return LogitNormal(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def sample(self, n, *, generator, device="cpu"):
        c = self.config
        z = torch.randn(n, generator=generator, device=device)
        t = shift_time(torch.sigmoid(c.mean + c.std * z), c.shift)
        return _tail(t, c.tail_fraction, generator)

    def cdf(self, t):
        c = self.config
        t = t.double().clamp(1e-12, 1 - 1e-12)
        u = t / (c.shift - (c.shift - 1) * t)  # inverse of the shift
        x = (torch.logit(u) - c.mean) / c.std
        base = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        tail = ((t - 0.95) / 0.05).clamp(0, 1)
        return (1 - c.tail_fraction) * base + c.tail_fraction * tail


def _distribution_field():
    return attrs.field(factory=Uniform.Config)


def _hold_conditioning(plan: TimestepPlan, batch: TokenBatch) -> TimestepPlan:
    # unconditionally (no branch on the data: that would read the mask back from the device)
    zero = torch.zeros((), dtype=plan.student_t.dtype, device=plan.student_t.device)
    return TimestepPlan(student_t=torch.where(batch.condition, zero, plan.student_t),
                        teacher_t=torch.where(batch.condition, zero, plan.teacher_t),
                        masked=plan.masked & ~batch.condition)


class SingleTimestep(TimestepScheduler):
    """One timestep per sample, shared by all tokens (vanilla flow matching)."""

    @attrs.frozen(kw_only=True)
    class Config(SchedulerConfig):
        kind = "single"
        distribution: TimeDistributionConfig = _distribution_field()

        def build(self) -> SingleTimestep:
            return SingleTimestep(self.distribution.build())

    def __init__(self, distribution: TimeDistribution) -> None:
        self.distribution = distribution

    def plan(self, batch, *, generator):
        b, n = batch.valid.shape
        t = self.distribution.sample(b, generator=generator, device=batch.tokens.device)
        t = t[:, None].expand(b, n).contiguous()
        masked = torch.zeros(b, n, dtype=torch.bool, device=t.device)
        return _hold_conditioning(TimestepPlan(student_t=t, teacher_t=t, masked=masked), batch)


class DualTimestep(TimestepScheduler):
    """Dual-Timestep Scheduling (Self-Flow Eq. 4-5)."""

    @attrs.frozen(kw_only=True)
    class Config(SchedulerConfig):
        kind = "dual"
        distribution: TimeDistributionConfig = _distribution_field()
        mask_ratio: float = attrs.field(default=0.25, validator=[v.ge(0), v.le(0.5)])

        def build(self) -> DualTimestep:
            return DualTimestep(self.distribution.build(), self.mask_ratio)

    def __init__(self, distribution: TimeDistribution, mask_ratio: float) -> None:
        self.distribution = distribution
        self.mask_ratio = mask_ratio

    def plan(self, batch, *, generator):
        b, n = batch.valid.shape
        dev = batch.tokens.device
        t = self.distribution.sample(b, generator=generator, device=dev)[:, None]
        s = self.distribution.sample(b, generator=generator, device=dev)[:, None]
        masked = torch.rand(b, n, generator=generator, device=dev) < self.mask_ratio
        student_t = torch.where(masked, s, t)
        teacher_t = torch.minimum(t, s).expand(b, n).contiguous()
        plan = TimestepPlan(student_t=student_t, teacher_t=teacher_t, masked=masked)
        return _hold_conditioning(plan, batch)
