"""The resumable training data pipeline (``torchdata.nodes``): stores -> token batches, forever.

Per store, every epoch is a fresh permutation seeded by ``(seed, store index, epoch)``, cut into
``world_size`` equal shards (the last ``len % world_size`` samples of the permutation are left out
that epoch, so ranks get equal counts). Each rank's shards, epoch after epoch, form one stream
that is cut into batches, so a batch may hold the end of one epoch and the start of the next.
With several stores, a mixing draw seeded by ``(seed, group number)`` picks the store of each
group of ``group`` consecutive batches (the trainer's ``grad_accum`` micro-batches of one optimizer
step: paper App. D holds one modality per batch); the draw is the same on every rank, so all ranks
see the same modality at each step.

Stores holding ``<name>_mean`` / ``<name>_std`` get ``<name>`` drawn by :func:`sample_posterior`
with noise seeded by ``(seed, rank, step)``; stores holding ``captions`` (prompt-conditioned
runs) get one caption per sample drawn the same way (:mod:`selfflow_core.prompts`).

``shuffle=ShuffleConfig(kind="block")`` (stores larger than RAM) replaces the per-epoch
permutation by a block shuffle (:mod:`selfflow_core.data.blocks`): permuted chunk-aligned blocks,
split across ranks the same way, shuffled within windows of ``window_blocks`` blocks, each block
read whole, once per epoch (:class:`~selfflow_core.data.block_reader.BlockReader`); only about
the current window is held in memory.

The pipeline's whole state is ``{"step", "counts"}`` (batches given overall and per store) plus
what checks that a state fits the loader: plain ints, floats, lists and dicts, safe for JSON and
``torch.save(weights_only=True)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from torch import Tensor
from torchdata.nodes import BaseNode, Loader, Mapper, ParallelMapper, Prefetcher

from selfflow_core.data.block_reader import BlockReader, block_samples
from selfflow_core.data.blocks import BlockPlan, ShuffleConfig
from selfflow_core.data.store import LatentStore
from selfflow_core.interfaces import TextEncoder
from selfflow_core.prompts import (
    TEXT_EMBEDDINGS,
    caption_fields,
    choose_caption_indices,
    stored_encoding,
    with_text,
)
from selfflow_core.types import TokenBatch

STATE_VERSION = 1
#: what a state saved before a key existed had
LEGACY_IDENTITY: dict[str, Any] = {"group": 1, "shuffle": "full"}
_PERMUTATION, _MIXING, _POSTERIOR, _CAPTION = 0, 1, 2, 3  # keep the seeded streams apart


def sample_posterior(fields: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """For every pair ``<name>_mean`` / ``<name>_std`` (a stored Gaussian posterior), add
    ``<name> = mean + std * noise`` (float32; noise from ``generator``). Other fields pass as is."""
    out = dict(fields)
    for key in fields:
        if key.endswith("_mean") and (std_key := key[: -len("_mean")] + "_std") in fields:
            mean, std = fields[key].float(), fields[std_key].float()
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            out[key[: -len("_mean")]] = mean + std * noise
    return out


def _has_posterior(fields: Sequence[str]) -> bool:
    return any(k.endswith("_mean") and k[: -len("_mean")] + "_std" in fields for k in fields)


@attrs.frozen(kw_only=True)
class LoaderSource:
    """One store in the mix: how to tokenize its batches, its batch size and mixing weight."""

    store: LatentStore
    tokenize: Callable[[dict[str, Tensor]], TokenBatch]
    batch_size: int = attrs.field(validator=v.ge(1))
    probability: float = attrs.field(default=1.0, validator=v.gt(0.0))
    #: the run's text encoder (prompt-conditioned runs): one of each sample's stored captions,
    #: drawn per step, becomes the batch's text (:mod:`selfflow_core.prompts`)
    text: TextEncoder | None = None


@attrs.frozen
class _Shards:
    """Which samples of one store a rank reads, batch by batch, epoch after epoch."""

    size: int
    batch_size: int
    store_index: int
    seed: int
    rank: int
    world_size: int
    _cache: dict[int, np.ndarray] = attrs.field(factory=collections.OrderedDict, eq=False)

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's samples of ``epoch``, in order."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, _PERMUTATION, self.store_index, epoch])
            perm = rng.permutation(self.size)[: self.per_rank * self.world_size]
            self._cache[epoch] = perm[self.rank:: self.world_size]
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def batch(self, number: int) -> np.ndarray:
        """Sample indices of this rank's batch ``number`` (counted from the first epoch)."""
        out, position = [], number * self.batch_size
        while sum(map(len, out)) < self.batch_size:
            epoch, offset = divmod(position, self.per_rank)
            take = min(self.per_rank - offset, self.batch_size - sum(map(len, out)))
            out.append(self.shard(epoch)[offset: offset + take])
            position += take
        return np.concatenate(out)


class _BatchPlan(BaseNode):
    """Yields ``(store index, sample indices, state after this batch)``; starts from ``start``."""

    def __init__(self, shards: Sequence[_Shards | BlockPlan], probabilities: np.ndarray, seed: int,
                 start: Mapping[str, Any], group: int = 1) -> None:
        super().__init__()
        self.shards, self.seed, self.group = shards, seed, group
        self.cumulative = np.cumsum(probabilities / probabilities.sum())
        self.start = {"step": int(start["step"]), "counts": [int(c) for c in start["counts"]]}

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or self.start
        self.step, self.counts = int(state["step"]), [int(c) for c in state["counts"]]

    def choose(self, step: int) -> int:
        """The store giving batch ``step``: a draw seeded by ``(seed, step // group)``, one for
        each group of ``group`` consecutive batches."""
        if len(self.shards) == 1:
            return 0
        u = np.random.default_rng([self.seed, _MIXING, step // self.group]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.shards) - 1)

    def next(self) -> tuple[int, np.ndarray, int, dict[str, Any]]:
        step, s = self.step, self.choose(self.step)
        indices = self.shards[s].batch(self.counts[s])
        self.step += 1
        self.counts[s] += 1
        return s, indices, step, self.get_state()

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "counts": list(self.counts)}


def _stop_threads(node: Any, seen: set[int]) -> None:
    """Stop a torchdata pipeline's threads now, outermost first, from this thread (left to the
    garbage collector, a worker thread may end up joining itself)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if callable(getattr(node, "_shutdown", None)):
        node._shutdown()
    for child in ("root", "_it", "source"):
        _stop_threads(getattr(node, child, None), seen)


@attrs.frozen
class _Failure:
    """An exception raised while loading a batch on a pipeline thread."""

    error: Exception


class LatentLoader:
    """An endless, resumable iterable of ``(source index, TokenBatch)``; build it with
    :func:`build_loader`. ``state_dict()`` is the position after the last batch handed out;
    a loader built with the same arguments continues exactly from it after ``load_state_dict``.
    With ``shuffle.kind == "block"`` each source's store is read through a block reader
    (``sources[i].store``), which holds the current window's blocks only."""

    def __init__(self, sources: Sequence[LoaderSource], *, seed: int, rank: int, world_size: int,
                 num_workers: int, prefetch: int, group: int = 1,
                 shuffle: ShuffleConfig | None = None) -> None:
        self.shuffle = shuffle or ShuffleConfig()
        self.sources = list(sources)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # batches that share one mixing draw; with one store there is nothing to draw
        self.group = group if len(self.sources) > 1 else 1
        self.num_workers, self.prefetch = num_workers, prefetch
        self.shards: list[_Shards | BlockPlan]
        #: samples per block of each store (the block shuffle)
        self.blocks: list[int] = []
        if self.shuffle.kind == "full":
            self.shards = [_Shards(len(s.store), s.batch_size, i, seed, rank, world_size)
                           for i, s in enumerate(self.sources)]
        else:
            self.blocks = [block_samples(s.store, self.shuffle.block_chunks)
                           for s in self.sources]
            self.shards = [BlockPlan(len(s.store), s.batch_size, b, self.shuffle.window_blocks,
                                     i, seed, rank, world_size)
                           for i, (s, b) in enumerate(zip(self.sources, self.blocks))]
            # partly taken blocks are kept up to two windows' worth (the current and the next,
            # which workers start on while the current one's last batches are gathered)
            self.sources = [attrs.evolve(s, store=BlockReader(s.store, b,
                                                               2 * self.shuffle.window_blocks))
                            for s, b in zip(self.sources, self.blocks)]
        self._state: dict[str, Any] = {"step": 0, "counts": [0] * len(self.sources)}
        self._generation = 0

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [[len(s.store), s.batch_size, s.probability] for s in self.sources],
                "group": self.group, "shuffle": self._shuffle_identity()}

    def _shuffle_identity(self) -> str | dict[str, Any]:
        if self.shuffle.kind == "full":
            return "full"
        return {"kind": "block", "block_samples": list(self.blocks),
                "window_blocks": self.shuffle.window_blocks}

    def _load(self, item: tuple[int, np.ndarray, int, dict]
              ) -> tuple[int, TokenBatch | _Failure, dict]:
        s, indices, step, state = item
        source = self.sources[s]
        try:
            numeric, captions = caption_fields(source.store.read(indices))
            fields = {k: torch.from_numpy(a) for k, a in numeric.items()}
            if _has_posterior(list(fields)):
                fields = sample_posterior(fields, self._generator(_POSTERIOR, step))
            batch = source.tokenize(fields)
            if source.text is not None and captions is not None:
                chosen = choose_caption_indices(captions, self._generator(_CAPTION, step))
                if TEXT_EMBEDDINGS in numeric:  # a frozen encoder's, precomputed
                    encoding = stored_encoding(numeric, chosen)
                else:                          # a trainable encoder's ids, online
                    encoding = source.text.encode([str(captions[i, k]) if k >= 0 else ""
                                                   for i, k in enumerate(chosen)])
                batch = with_text(batch, encoding)
            return s, batch.with_padding_hint(), state
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there as is
            return s, _Failure(exc), state

    def _generator(self, stream: int, step: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, stream, self.rank, step])
        return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def _pipeline(self) -> Loader:
        node: BaseNode = _BatchPlan(self.shards, np.array([s.probability for s in self.sources]),
                                    self.seed, self._state, self.group)
        if self.num_workers > 0:
            node = ParallelMapper(node, self._load, num_workers=self.num_workers, method="thread",
                                  in_order=True)
        else:
            node = Mapper(node, self._load)
        if self.prefetch > 0:
            node = Prefetcher(node, prefetch_factor=self.prefetch)
        return Loader(node, restart_on_stop_iteration=False)

    def __iter__(self) -> Iterator[tuple[int, TokenBatch]]:
        self._generation += 1
        generation = self._generation
        pipeline = self._pipeline()
        try:
            for s, batch, state in pipeline:
                if generation != self._generation:  # superseded by load_state_dict or iter()
                    return
                if isinstance(batch, _Failure):
                    # raised in the consumer's thread with its own type (a StoreError naming
                    # the damaged chunk), not torchdata's RuntimeError holding a traceback text
                    raise batch.error
                self._state = state
                yield s, batch
        finally:
            _stop_threads(pipeline, set())

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, lists and dicts: the position after the last batch handed out."""
        return {"version": STATE_VERSION, "step": self._state["step"],
                "counts": list(self._state["counts"]), **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` on the next ``iter()``; refuses a state of another setup."""
        mine = self._identity()
        # a state from before groups: each batch had its own draw (the same as a group of 1)
        theirs = {k: state.get(k, LEGACY_IDENTITY.get(k)) for k in mine}
        if theirs != mine or state.get("version") != STATE_VERSION:
            differ = [k for k in (*mine, "version")
                      if state.get(k, LEGACY_IDENTITY.get(k))
                      != {**mine, "version": STATE_VERSION}[k]]
            raise ValueError(f"loader state does not fit this loader (differs in {differ}): it "
                             "was saved with other seed, rank, world size, stores, group of "
                             "batches per modality draw (grad_accum) or shuffle")
        self._state = {"step": int(state["step"]), "counts": [int(c) for c in state["counts"]]}
        self._generation += 1


def build_loader(sources: Sequence[LoaderSource], *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch: int = 2,
                 group: int = 1, shuffle: ShuffleConfig | None = None) -> LatentLoader:
    """The training loader over ``sources`` for ``rank`` of ``world_size``: each batch is one
    store read, tokenized on ``num_workers`` threads (0: inline), ``prefetch`` batches ahead.
    With several sources, each run of ``group`` consecutive batches (counted from the first:
    the trainer's ``grad_accum`` micro-batches of one optimizer step) comes from one source.
    ``shuffle``: the epoch order (:class:`~selfflow_core.data.blocks.ShuffleConfig`; None: the
    full shuffle)."""
    if not sources:
        raise ValueError("build_loader: no sources")
    if group < 1:
        raise ValueError(f"build_loader: group must be at least 1, got {group}")
    if not 0 <= rank < world_size:
        raise ValueError(f"build_loader: rank {rank} not in 0..{world_size - 1}")
    for s in sources:
        if len(s.store) // world_size < s.batch_size:
            raise ValueError(f"latent store {s.store.path}: {len(s.store)} samples give each of "
                             f"{world_size} rank(s) {len(s.store) // world_size}, fewer than "
                             f"the batch size {s.batch_size}")
    return LatentLoader(sources, seed=seed, rank=rank, world_size=world_size,
                        num_workers=num_workers, prefetch=prefetch, group=group,
                        shuffle=shuffle)
