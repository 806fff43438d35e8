"""The resumable loader: epochs, sharding over ranks, exact resume, mixing of several stores."""

from __future__ import annotations

import io
import json
from collections import Counter

import attrs
import numpy as np
import pytest
import torch
from zarr.storage import MemoryStore

from selfflow_core.builtin.toy import ToyModality
from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.store import open_store
from selfflow_core.data.writer import StoreWriter, encode_store
from selfflow_core.types import TokenBatch


def index_store(n: int, *, posterior: bool = False, offset: int = 0):
    """A store whose field ``index`` holds each sample's own index (+ ``offset``)."""
    fields = {"index": {"shape": [], "dtype": "int64"}}
    if posterior:
        fields |= {"latents_mean": {"shape": [2], "dtype": "float32"},
                   "latents_std": {"shape": [2], "dtype": "float32"}}
    schema = {"format_version": 1, "modality": "test", "fields": fields, "config_hash": "test"}
    memory = MemoryStore()
    with StoreWriter(memory, schema) as w:
        idx = np.arange(n)
        batch = {"index": idx + offset}
        if posterior:
            batch |= {"latents_mean": np.stack([idx, -idx], 1).astype(np.float32),
                      "latents_std": np.full((n, 2), 0.5, np.float32)}
        w.append(batch)
        w.finish()
    return open_store(memory)


def tokenize(fields: dict[str, torch.Tensor]) -> TokenBatch:
    """Tokens carry the latents (if any); labels carry the sample indices."""
    index = fields["index"]
    x = fields.get("latents", index.float()[:, None])[:, None, :]
    return TokenBatch.single(x, torch.zeros(len(index), 1, 1), labels=index)


def source(store, batch_size: int, probability: float = 1.0) -> LoaderSource:
    return LoaderSource(store=store, tokenize=tokenize, batch_size=batch_size,
                        probability=probability)


def take(loader, k: int) -> list[tuple[int, TokenBatch]]:
    out = []
    for item in loader:
        out.append(item)
        if len(out) == k:
            break
    return out


def indices(batches) -> list[int]:
    return [int(i) for _, b in batches for i in b.labels]


def test_every_sample_once_per_epoch():
    store = index_store(100)
    seen = indices(take(build_loader([source(store, 8)], seed=0), 25))  # 200 samples, 2 epochs
    assert sorted(seen[:100]) == list(range(100)) and sorted(seen[100:]) == list(range(100))
    assert seen[:100] != seen[100:]  # a new permutation every epoch
    assert seen[:100] != list(range(100))
    other_seed = indices(take(build_loader([source(store, 8)], seed=1), 12))
    assert other_seed != seen[:96]


def test_two_ranks_cover_every_sample_once():
    store = index_store(101)
    per_rank = [indices(take(build_loader([source(store, 10)], seed=3, rank=r, world_size=2), 5))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 50
    both = per_rank[0] + per_rank[1]
    assert len(set(both)) == 100 and set(both) <= set(range(101))  # one left out to even ranks


def test_batch_larger_than_rank_share_refused():
    with pytest.raises(ValueError, match="fewer than the batch size 40"):
        build_loader([source(index_store(50), 40)], seed=0, world_size=2)


@pytest.mark.parametrize("stop", [3, 13])  # mid-epoch; past the end of the first epoch (12.5)
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact(stop, world_size):
    store = index_store(200)
    for rank in range(world_size):
        def make(rank=rank):
            return build_loader([source(store, 8)], seed=7, rank=rank, world_size=world_size,
                                num_workers=2, prefetch=3)
        full = indices(take(make(), 20))
        first = make()
        head = indices(take(first, stop))
        state = first.state_dict()
        assert state["step"] == stop
        json.loads(json.dumps(state))  # plain data only
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert head + indices(take(resumed, 20 - stop)) == full


def test_iterating_again_continues():
    loader = build_loader([source(index_store(64), 8)], seed=0, num_workers=0, prefetch=0)
    full = indices(take(build_loader([source(index_store(64), 8)], seed=0), 6))
    assert indices(take(loader, 2)) + indices(take(loader, 4)) == full


def test_state_of_other_setup_refused():
    store = index_store(64)
    state = build_loader([source(store, 8)], seed=0).state_dict()
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        build_loader([source(store, 8)], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        build_loader([source(store, 8)], seed=0, rank=1, world_size=2).load_state_dict(state)


def test_mixing_follows_probabilities_and_resumes():
    a, b = index_store(64), index_store(48, offset=1000)

    def make():
        return build_loader([source(a, 4, 3.0), source(b, 6, 1.0)], seed=5, num_workers=1)

    full = take(make(), 400)
    counts = Counter(s for s, _ in full)
    assert abs(counts[0] / 400 - 0.75) < 0.06
    for s, batch in full:  # each batch comes from one store, with that store's batch size
        assert len(batch.labels) == (4 if s == 0 else 6)
        assert ((batch.labels >= 1000) == (s == 1)).all()
    first = make()
    head = take(first, 37)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 400 - 37)
    assert [s for s, _ in head + tail] == [s for s, _ in full]
    assert indices(head + tail) == indices(full)


@pytest.mark.parametrize("stop", [36, 37, 38])  # at a group's start, inside one, at its end
def test_a_group_of_batches_shares_one_store_and_resumes_exactly(stop):
    """``group=3`` (the trainer's ``grad_accum``): each run of 3 consecutive batches, one
    optimizer step, comes from one store (paper App. D: one modality per batch), on every rank
    alike; the stores still follow their probabilities, and resume is exact mid-group too."""
    a, b = index_store(64), index_store(48, offset=1000)

    def make(rank=0, world_size=1, group=3):
        return build_loader([source(a, 4, 3.0), source(b, 6, 1.0)], seed=5, rank=rank,
                            world_size=world_size, group=group, num_workers=1)

    full = take(make(), 300)
    stores = [s for s, _ in full]
    groups = [stores[i: i + 3] for i in range(0, 300, 3)]
    assert all(len(set(g)) == 1 for g in groups)
    assert 0.6 < sum(g[0] == 0 for g in groups) / len(groups) < 0.9  # 3:1
    for s, batch in full:
        assert len(batch.labels) == (4 if s == 0 else 6)
        assert ((batch.labels >= 1000) == (s == 1)).all()
    # every rank draws the same store for a step
    assert [s for s, _ in take(make(rank=1, world_size=2), 60)] == stores[:60]
    # without groups, consecutive batches do change stores within some group of 3
    ungrouped = [s for s, _ in take(make(group=1), 300)]
    assert any(len(set(ungrouped[i: i + 3])) > 1 for i in range(0, 300, 3))
    first = make()
    head = take(first, stop)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 300 - stop)
    assert [s for s, _ in head + tail] == stores
    assert indices(head + tail) == indices(full)
    with pytest.raises(ValueError, match="group"):  # another grouping is another data order
        make(group=2).load_state_dict(first.state_dict())


def test_a_group_of_one_store_changes_nothing():
    store = index_store(64)
    plain = take(build_loader([source(store, 8)], seed=0), 10)
    grouped = build_loader([source(store, 8)], seed=0, group=4)
    assert indices(take(grouped, 10)) == indices(plain)
    build_loader([source(store, 8)], seed=0).load_state_dict(grouped.state_dict())
    with pytest.raises(ValueError, match="group"):
        build_loader([source(store, 8)], seed=0, group=0)


def test_posterior_is_sampled_and_resumable():
    store = index_store(40, posterior=True)

    def make():
        return build_loader([source(store, 8)], seed=2)

    full = take(make(), 8)
    x, i = full[0][1].tokens[:, 0, :], full[0][1].labels.float()
    mean = torch.stack([i, -i], 1)
    assert not torch.equal(x, mean) and (x - mean).abs().max() < 0.5 * 6  # noise of std 0.5
    first = make()
    take(first, 3)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for (_, want), (_, got) in zip(full[3:], take(resumed, 5)):
        assert torch.equal(want.tokens, got.tokens)


def test_toy_store_end_to_end(tmp_path):
    cfg = ToyModality.Config(count=96)
    adapter = cfg.build()
    store = encode_store(adapter, "waves", tmp_path / "toy.zarr", adapter_config=attrs.asdict(cfg),
                         progress=False)
    loader = build_loader([LoaderSource(store=store, tokenize=adapter.tokenize, batch_size=16)],
                          seed=0, num_workers=2)
    s, batch = next(iter(loader))
    assert s == 0 and batch.tokens.shape == (16, 16, 8) and batch.labels.shape == (16,)
