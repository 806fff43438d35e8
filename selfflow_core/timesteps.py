"""Time distributions p(t) and the timestep schedulers.

Distributions: uniform, logit-normal with shift and low-SNR tail, plateau-logit-normal.

``SingleTimestep`` is vanilla flow matching: one ``t`` per sample. ``DualTimestep`` is Self-Flow's
Dual-Timestep Scheduling: ``t, s`` i.i.d. from p(t) (unsorted), an i.i.d. Bernoulli(R_M) mask per
token gives masked tokens ``s`` and the rest ``t``; the teacher sees ``min(t, s)`` everywhere.
``PerKindTimestep`` plans each kind of token of a mixed sequence (a group of the adapter's
``token_dims``: video and audio) with its own scheduler.

Conditioning tokens (``TokenBatch.condition``) are held clean (``t = 0``), or, with
``condition_noise = c > 0``, noise-augmented: every sample's conditioning tokens share one
``t ~ U[0, c]``, the same for student and teacher (paper App. E/F: the first frame at U[0, 0.2]).
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


class PlateauLogitNormal(TimeDistribution):
    """``t = shift(sigmoid(mean + z), alpha)`` with ``z`` from a flat-topped normal: uniform on
    ``[-width, width]`` joined to the two halves of N(0, std^2) beyond it, the density continuous
    (a plateau of height ``1 / (2 width + std sqrt(2 pi))``). The paper names this p(t) for its
    RAE runs with shift 10 (App. A.2) without defining it; this is selfflow's reading: a
    logit-normal whose mode is widened into a plateau. ``width = 0`` is :class:`LogitNormal`."""

    @attrs.frozen(kw_only=True)
    class Config(TimeDistributionConfig):
        kind = "plateau_logit_normal"
        mean: float = 0.0
        std: float = attrs.field(default=1.0, validator=v.gt(0))
        width: float = attrs.field(default=1.0, validator=v.ge(0))
        shift: float = attrs.field(default=10.0, validator=v.gt(0))

        def build(self) -> PlateauLogitNormal:
            return PlateauLogitNormal(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.flat = 2 * config.width / (2 * config.width + config.std * math.sqrt(2 * math.pi))

    def sample(self, n, *, generator, device="cpu"):
        c = self.config
        u = torch.rand(n, generator=generator, device=device)
        on_plateau = torch.rand(n, generator=generator, device=device) < self.flat
        tail = torch.randn(n, generator=generator, device=device).abs() * c.std + c.width
        z = torch.where(on_plateau, (2 * u - 1) * c.width, torch.where(u < 0.5, -tail, tail))
        return shift_time(torch.sigmoid(c.mean + z), c.shift)

    def cdf(self, t):
        c = self.config
        t = t.double().clamp(1e-12, 1 - 1e-12)
        z = torch.logit(t / (c.shift - (c.shift - 1) * t)) - c.mean
        norm = 2 * c.width + c.std * math.sqrt(2 * math.pi)
        half = c.std * math.sqrt(2 * math.pi) / 2  # the mass of one tail, times norm

        def gauss(x):  # P(N(0, std^2) <= x)
            return 0.5 * (1 + torch.erf(x / (c.std * math.sqrt(2))))

        below = 2 * half * gauss(z + c.width)                     # z < -width
        inside = half + (z + c.width)                              # |z| <= width
        above = half + 2 * c.width + 2 * half * (gauss(z - c.width) - 0.5)
        out = torch.where(z < -c.width, below, torch.where(z <= c.width, inside, above))
        return out / norm


def _distribution_field():
    return attrs.field(factory=Uniform.Config)


def _condition_noise_field():
    return attrs.field(default=0.0, validator=[v.ge(0), v.lt(1)])


def _hold_conditioning(plan: TimestepPlan, batch: TokenBatch, condition_noise: float,
                       generator: torch.Generator) -> TimestepPlan:
    """Conditioning tokens at ``t = 0``, or at one ``U[0, condition_noise]`` draw per sample
    (student and teacher alike); never masked."""
    b = batch.valid.shape[0]
    if condition_noise > 0:  # a config value: no branch on the data, no read from the device
        held = (condition_noise * torch.rand(b, generator=generator, device=plan.student_t.device)
                )[:, None].to(plan.student_t.dtype)
    else:
        held = torch.zeros((), dtype=plan.student_t.dtype, device=plan.student_t.device)
    return TimestepPlan(student_t=torch.where(batch.condition, held, plan.student_t),
                        teacher_t=torch.where(batch.condition, held, plan.teacher_t),
                        masked=plan.masked & ~batch.condition)


class SingleTimestep(TimestepScheduler):
    """One timestep per sample, shared by all tokens (vanilla flow matching)."""

    @attrs.frozen(kw_only=True)
    class Config(SchedulerConfig):
        kind = "single"
        distribution: TimeDistributionConfig = _distribution_field()
        condition_noise: float = _condition_noise_field()

        def build(self) -> SingleTimestep:
            return SingleTimestep(self.distribution.build(), condition_noise=self.condition_noise)

    def __init__(self, distribution: TimeDistribution, *, condition_noise: float = 0.0) -> None:
        self.distribution = distribution
        self.condition_noise = condition_noise

    def plan(self, batch, *, generator):
        b, n = batch.valid.shape
        t = self.distribution.sample(b, generator=generator, device=batch.tokens.device)
        t = t[:, None].expand(b, n).contiguous()
        masked = torch.zeros(b, n, dtype=torch.bool, device=t.device)
        plan = TimestepPlan(student_t=t, teacher_t=t, masked=masked)
        return _hold_conditioning(plan, batch, self.condition_noise, generator)


class DualTimestep(TimestepScheduler):
    """Dual-Timestep Scheduling (Self-Flow Eq. 4-5)."""

    @attrs.frozen(kw_only=True)
    class Config(SchedulerConfig):
        kind = "dual"
        distribution: TimeDistributionConfig = _distribution_field()
        mask_ratio: float = attrs.field(default=0.25, validator=[v.ge(0), v.le(0.5)])
        condition_noise: float = _condition_noise_field()

        def build(self) -> DualTimestep:
            return DualTimestep(self.distribution.build(), self.mask_ratio,
                                condition_noise=self.condition_noise)

    def __init__(self, distribution: TimeDistribution, mask_ratio: float, *,
                 condition_noise: float = 0.0) -> None:
        self.distribution = distribution
        self.mask_ratio = mask_ratio
        self.condition_noise = condition_noise

    def plan(self, batch, *, generator):
        b, n = batch.valid.shape
        dev = batch.tokens.device
        t = self.distribution.sample(b, generator=generator, device=dev)[:, None]
        s = self.distribution.sample(b, generator=generator, device=dev)[:, None]
        masked = torch.rand(b, n, generator=generator, device=dev) < self.mask_ratio
        student_t = torch.where(masked, s, t)
        teacher_t = torch.minimum(t, s).expand(b, n).contiguous()
        plan = TimestepPlan(student_t=student_t, teacher_t=teacher_t, masked=masked)
        return _hold_conditioning(plan, batch, self.condition_noise, generator)


class PerKindTimestep(TimestepScheduler):
    """One scheduler per kind of token in a mixed sequence: ``kinds[g]`` plans the tokens whose
    modality id is ``g`` (the adapter's ``token_dims`` order: audio_video's video then audio).
    Each kind draws its own times (e.g. video's t, s with mask ratio 0.1 and audio's with 0.5,
    each from its own p(t); paper App. B/C); a token's teacher time is its own kind's
    ``min(t, s)``. Schedulers see the adapter's ids (``0 .. len(token_dims) - 1``), before the
    trainer offsets them into the backbone's table."""

    @attrs.frozen(kw_only=True)
    class Config(SchedulerConfig):
        kind = "per_kind"
        kinds: tuple[SchedulerConfig, ...] = attrs.field(
            factory=lambda: (DualTimestep.Config(),), converter=tuple, validator=v.min_len(1))

        @kinds.validator
        def _check(self, attribute, value) -> None:
            for i, k in enumerate(value):
                if isinstance(k, PerKindTimestep.Config) or not isinstance(k, SchedulerConfig):
                    raise ValueError(f"kinds[{i}] must be a scheduler config other than "
                                     f"per_kind (got {type(k).__name__})")

        def build(self) -> PerKindTimestep:
            return PerKindTimestep([k.build() for k in self.kinds])

    def __init__(self, kinds: list[TimestepScheduler]) -> None:
        self.kinds = kinds

    def plan(self, batch, *, generator):
        plans = [k.plan(batch, generator=generator) for k in self.kinds]
        out = plans[0]
        for g, p in enumerate(plans[1:], start=1):
            here = batch.modality_ids == g
            out = TimestepPlan(student_t=torch.where(here, p.student_t, out.student_t),
                               teacher_t=torch.where(here, p.teacher_t, out.teacher_t),
                               masked=torch.where(here, p.masked, out.masked))
        return out
