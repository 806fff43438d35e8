"""Stores written in a random order (``shuffle_on_write``): a permutation of the source fixed by
the seed, resumable, the same from every path that writes it, and mixing a sorted source."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from selfflow_core import (
    ModalitySpec,
    StoreError,
    ToyModality,
    Trainer,
    TrainerConfig,
    encode_store,
    make_converter,
    open_store,
    to_data,
)
from selfflow_core.data.order import PermutedSource, ShuffledWrite, write_permutation

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = ToyModality.Config(tokens=4, channels=3, classes=5, count=200)


def _encode(path, seed, **kw):
    return encode_store(ShuffledWrite(TOY.build(), seed), "waves", path, progress=False,
                        adapter_config=to_data(make_converter(), TOY), batch_size=32, **kw)


def test_a_shuffled_store_holds_the_source_in_the_seeds_order(tmp_path):
    raw = TOY.build().open_source("waves")
    everything = TOY.build().encode(raw.read(0, len(raw)))
    store = _encode(tmp_path / "a.zarr", seed=3)
    perm = write_permutation(200, 3)
    assert sorted(perm.tolist()) == list(range(200)) and not np.array_equal(perm, np.arange(200))
    got = store.read(np.arange(200))
    for k, v in everything.items():
        assert np.array_equal(got[k], np.asarray(v)[perm]), k
    assert store.schema["encoder"]["write_order"] == {"kind": "shuffled", "seed": 3}
    assert "random order (seed 3)" in store.schema["source"]["description"]
    assert not np.array_equal(write_permutation(200, 4), perm)  # another seed, another order
    # a store of another order is another configuration: refused, not resumed or reused
    with pytest.raises(StoreError, match="different configuration"):
        _encode(tmp_path / "a.zarr", seed=4)


def test_a_read_gathers_runs_of_the_source_in_order():
    class Counting:
        description = "numbers"

        def __init__(self):
            self.calls = []

        def __len__(self):
            return 50

        def read(self, start, stop):
            self.calls.append((start, stop))
            return {"x": np.arange(start, stop)}

    raw = Counting()
    src = PermutedSource(raw, seed=1)
    out = src.read(0, 50)["x"]
    assert np.array_equal(out, src.perm) and raw.calls == [(0, 50)]  # one run: one read
    raw.calls.clear()
    part = src.read(10, 20)["x"]
    assert np.array_equal(part, src.perm[10:20])
    assert sum(b - a for a, b in raw.calls) == 10  # each wanted sample read once


def test_an_interrupted_shuffled_encode_resumes_to_the_same_store(tmp_path, monkeypatch):
    whole = _encode(tmp_path / "whole.zarr", seed=5).read(np.arange(200))
    original, calls = PermutedSource.read, []

    def failing(self, start, stop):
        calls.append(start)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process is stopped mid-encode
        return original(self, start, stop)

    monkeypatch.setattr(PermutedSource, "read", failing)
    with pytest.raises(KeyboardInterrupt):
        _encode(tmp_path / "b.zarr", seed=5)
    monkeypatch.setattr(PermutedSource, "read", original)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "b.zarr")
    resumed = _encode(tmp_path / "b.zarr", seed=5).read(np.arange(200))
    for k in whole:
        assert np.array_equal(whole[k], resumed[k]), k


def test_a_run_with_shuffle_on_write_makes_the_store_selfflow_encode_makes(tmp_path,
                                                                          core_components):
    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.cli.main import main
    from selfflow_core.config.run import CheckpointConfig

    cli = tmp_path / "cli.zarr"
    assert main(["encode", "toy", "waves", str(cli), "tokens=4", "channels=3", "classes=5",
                 "count=200", "--shuffle-seed", "9"]) == 0
    spec = ModalitySpec(modality=TOY, store=str(tmp_path / "run.zarr"), source="waves",
                        batch_size=8, shuffle_on_write=9)
    cfg = TrainerConfig(modalities={"toy": spec}, steps=1, run_dir=str(tmp_path / "run"),
                        tracker=NullTracker.Config(), checkpoint=CheckpointConfig(every=1))
    Trainer(cfg, components=core_components, progress=False)
    a, b = open_store(cli), open_store(tmp_path / "run.zarr")
    assert a.schema["config_hash"] == b.schema["config_hash"]
    for k, v in a.read(np.arange(200)).items():
        assert np.array_equal(v, b.read(np.arange(200))[k]), k
    # the run reuses the CLI's store as it is
    cfg = attrs.evolve(cfg, modalities={"toy": attrs.evolve(spec, store=str(cli))})
    Trainer(cfg, components=core_components, progress=False)
    assert open_store(cli).schema["created_at"] == a.schema["created_at"]


def test_writing_a_sorted_source_in_a_random_order_mixes_its_blocks(tmp_path):
    """Labels sorted in the source: contiguous blocks of the store are all one class; written
    shuffled, a block holds about every class."""
    class Sorted:
        description = "sorted by label"

        def __len__(self):
            return 400

        def read(self, start, stop):
            return {"labels": np.arange(start, stop) // 80}

    plain = Sorted().read(0, 400)["labels"]
    shuffled = PermutedSource(Sorted(), seed=0).read(0, 400)["labels"]
    blocks = lambda x: [len(set(b.tolist())) for b in np.split(x, 10)]  # noqa: E731
    assert max(blocks(plain)) <= 2 and min(blocks(shuffled)) >= 4
    assert sorted(shuffled.tolist()) == plain.tolist()


def test_a_shuffled_store_encoded_by_two_workers_equals_one_process(tmp_path):
    one = _encode(tmp_path / "one.zarr", seed=2).read(np.arange(200))
    two = _encode(tmp_path / "two.zarr", seed=2, workers=2, chunks=16).read(np.arange(200))
    for k in one:
        assert np.array_equal(one[k], two[k]), k
