"""ODE samplers (Euler, Heun) from t = 1 (noise) to t = 0 (data), with classifier-free guidance.

Conditioning tokens of the prompt are held clean (t = 0) throughout; labels equal to the null
class (``num_classes``) give the unconditional branch of guidance.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core.flow import shift_time
from selfflow_core.interfaces import Backbone
from selfflow_core.types import TokenBatch


@attrs.frozen(kw_only=True)
class SamplingConfig:
    """How samples are drawn: ``method``, ``steps``, time ``shift`` (> 1 spends more steps at high
    noise), ``cfg_scale`` (1 = no guidance), ``count`` samples, ``seed``, and ``every`` (steps
    between sample grids during training; 0 = only at the end)."""

    method: Literal["euler", "heun"] = "euler"
    steps: int = attrs.field(default=50, validator=v.ge(1))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))
    cfg_scale: float = attrs.field(default=1.0, validator=v.ge(0))
    count: int = attrs.field(default=100, validator=v.ge(1))
    seed: int = 0
    every: int = attrs.field(default=0, validator=v.ge(0))


def time_grid(steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` decreasing times from 1 to 0, shifted by the paper's ``s(alpha, t)``."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64),
                      shift).float()


def _velocity(model: Backbone, x: Tensor, t: Tensor, prompt: TokenBatch, cfg_scale: float,
              null_label: int | None) -> Tensor:
    tt = torch.where(prompt.condition, torch.zeros_like(t), t)
    if cfg_scale == 1.0 or prompt.labels is None or null_label is None:
        return model(x, tt, prompt).velocity
    unconditional = attrs.evolve(prompt, labels=torch.full_like(prompt.labels, null_label))
    both = TokenBatch.cat([prompt, unconditional])
    cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), both).velocity.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample(model: Backbone, prompt: TokenBatch, *, steps: int = 50,
           method: Literal["euler", "heun"] = "euler", shift: float = 1.0,
           cfg_scale: float = 1.0, null_label: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from noise at t = 1 to t = 0; returns tokens [B, N, C]."""
    held = prompt.condition[..., None]
    noise = torch.randn(prompt.tokens.shape, generator=generator, device=prompt.tokens.device)
    x = torch.where(held, prompt.tokens, noise)
    grid = time_grid(steps, shift, x.device)
    b, n = prompt.valid.shape
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        vel = _velocity(model, x, t.expand(b, n), prompt, cfg_scale, null_label)
        x_next = torch.where(held, prompt.tokens, x + (t_next - t) * vel)
        if method == "heun" and float(t_next) > 0:  # the corrector also sees held tokens clean
            vel2 = _velocity(model, x_next, t_next.expand(b, n), prompt, cfg_scale, null_label)
            x_next = x + (t_next - t) * 0.5 * (vel + vel2)
        x = torch.where(held, prompt.tokens, x_next)
    return x
