"""Plain data passed between components. Tensors carry their shapes in the field docs.

Shapes: ``B`` samples, ``N`` tokens per sample, ``C`` channels per token, ``P`` position axes.
Time convention (see :mod:`selfflow_core.flow`): ``t = 0`` is data, ``t = 1`` is noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs
import torch
from torch import Tensor


@attrs.frozen(kw_only=True)
class TokenBatch:
    """A batch of token sequences, as a modality adapter hands it to the trainer.

    - ``tokens`` [B, N, C]: clean latent tokens (the flow path's ``x0``).
    - ``positions`` [B, N, P] float: coordinates of each token (1-D time, 2-D grid, 3-D video ...).
    - ``modality_ids`` [B, N] long: which modality each token belongs to (index into the
      backbone's modality table; 0 for single-modality runs).
    - ``valid`` [B, N] bool: ``False`` marks padding; padding never counts in any loss.
    - ``condition`` [B, N] bool: tokens given clean as conditioning (e.g. the first video frame,
      a robot's state); they are held at ``t = 0`` and excluded from the losses.
    - ``channel_valid`` [B, N, C] bool or None: for sequences mixing token widths, marks the
      channels that carry data; padded channels do not count in the flow loss.
    - ``labels`` [B] long or None: class labels (the null class is ``num_classes``).
    - ``text`` [B, L, D] float or None: a prompt's embeddings from a frozen text encoder (see
      :mod:`selfflow_core.interfaces.text`), or ``text_ids`` [B, L] long: its token ids for a
      trainable one (the backbone embeds them); ``text_mask`` [B, L] bool (set with either):
      real text tokens (the empty prompt of guidance has none); ``text_pooled`` [B, P] or None.
      All None: no prompt (class-conditional or unconditional runs).
    - ``padded`` bool or None: a host-side hint, whether any token is padding, set by
      :meth:`with_padding_hint` where the batch is made on the host (the loader does); None:
      unknown, and a backbone that needs it reads ``valid`` back from the device (one sync).
      Replacing ``valid`` (``attrs.evolve``) must drop the hint (``padded=None``).
    """

    tokens: Tensor
    positions: Tensor
    modality_ids: Tensor
    valid: Tensor
    condition: Tensor
    labels: Tensor | None = None
    channel_valid: Tensor | None = None
    text: Tensor | None = None
    text_ids: Tensor | None = None
    text_mask: Tensor | None = None
    text_pooled: Tensor | None = None
    padded: bool | None = None

    @classmethod
    def single(cls, tokens: Tensor, positions: Tensor, *, labels: Tensor | None = None,
               modality_id: int = 0, valid: Tensor | None = None,
               condition: Tensor | None = None) -> TokenBatch:
        """Build a batch where every token belongs to one modality; defaults: all valid, none
        held."""
        b, n = tokens.shape[:2]
        dev = tokens.device
        return cls(
            tokens=tokens, positions=positions.to(tokens.dtype),
            modality_ids=torch.full((b, n), modality_id, dtype=torch.long, device=dev),
            valid=torch.ones(b, n, dtype=torch.bool, device=dev) if valid is None else valid,
            condition=(torch.zeros(b, n, dtype=torch.bool, device=dev) if condition is None
                       else condition),
            labels=labels,
        )

    @property
    def target_mask(self) -> Tensor:
        """[B, N] bool: tokens that are generated (valid and not conditioning)."""
        return self.valid & ~self.condition

    def map(self, fn: Callable[[Tensor], Tensor]) -> TokenBatch:
        """A batch with ``fn`` applied to every tensor field (the optional ones when present):
        the one place that lists the fields, so no operation can forget one."""
        return attrs.evolve(self, **{
            f.name: fn(v) for f in attrs.fields(TokenBatch)
            if isinstance(v := getattr(self, f.name), Tensor)})

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch on ``device``."""
        return self.map(lambda t: t.to(device))

    def rows(self, index: slice | Tensor) -> TokenBatch:
        """The samples ``index`` selects (a slice or an index tensor), every field alike."""
        return self.map(lambda t: t[index])

    def repeat_samples(self, times: int) -> TokenBatch:
        """Each sample ``times`` times in a row (``repeat_interleave`` on the sample axis)."""
        return self.map(lambda t: t.repeat_interleave(times, 0))

    @staticmethod
    def cat(batches: Sequence[TokenBatch]) -> TokenBatch:
        """The batches one after another on the sample axis. Optional fields must be present in
        all or none of them."""
        first = batches[0]
        out = {}
        for f in attrs.fields(TokenBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "padded":
                out[f.name] = None if None in values else any(values)
            elif any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"TokenBatch.cat: field {f.name!r} is set in some batches only")
            elif values[0] is not None:
                out[f.name] = torch.cat(values)
        return attrs.evolve(first, **out)

    def with_padding_hint(self) -> TokenBatch:
        """The batch with :attr:`padded` set from ``valid`` (call it where ``valid`` is on the
        host: it reads the mask)."""
        return attrs.evolve(self, padded=not bool(self.valid.all()))


@attrs.frozen(kw_only=True)
class TimestepPlan:
    """Per-token noise levels for one step.

    - ``student_t`` [B, N]: the student's timestep per token (``s`` on masked tokens, ``t``
      elsewhere).
    - ``teacher_t`` [B, N]: the teacher's timestep, ``min(t, s)`` for every token (the cleaner
      view).
    - ``masked`` [B, N] bool: tokens that received the second timestep ``s``.
    """

    student_t: Tensor
    teacher_t: Tensor
    masked: Tensor


@attrs.frozen(kw_only=True)
class BackboneOutput:
    """``velocity`` [B, N, C] and the hidden states [B, N, D] of requested blocks (1-indexed)."""

    velocity: Tensor | None
    features: Mapping[int, Tensor]


@attrs.frozen(kw_only=True)
class LossTerms:
    """The objective's result: ``total`` (for backward), its terms, and detached scalar metrics
    (tensors, so that nothing waits for the device until they are logged)."""

    total: Tensor
    flow: Tensor
    rep: Tensor
    metrics: Mapping[str, Tensor] = attrs.field(factory=dict)
