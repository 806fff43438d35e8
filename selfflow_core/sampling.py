"""Samplers from t = 1 (noise) to t = 0 (data), with classifier-free guidance: the Euler and Heun
ODE solvers and an Euler–Maruyama SDE solver (``method="sde"``, paper App. A.4).

Conditioning tokens of the prompt (``prompt.condition``) are held at a fixed time ``condition_t``
(``c``) throughout: they are fed as ``x_c = (1 - c)·x0 + c·n`` with one noise draw ``n`` for the
whole integration (the starting noise at their positions) and per-token time ``c``, and the clean
given tokens are returned there. ``c = 0`` (the default) holds them clean at ``t = 0``; ``c > 0``
matches a model trained with noise-augmented conditioning (e.g. a video's first frame at
``t ~ U[0, 0.2]``, paper App. E/F). Labels equal to the null class (``num_classes``) give the
unconditional branch of guidance.

**The SDE.** Write ``r = 1 - t`` for the time of the reverse process (r runs 0 → 1 as t runs
1 → 0). The ODE ``dx/dt = v(x, t)`` reads ``dx = -v dr``. Adding Langevin dynamics with any
diffusion coefficient ``D(t) >= 0`` leaves the marginals ``p_t`` unchanged: in the Fokker–Planck
equation the term ``∇·(p D ∇log p)`` of the drift ``D·score`` cancels the ``D Δp`` of the noise,
so

    dx = [-v + D(t)·score(x, t)] dr + sqrt(2 D(t)) dW

has the same marginals as the ODE. For the linear path ``x_t = (1 - t) x0 + t x1`` the score is
known from the velocity: ``x = (1 - t) E[x0|x] + t E[x1|x]`` and ``v = E[x1|x] - E[x0|x]`` give
``E[x1|x] = x + (1 - t) v``, and Tweedie's formula (``x1`` is standard normal, scaled by ``t``)
gives ``score = -E[x1|x] / t = -(x + (1 - t) v) / t``. SiT's "sigma" diffusion form takes ``D``
proportional to the noise scale ``sigma_t = t``: ``D(t) = norm·t`` (``sde_diffusion_norm``), which
cancels the division by ``t``:

    drift = -v - norm·(x + (1 - t)·v).

The solver makes ``steps`` model evaluations on the times ``linspace(1, sde_last_step, steps)``
(shifted by ``shift`` as :func:`time_grid` is): ``steps - 1`` Euler–Maruyama steps
``mean = x + drift·dr``, ``x = mean + sqrt(2 D(t) dr)·z`` (``z`` from the generator), then one
deterministic "mean" step ``x + drift·t_last`` from the last time to 0, with no noise (SiT's
``last_step="Mean"``; the paper's ImageNet numbers use 250 steps and a last step of 0.04).
``norm = 0`` makes it the Euler ODE solver on that grid. Held tokens get no noise.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import attrs
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core.flow import shift_time
from selfflow_core.interfaces import Backbone, TextEncoding
from selfflow_core.prompts import empty_prompt, has_text
from selfflow_core.types import TokenBatch

Method = Literal["euler", "heun", "sde"]
#: the sampling methods, in words: ODE solvers of first and second order, and the SDE
METHODS: tuple[str, ...] = typing.get_args(Method)


@attrs.frozen(kw_only=True)
class SamplingConfig:
    """How samples are drawn: ``method`` (``"euler"``, ``"heun"`` or ``"sde"``), ``steps`` (solver
    steps, one model evaluation each; Heun makes two on all but the last), time ``shift`` (> 1
    spends more steps at high noise), ``cfg_scale`` (1 = no guidance), ``count`` samples,
    ``seed``, and ``every`` (steps between sample grids during training; 0 = only at the end).

    ``condition_t`` in [0, 1): the time conditioning tokens are held at (fed noised to that
    level with one fixed noise draw; 0 = clean), to match noise-augmented conditioning in
    training (paper App. E/F). The SDE's settings (``method="sde"`` only): ``sde_last_step`` in
    (0, 1), the length of the final noise-free "mean" step to t = 0 (the paper's 0.04; with a
    ``shift`` the step starts at the shifted time), and ``sde_diffusion_norm`` >= 0, the scale
    of the diffusion ``D(t) = norm·t`` (0: the Euler ODE with that last step). See
    :mod:`selfflow_core.sampling`."""

    method: Method = "euler"
    steps: int = attrs.field(default=50, validator=v.ge(1))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))
    cfg_scale: float = attrs.field(default=1.0, validator=v.ge(0))
    count: int = attrs.field(default=100, validator=v.ge(1))
    seed: int = 0
    every: int = attrs.field(default=0, validator=v.ge(0))
    condition_t: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)])
    sde_last_step: float = attrs.field(default=0.04, validator=[v.gt(0.0), v.lt(1.0)])
    sde_diffusion_norm: float = attrs.field(default=1.0, validator=[v.ge(0.0), v.lt(math.inf)])
    #: prompt-conditioned runs: the prompts samples are drawn from (sample i gets prompt
    #: ``i % len(prompts)``); guidance is against the empty prompt
    prompts: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: score the trainer's samples with their modality's fixed prompt evaluator (where it has
    #: one) and log ``eval/<modality>/<metric>``; off by default (an evaluator may be costly to
    #: build, e.g. a reader trained on first use)
    evaluate: bool = False


def time_grid(steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """``steps + 1`` decreasing times from 1 to 0, shifted by the paper's ``s(alpha, t)``."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64),
                      shift).float()


def sde_time_grid(steps: int, last_step: float, shift: float,
                  device: torch.device | str = "cpu") -> Tensor:
    """The SDE's ``steps`` decreasing evaluation times, from 1 to ``last_step`` (both shifted by
    ``s(alpha, t)`` as in :func:`time_grid`); the final "mean" step goes from the last to 0."""
    return shift_time(torch.linspace(1.0, last_step, steps, device=device, dtype=torch.float64),
                      shift).float()


def _velocity(model: Backbone, x: Tensor, t: Tensor, prompt: TokenBatch, cfg_scale: float,
              null_label: int | None, held_t: float = 0.0,
              empty_text: TextEncoding | None = None) -> Tensor:
    tt = torch.where(prompt.condition, torch.full_like(t, held_t), t)
    labelled = prompt.labels is not None and null_label is not None
    if cfg_scale == 1.0 or not (labelled or has_text(prompt)):
        return model(x, tt, prompt).velocity
    # the unconditional branch: the null class and the empty prompt (what dropout trained)
    unconditional = empty_prompt(prompt, empty_text)
    if labelled:
        unconditional = attrs.evolve(unconditional,
                                     labels=torch.full_like(prompt.labels, null_label))
    both = TokenBatch.cat([prompt, unconditional])
    cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), both).velocity.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _check(steps: int, method: str, condition_t: float, sde_last_step: float,
           sde_diffusion_norm: float) -> None:
    if method not in METHODS:
        raise ValueError(f"sample: method must be one of {', '.join(map(repr, METHODS))}; "
                         f"got {method!r}")
    if not steps >= 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")
    if not 0.0 <= condition_t < 1.0:
        raise ValueError(f"sample: condition_t must be in [0, 1), got {condition_t}")
    if method == "sde" and not 0.0 < sde_last_step < 1.0:
        raise ValueError(f"sample: sde_last_step must be in (0, 1), got {sde_last_step}")
    if method == "sde" and not 0.0 <= sde_diffusion_norm < math.inf:
        raise ValueError(f"sample: sde_diffusion_norm must be finite and >= 0, "
                         f"got {sde_diffusion_norm}")


@torch.no_grad()
def sample(model: Backbone, prompt: TokenBatch, *, steps: int = 50, method: Method = "euler",
           shift: float = 1.0, cfg_scale: float = 1.0, null_label: int | None = None,
           generator: torch.Generator | None = None, condition_t: float = 0.0,
           sde_last_step: float = 0.04, sde_diffusion_norm: float = 1.0,
           empty_text: TextEncoding | None = None) -> Tensor:
    """Integrate from noise at t = 1 to t = 0 with ``method`` (``"euler"`` or ``"heun"`` on
    ``dx/dt = v(x, t)``, or ``"sde"``: see the module docs); returns tokens [B, N, C], the
    prompt's clean tokens at its conditioning positions. Those are seen by the model at time
    ``condition_t`` (noised to it with the starting noise at their positions). Guidance of a
    prompted batch is against ``empty_text``, the run's encoding of ``""``
    (:func:`selfflow_core.prompts.empty_prompt`; None: no text token)."""
    _check(steps, method, condition_t, sde_last_step, sde_diffusion_norm)
    held = prompt.condition[..., None]
    noise = torch.randn(prompt.tokens.shape, generator=generator, device=prompt.tokens.device)
    c = float(condition_t)
    given = prompt.tokens if c == 0.0 else (1.0 - c) * prompt.tokens + c * noise
    x = torch.where(held, given, noise)
    b, n = prompt.valid.shape
    if method == "sde":
        x = _sde(model, x, given, prompt, steps=steps, shift=shift, cfg_scale=cfg_scale,
                 null_label=null_label, generator=generator, held_t=c, last_step=sde_last_step,
                 norm=sde_diffusion_norm, empty_text=empty_text)
        return torch.where(held, prompt.tokens, x)
    grid = time_grid(steps, shift, x.device)
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        vel = _velocity(model, x, t.expand(b, n), prompt, cfg_scale, null_label, c, empty_text)
        x_next = torch.where(held, given, x + (t_next - t) * vel)
        if method == "heun" and float(t_next) > 0:  # the corrector also sees held tokens as given
            vel2 = _velocity(model, x_next, t_next.expand(b, n), prompt, cfg_scale, null_label, c,
                             empty_text)
            x_next = x + (t_next - t) * 0.5 * (vel + vel2)
        x = torch.where(held, given, x_next)
    return torch.where(held, prompt.tokens, x)


def _sde(model: Backbone, x: Tensor, given: Tensor, prompt: TokenBatch, *, steps: int,
         shift: float, cfg_scale: float, null_label: int | None,
         generator: torch.Generator | None, held_t: float, last_step: float,
         norm: float, empty_text: TextEncoding | None) -> Tensor:
    """Euler–Maruyama on ``dx = [-v - norm·(x + (1 - t) v)] dr + sqrt(2·norm·t) dW`` over
    :func:`sde_time_grid`, then the noise-free mean step to t = 0."""
    held = prompt.condition[..., None]
    b, n = prompt.valid.shape
    grid = sde_time_grid(steps, last_step, shift, x.device)

    def drift(x: Tensor, t: Tensor) -> Tensor:
        vel = _velocity(model, x, t.expand(b, n), prompt, cfg_scale, null_label, held_t,
                        empty_text)
        return -vel - norm * (x + (1 - t) * vel)

    for i in range(steps - 1):
        t, t_next = grid[i], grid[i + 1]
        dr = t - t_next
        mean = x + drift(x, t) * dr
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x = torch.where(held, given, mean + torch.sqrt(2 * norm * t * dr) * z)
    t = grid[-1]
    return torch.where(held, given, x + drift(x, t) * t)
