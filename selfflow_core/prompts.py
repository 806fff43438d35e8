"""Prompts: captions from the store onto the token batch, caption dropout, the empty prompt.

A modality opts into prompt conditioning by storing a ``captions`` field: ``K`` UTF-8 strings
per sample (``""``: none; the paper used 4 captions per image). For every batch the loader draws
one non-empty caption per sample, seeded by ``(seed, rank, step)`` so a resumed run draws the
same ones, and the run's text encoder turns the chosen captions into ``TokenBatch.text_ids`` /
``text_mask`` (a trainable encoder, online) or ``text`` / ``text_mask`` (a frozen one).

For classifier-free guidance the trainer replaces a sample's prompt by the empty prompt with
probability ``caption_dropout`` (student and teacher see the same batch), and sampling guides
against the empty prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np
import torch
from torch import Tensor

from selfflow_core.interfaces import FieldSpec, TextEncoder, TextEncoding
from selfflow_core.types import TokenBatch

#: the store field holding each sample's captions ([K] strings; "" = no caption)
CAPTIONS = "captions"


#: a frozen encoder's output, precomputed per caption into the store ([K, L, D], [K, L], [K, P])
TEXT_EMBEDDINGS, TEXT_MASK, TEXT_POOLED = "text_embeddings", "text_mask", "text_pooled"


def choose_caption_indices(captions: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Per row of ``captions`` [B, K], the index of one caption drawn uniformly among its
    non-empty ones from ``generator`` (-1 when it has none: the empty prompt)."""
    rows = np.asarray(captions, dtype=object).reshape(len(captions), -1)
    u = torch.rand(len(rows), generator=generator).numpy()
    out = np.full(len(rows), -1, dtype=np.int64)
    for i, (row, x) in enumerate(zip(rows, u)):
        present = [j for j, c in enumerate(row) if str(c)]
        if present:
            out[i] = present[min(int(x * len(present)), len(present) - 1)]
    return out


def choose_captions(captions: np.ndarray, generator: torch.Generator) -> list[str]:
    """One caption per row of ``captions`` [B, K]: uniformly among its non-empty ones (the empty
    prompt when it has none), drawn from ``generator``."""
    rows = np.asarray(captions, dtype=object).reshape(len(captions), -1)
    return [str(rows[i, k]) if k >= 0 else ""
            for i, k in enumerate(choose_caption_indices(rows, generator))]


def stored_encoding(fields, chosen: np.ndarray) -> TextEncoding:
    """The precomputed encoding of caption ``chosen[b]`` of each sample (-1: the empty prompt,
    all masked)."""
    rows = torch.arange(len(chosen))
    k = torch.as_tensor(np.maximum(chosen, 0))
    present = torch.as_tensor(chosen >= 0)
    emb = torch.as_tensor(fields[TEXT_EMBEDDINGS])[rows, k].float()
    mask = torch.as_tensor(fields[TEXT_MASK])[rows, k].bool() & present[:, None]
    pooled = (torch.as_tensor(fields[TEXT_POOLED])[rows, k].float() * present[:, None]
              if TEXT_POOLED in fields else None)
    return TextEncoding(embeddings=emb * mask[..., None], mask=mask, pooled=pooled)


class WithTextEmbeddings:
    """A modality adapter whose store also holds a frozen text encoder's output for every
    caption (:data:`TEXT_EMBEDDINGS`, :data:`TEXT_MASK`, :data:`TEXT_POOLED`), computed while
    encoding; the encoder's ``info()`` joins the store schema's ``encoder`` entry, so a store
    made with another text encoder is refused. Everything else is the adapter's."""

    def __init__(self, adapter, encoder: TextEncoder) -> None:
        self.adapter, self.text_encoder = adapter, encoder

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def fields(self):
        out = dict(self.adapter.fields())
        k = out[CAPTIONS].shape[0]
        spec, dtype = self.text_encoder.spec(), str(self.text_encoder.info().get("dtype",
                                                                                 "float32"))
        out[TEXT_EMBEDDINGS] = FieldSpec(shape=(k, spec.max_length, spec.dim), dtype=dtype)
        out[TEXT_MASK] = FieldSpec(shape=(k, spec.max_length), dtype="bool")
        if spec.pooled_dim:
            out[TEXT_POOLED] = FieldSpec(shape=(k, spec.pooled_dim), dtype=dtype)
        return out

    def encoder_info(self):
        return {**dict(self.adapter.encoder_info()), "text_encoder": dict(self.text_encoder.info())}

    def encode(self, raw):
        out = dict(self.adapter.encode(raw))
        captions = np.asarray(out[CAPTIONS], dtype=object)
        n, k = captions.shape
        enc = self.text_encoder.encode([str(c) for c in captions.reshape(-1)])
        dtype = self.fields()[TEXT_EMBEDDINGS].dtype
        out[TEXT_EMBEDDINGS] = (enc.embeddings.float().reshape(n, k, *enc.embeddings.shape[1:])
                                .numpy().astype(dtype))
        out[TEXT_MASK] = enc.mask.reshape(n, k, -1).numpy()
        if enc.pooled is not None:
            out[TEXT_POOLED] = enc.pooled.float().reshape(n, k, -1).numpy().astype(dtype)
        return out


def with_text(batch: TokenBatch, encoding: TextEncoding) -> TokenBatch:
    """``batch`` with an encoded prompt per sample (on the batch's device)."""
    dev = batch.tokens.device

    def put(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dev)

    return attrs.evolve(batch, text=put(encoding.embeddings), text_ids=put(encoding.ids),
                        text_mask=put(encoding.mask), text_pooled=put(encoding.pooled))


def has_text(batch: TokenBatch) -> bool:
    return batch.text_mask is not None


def empty_prompt(batch: TokenBatch, encoder: TextEncoder | None = None) -> TokenBatch:
    """``batch`` with every sample's prompt the empty one: ids 0 / embeddings of ``""`` and no
    real text token (``text_mask`` all False). A frozen encoder gives the embeddings of ``""``
    (``encoder``); without it they are zeros, which the mask hides from the backbone."""
    if not has_text(batch):
        return batch
    if encoder is not None:
        return with_text(batch, encoder.encode([""] * batch.tokens.shape[0]))
    def zero(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.zeros_like(t)

    return attrs.evolve(batch, text=zero(batch.text), text_ids=zero(batch.text_ids),
                        text_mask=zero(batch.text_mask), text_pooled=zero(batch.text_pooled))


def drop_prompts(batch: TokenBatch, drop: Tensor, empty: TokenBatch | None = None) -> TokenBatch:
    """Samples where ``drop`` [B] is True get the empty prompt (``empty``: the batch's empty
    version, :func:`empty_prompt` by default)."""
    if not has_text(batch):
        return batch
    empty = empty if empty is not None else empty_prompt(batch)

    def pick(mine: Tensor | None, null: Tensor | None) -> Tensor | None:
        if mine is None:
            return None
        where = drop.reshape(-1, *([1] * (mine.dim() - 1)))
        return torch.where(where, null.to(mine.dtype), mine)

    return attrs.evolve(batch, **{name: pick(getattr(batch, name), getattr(empty, name))
                                  for name in ("text", "text_ids", "text_mask", "text_pooled")})


def caption_fields(fields: Mapping[str, np.ndarray]) -> tuple[dict, np.ndarray | None]:
    """Split a store read into its numeric fields and its ``captions`` (None without)."""
    rest = {k: v for k, v in fields.items() if k != CAPTIONS}
    return rest, (fields[CAPTIONS] if CAPTIONS in fields else None)


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str]) -> TextEncoding:
    """The run's encoder on explicit prompts (sampling)."""
    return encoder.encode([str(p) for p in prompts])
