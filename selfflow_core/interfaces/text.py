"""Text encoders: captions -> what a prompt-conditioned backbone reads.

Two ways to condition on text, one interface:

- a **frozen** encoder (``trainable = False``: T5, CLIP, any pretrained model) maps captions to
  embeddings ``[B, L, D]`` + mask ``[B, L]`` (+ an optional pooled vector ``[B, P]``) once,
  during ``selfflow encode``; the store keeps them beside the caption text and training reads
  them back (``TokenBatch.text``);
- a **trainable** encoder (``trainable = True``: the built-in byte-level one) maps captions to
  token ids ``[B, L]`` + mask online, from the stored caption text (``TokenBatch.text_ids``);
  the backbone embeds the ids with weights learned jointly with it (``vocab_size`` rows).

``info()`` is recorded in the store's schema (name, version, max length, dtype, width), so a
store says which encoder made its embeddings and a run refuses a store made by another.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from torch import Tensor

from selfflow_core.interfaces.base import ComponentConfig


@attrs.frozen(kw_only=True)
class TextEncoderConfig(ComponentConfig):
    """Base config of text encoders; ``build()`` -> :class:`TextEncoder`."""


@attrs.frozen(kw_only=True, eq=False)
class TextEncoding:
    """One batch of encoded captions.

    - ``mask`` [B, L] bool: real tokens (``False``: padding); the empty prompt has none.
    - ``embeddings`` [B, L, D] float (frozen encoders) or None.
    - ``ids`` [B, L] long (trainable encoders) or None.
    - ``pooled`` [B, P] float or None (e.g. CLIP's pooled output).
    """

    mask: Tensor
    embeddings: Tensor | None = None
    ids: Tensor | None = None
    pooled: Tensor | None = None


@attrs.frozen(kw_only=True)
class TextSpec:
    """What a backbone must know to read an encoder's output: ``dim`` (embedding width D; None
    for ids), ``vocab_size`` (rows of the backbone's id embedding; None for embeddings),
    ``max_length`` L and ``pooled_dim`` P (0: none)."""

    max_length: int
    dim: int | None = None
    vocab_size: int | None = None
    pooled_dim: int = 0


class TextEncoder(abc.ABC):
    """Captions -> :class:`TextEncoding` (see the module doc for the two kinds)."""

    #: True: ids online, embedded by the backbone; False: embeddings, precomputed into the store
    trainable: bool = False

    @abc.abstractmethod
    def spec(self) -> TextSpec:
        """The shape of this encoder's output (what the backbone is built for)."""

    @abc.abstractmethod
    def encode(self, captions: Sequence[str]) -> TextEncoding:
        """Encode ``captions`` (``""`` is the empty prompt of classifier-free guidance)."""

    @abc.abstractmethod
    def info(self) -> Mapping[str, Any]:
        """JSON-safe identity recorded in the store schema: ``name``, ``version``,
        ``max_length``, ``dtype``, ``dim`` and anything that changes the output."""
