"""Prompts: captions from the store onto the token batch, caption dropout, the empty prompt.

A modality opts into prompt conditioning by storing a ``captions`` field: ``K`` UTF-8 strings
per sample (``""``: none; the paper used 4 captions per image). For every batch the loader draws
one non-empty caption per sample, seeded by ``(seed, rank, step)`` so a resumed run draws the
same ones, and the run's text encoder turns the chosen captions into ``TokenBatch.text_ids`` /
``text_mask`` (a trainable encoder, online) or ``text`` / ``text_mask`` (a frozen one).

For classifier-free guidance the trainer replaces a sample's prompt by the empty prompt with
probability ``caption_dropout`` (student and teacher see the same batch), and sampling guides
against the empty prompt. The empty prompt is the run's text encoder's encoding of ``""``: for
the byte encoder no text token at all; for a frozen encoder its output for ``""`` (T5's end
token, CLIP's start and end tokens), computed once when the store is made and kept in the
store's schema (:data:`EMPTY_PROMPT`), so training never loads the encoder and guidance at
sampling uses the very embedding dropout trained with.
"""

from __future__ import annotations

import base64
import hashlib
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
#: the store schema's entry holding the frozen encoder's encoding of "" (see :func:`empty_record`)
EMPTY_PROMPT = "empty_prompt"


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


def empty_encoding(encoder: TextEncoder) -> TextEncoding:
    """The encoder's encoding of the empty prompt ``""`` (one row)."""
    return encoder.encode([""])


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def empty_record(encoding: TextEncoding) -> dict:
    """A frozen encoder's encoding of ``""`` as a JSON entry: the embeddings of its real tokens
    (the mask's leading run; the rest is padding, zeros under the mask) and its pooled vector,
    as base64 little-endian float32, with their SHA-256."""
    mask = encoding.mask[0].bool()
    length = int(mask.sum())
    if length and not bool(mask[:length].all()):
        raise ValueError("the encoding of '' must put its tokens first (a leading mask)")
    emb = encoding.embeddings[0, :length].float().numpy()
    pooled = None if encoding.pooled is None else encoding.pooled[0].float().numpy()
    record = {"length": length, "dim": int(encoding.embeddings.shape[-1]),
              "embeddings": _b64(emb), "pooled": None if pooled is None else _b64(pooled)}
    record["sha256"] = _record_hash(record)
    return record


def _record_hash(record: Mapping) -> str:
    blob = f"{record['length']}:{record['dim']}:{record['embeddings']}:{record['pooled']}"
    return hashlib.sha256(blob.encode()).hexdigest()


def record_problems(record, spec_fields: Mapping[str, FieldSpec]) -> list[str]:
    """What is wrong with a store's :data:`EMPTY_PROMPT` entry for its text fields, in words
    (empty when it is sound)."""
    where = f"schema entry {EMPTY_PROMPT!r}"
    if not isinstance(record, Mapping):
        return [f"{where} is missing: the store holds {TEXT_EMBEDDINGS!r} but not the text "
                f"encoder's encoding of the empty prompt (made by an older selfflow; re-encode "
                f"the store)"]
    _, length, dim = spec_fields[TEXT_EMBEDDINGS].shape
    try:
        n, d = int(record["length"]), int(record["dim"])
        if _record_hash(record) != record.get("sha256"):
            return [f"{where}: its SHA-256 does not match its values (edited or damaged)"]
        emb = np.frombuffer(base64.b64decode(record["embeddings"]), dtype="<f4")
        pooled = (None if record["pooled"] is None
                  else np.frombuffer(base64.b64decode(record["pooled"]), dtype="<f4"))
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{where} is malformed ({type(exc).__name__}: {exc})"]
    problems = []
    if d != dim or not 0 <= n <= length or emb.size != n * d:
        problems.append(f"{where}: {n} token(s) of width {d} ({emb.size} values), expected at "
                        f"most {length} of width {dim}")
    want_pooled = spec_fields[TEXT_POOLED].shape[-1] if TEXT_POOLED in spec_fields else None
    if (pooled is None) != (want_pooled is None) or (pooled is not None
                                                     and pooled.size != want_pooled):
        problems.append(f"{where}: pooled vector of {None if pooled is None else pooled.size} "
                        f"values, expected {want_pooled}")
    if not np.isfinite(emb).all() or (pooled is not None and not np.isfinite(pooled).all()):
        problems.append(f"{where}: holds NaN or Inf")
    return problems


def encoding_from_record(record: Mapping, max_length: int) -> TextEncoding:
    """The one-row encoding a :func:`empty_record` entry stands for (padded to
    ``max_length``)."""
    n, d = int(record["length"]), int(record["dim"])
    emb = torch.zeros(1, max_length, d)
    emb[0, :n] = torch.from_numpy(
        np.frombuffer(base64.b64decode(record["embeddings"]), dtype="<f4").reshape(n, d).copy())
    mask = torch.zeros(1, max_length, dtype=torch.bool)
    mask[0, :n] = True
    pooled = (None if record["pooled"] is None else torch.from_numpy(
        np.frombuffer(base64.b64decode(record["pooled"]), dtype="<f4").copy())[None])
    return TextEncoding(embeddings=emb, mask=mask, pooled=pooled)


class WithTextEmbeddings:
    """A modality adapter whose store also holds a frozen text encoder's output for every
    caption (:data:`TEXT_EMBEDDINGS`, :data:`TEXT_MASK`, :data:`TEXT_POOLED`), computed while
    encoding; the encoder's ``info()`` joins the store schema's ``encoder`` entry, so a store
    made with another text encoder is refused. Everything else is the adapter's."""

    def __init__(self, adapter, encoder: TextEncoder) -> None:
        self.adapter, self.text_encoder = adapter, encoder

    def __getattr__(self, name):
        if name in ("adapter", "text_encoder"):  # not set yet (while unpickling)
            raise AttributeError(name)
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

    def schema_extras(self) -> dict:
        """Written into the store schema once, outside its configuration hash: the encoding of
        the empty prompt (:data:`EMPTY_PROMPT`)."""
        return {EMPTY_PROMPT: empty_record(empty_encoding(self.text_encoder))}

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


def empty_prompt(batch: TokenBatch, empty: TextEncoding | None = None) -> TokenBatch:
    """``batch`` with every sample's prompt the empty one: ``empty``, the run's encoding of
    ``""`` (one row, :func:`empty_encoding`), given to every sample; without it, no text token
    at all (ids 0, embeddings zero, ``text_mask`` all False), which is the byte encoder's
    encoding of ``""``."""
    if not has_text(batch):
        return batch
    if empty is None:
        def zero(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.zeros_like(t)

        return attrs.evolve(batch, text=zero(batch.text), text_ids=zero(batch.text_ids),
                            text_mask=zero(batch.text_mask), text_pooled=zero(batch.text_pooled))
    b, length = batch.text_mask.shape

    def fit(mine: Tensor | None, null: Tensor | None, seq: bool = True) -> Tensor | None:
        """``null`` (one row) for every sample; a sequence (``seq``) cut or zero-padded to the
        batch's text length."""
        if mine is None:
            return None
        if null is None:
            return torch.zeros_like(mine)
        null = null[:1].to(device=mine.device, dtype=mine.dtype)
        if seq:
            null = null[:, :length]
            null = torch.cat([null, null.new_zeros(1, length - null.shape[1], *null.shape[2:])], 1)
        return null.expand(b, *mine.shape[1:]).clone()

    if int(empty.mask[0].sum()) > length:
        raise ValueError(f"the empty prompt has {int(empty.mask[0].sum())} tokens, more than the "
                         f"batch's {length}")
    return attrs.evolve(batch, text=fit(batch.text, empty.embeddings),
                        text_ids=fit(batch.text_ids, empty.ids),
                        text_mask=fit(batch.text_mask, empty.mask),
                        text_pooled=fit(batch.text_pooled, empty.pooled, seq=False))


def drop_prompts(batch: TokenBatch, drop: Tensor, empty: TextEncoding | None = None
                 ) -> TokenBatch:
    """Samples where ``drop`` [B] is True get the empty prompt (``empty``: see
    :func:`empty_prompt`)."""
    if not has_text(batch):
        return batch
    null = empty_prompt(batch, empty)

    def pick(mine: Tensor | None, other: Tensor | None) -> Tensor | None:
        if mine is None:
            return None
        where = drop.reshape(-1, *([1] * (mine.dim() - 1)))
        return torch.where(where, other.to(mine.dtype), mine)

    return attrs.evolve(batch, **{name: pick(getattr(batch, name), getattr(null, name))
                                  for name in ("text", "text_ids", "text_mask", "text_pooled")})


def caption_fields(fields: Mapping[str, np.ndarray]) -> tuple[dict, np.ndarray | None]:
    """Split a store read into its numeric fields and its ``captions`` (None without)."""
    rest = {k: v for k, v in fields.items() if k != CAPTIONS}
    return rest, (fields[CAPTIONS] if CAPTIONS in fields else None)


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str]) -> TextEncoding:
    """The run's encoder on explicit prompts (sampling)."""
    return encoder.encode([str(p) for p in prompts])
