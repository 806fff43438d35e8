"""The one flow path of selfflow, in the paper's convention.

``x_t = (1 - t) * x0 + t * x1`` with ``x0`` data and ``x1 ~ N(0, I)``: ``t = 0`` is clean data,
``t = 1`` is pure noise. The velocity target is ``v = x1 - x0`` and sampling integrates
``dx/dt = v`` from ``t = 1`` down to ``t = 0``. Nothing anywhere flips time.
"""

from __future__ import annotations

import torch
from torch import Tensor


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """Noisy tokens at per-token time ``t`` ([B, N] or [B]); ``x0``, ``x1`` are [B, N, C].
    Written as the paper's formula, which is exact at both ends (``t = 1`` gives ``x1`` itself,
    not ``x0 + (x1 - x0)`` with a rounding error) and accepts mixed dtypes."""
    t = t.to(x0.dtype)
    while t.dim() < x0.dim():
        t = t.unsqueeze(-1)
    return (1 - t) * x0 + t * x1


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """The constant velocity of the linear path: noise minus data."""
    return x1 - x0


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """The paper's time shift ``s(alpha, t) = alpha t / (1 + (alpha - 1) t)`` (alpha > 1 ->
    noisier)."""
    return alpha * t / (1 + (alpha - 1) * t)


def velocity_from_data(x: Tensor, data: Tensor, t: Tensor, min_t: float) -> Tensor:
    """The velocity of a data prediction: ``x_t = x0 + t v`` gives ``v = (x_t - x0_hat) / t``,
    with ``t`` held at least ``min_t`` (near clean data the division would amplify the error of
    ``x0_hat`` without bound). ``t`` is [B, N] or [B]; ``x``, ``data`` are [B, N, C]."""
    t = t.to(torch.float32).clamp_min(min_t)
    while t.dim() < x.dim():
        t = t.unsqueeze(-1)
    return ((x.float() - data.float()) / t).to(data.dtype)


def head_velocity(config, x: Tensor, t: Tensor, head: Tensor, batch) -> Tensor:
    """The velocity of a backbone's output ``head`` at noisy tokens ``x``, time ``t``, by its
    ``config.prediction`` (a :class:`~selfflow_core.interfaces.BackboneConfig`): the head itself,
    or :func:`velocity_from_data`, 0 on the channels a token's modality does not have
    (``batch.channel_valid``), as the head's."""
    if config.prediction == "velocity":
        return head
    v = velocity_from_data(x, head, t, config.min_t)
    return v if batch.channel_valid is None else v * batch.channel_valid.to(v.dtype)
