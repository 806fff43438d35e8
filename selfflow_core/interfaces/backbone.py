"""Backbones: networks with per-token timesteps that can return hidden states of given blocks."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import attrs
from torch import Tensor, nn

from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.types import BackboneOutput, TokenBatch


@attrs.frozen(kw_only=True)
class BackboneConfig(ComponentConfig):
    """Base config of backbones. ``build(token_dims=..., num_classes=..., text=None)`` ->
    :class:`Backbone`; ``text`` (a :class:`~selfflow_core.interfaces.TextSpec`) is passed only
    in prompt-conditioned runs, to a backbone with a text stream."""

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
