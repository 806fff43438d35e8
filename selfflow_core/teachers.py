"""Teacher strategies: the EMA self-teacher of Self-Flow, and none (for vanilla / DTS-only runs)."""

from __future__ import annotations

import copy

import attrs
import torch
from attrs import validators as v
from torch import nn

from selfflow_core.interfaces import Backbone, TeacherConfig, TeacherStrategy


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` / DDP wrappers (so state-dict keys never drift)."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP2 ``DTensor``) tensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """An exponential moving average of a module: ``p_ema <- d * p_ema + (1 - d) * p``.

    Under FSDP2 the copy is sharded like the student (:mod:`selfflow_core.runtime.parallel`): both
    hold the same rows of every parameter, so the update is a local ``lerp`` of shard on shard.

    With ``warmup`` the decay at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so a short
    run's average does not stay stuck at the random initialisation (paper runs, millions of steps,
    use ``decay=0.9999`` without warm-up)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.model = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = unwrap(model)
        ema_p = [local(q) for q in self.model.parameters()]
        torch._foreach_lerp_(ema_p, [local(p.detach()).to(q.dtype)
                                     for p, q in zip(src.parameters(), ema_p)], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), src.buffers()):
            local(b_ema).copy_(local(b))
        self.updates += 1

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Start the average afresh from ``model``'s weights, as if just built from it."""
        src = unwrap(model)
        for ema_t, t in zip([*self.model.parameters(), *self.model.buffers()],
                            [*src.parameters(), *src.buffers()]):
            local(ema_t).copy_(local(t.detach()))
        self.updates = 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class EMATeacher(TeacherStrategy):
    """The EMA copy of the student, run on the cleaner homogeneous view and stopped after block
    k."""

    @attrs.frozen(kw_only=True)
    class Config(TeacherConfig):
        kind = "ema"
        decay: float = attrs.field(default=0.9999, validator=[v.ge(0), v.lt(1)])
        warmup: bool = False
        truncate: bool = True

        def build(self) -> EMATeacher:
            return EMATeacher(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ema: EMA | None = None

    def attach(self, student: Backbone) -> None:
        self.ema = EMA(student, self.config.decay, self.config.warmup)

    def update(self, student, *, step):
        self.ema.update(student)

    @torch.no_grad()
    def features(self, x_t, t, batch, *, layer):
        stop = layer if self.config.truncate else None
        out = self.ema.model(x_t, t, batch, feature_layers=(layer,), stop_after=stop)
        return out.features[layer]

    @property
    def model(self):
        return self.ema.model if self.ema is not None else None

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


class NoTeacher(TeacherStrategy):
    """No representation target: vanilla flow matching, or DTS alone."""

    provides_targets = False

    @attrs.frozen(kw_only=True)
    class Config(TeacherConfig):
        kind = "none"

        def build(self) -> NoTeacher:
            return NoTeacher()

    def features(self, x_t, t, batch, *, layer):
        return None
