"""Backbones: networks with per-token timesteps that can return hidden states of given blocks."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

import attrs
from attrs import validators as v
from torch import Tensor, nn

from selfflow_core.interfaces.base import ComponentConfig, added_field
from selfflow_core.types import BackboneOutput, TokenBatch


@attrs.frozen(kw_only=True)
class BackboneConfig(ComponentConfig):
    """Base config of backbones. ``build(token_dims=..., num_classes=..., text=None)`` ->
    :class:`Backbone`; ``text`` (a :class:`~selfflow_core.interfaces.TextSpec`) is passed only
    in prompt-conditioned runs, to a backbone with a text stream.

    ``prediction``: what the output head predicts: ``"velocity"`` (the default), or ``"data"``,
    the clean tokens ``x0``, turned into the velocity the objective and the samplers use by
    :func:`~selfflow_core.flow.head_velocity` with ``t`` held at least ``min_t``. The loss
    stays the velocity loss either way. Data prediction is for tokens of many channels (large
    pixel patches) against a narrow model: clean data lies near a low-dimensional manifold a
    narrow head can reach, velocity and noise do not (JiT, Li & He 2025)."""

    prediction: Literal["velocity", "data"] = added_field(default="velocity",
                                                          validator=v.in_(("velocity", "data")))
    min_t: float = added_field(default=0.05, validator=[v.gt(0), v.lt(1)])

    @property
    def depth(self) -> int | None:
        """Number of blocks, when the config knows it before building (used to check the
        objective's layers early); None otherwise (checked when built)."""
        return None


class Backbone(nn.Module, abc.ABC):
    """A velocity network ``f(x_t, t)`` with one timestep per token.

    ``forward(x, t, batch, feature_layers=(l, ...), stop_after=k)``:
    - ``x`` [B, N, C] noisy tokens, ``t`` [B, N] per-token time (a [B] tensor is broadcast);
    - ``batch`` supplies positions, modality ids, valid mask and labels;
    - returns the velocity (``None`` if ``stop_after`` ended the pass early) and the hidden
      state after each requested block (blocks are 1-indexed, 1..depth).
    """

    #: number of blocks (the representation layers are 1..depth) and hidden width
    depth: int
    width: int

    @abc.abstractmethod
    def forward(self, x: Tensor, t: Tensor, batch: TokenBatch, *,
                feature_layers: Sequence[int] = (), stop_after: int | None = None
                ) -> BackboneOutput: ...

    def repeated_blocks(self) -> Sequence[nn.Module]:
        """The repeated blocks, in order: what per-block ``torch.compile``, activation
        checkpointing (a block with an ``activation_checkpointing`` attribute) and FSDP2 units
        wrap. None by default (the backbone is then compiled and sharded as a whole)."""
        return ()
