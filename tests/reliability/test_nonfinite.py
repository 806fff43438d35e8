"""NaN/Inf: in a store (refused with the field and sample index, before step 1 or at the first
batch that holds it) and produced at run time (``on_nonfinite``: stop with NonFiniteLossError, or
skip the batch). tests/test_trainer.py covers NaN *weights* and NaN loss terms; here the batch
itself carries the NaN."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch
import zarr

import selfflow_core.cli.main as cli
from selfflow_core.cli.main import resolve_config
from selfflow_core.config.converter import make_converter, to_data
from selfflow_core.data.store import StoreError, open_store
from selfflow_core.data.writer import encode_store
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.runtime import checkpoint
from selfflow_core.trainer import NonFiniteLossError, Trainer

BAD = {7: np.nan, 41: np.inf, 42: -np.inf}


@pytest.fixture
def poisoned(tmp_path, rel):
    path = tmp_path / "nan.zarr"
    encode_store(rel.toy.build(), "waves", path, adapter_config=to_data(make_converter(), rel.toy),
                 progress=False, chunks=16)
    lat = zarr.open_group(str(path), mode="r+")["latents"]
    for index, value in BAD.items():
        lat[index, 3, 1] = value
    return path


@pytest.mark.parametrize("cache_bytes", [None, 0], ids=["cached", "uncached"])
def test_store_with_nan_is_refused_with_field_and_sample_index(poisoned, cache_bytes):
    with pytest.raises(StoreError, match=r"field 'latents': NaN/Inf at sample index 7, 41, 42 "):
        open_store(poisoned, verify=True)
    if cache_bytes is None:  # read into memory at first use, and checked whole
        with pytest.raises(StoreError, match=r"NaN/Inf at sample index 7, 41, 42 ") as e:
            open_store(poisoned).read(np.arange(8, 40))
    else:  # read batch by batch, each batch checked
        store = open_store(poisoned, cache_bytes=0)
        assert len(store.read(np.arange(8, 40))["latents"]) == 32  # clean samples read
        with pytest.raises(StoreError, match=r"field 'latents': NaN/Inf at sample index 41 "
                           ) as e:
            store.read(np.array([41, 0, 1]))
    assert str(poisoned) in str(e.value)


@pytest.mark.parametrize("verify", [True, False])
def test_trainer_refuses_a_store_with_nan_before_any_step(tmp_path, poisoned, rel, capsys,
                                                          monkeypatch, verify):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", "toy", *rel.tiny_overrides(poisoned, tmp_path / "run", 3),
                   f"verify_stores={str(verify).lower()}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"latent store {poisoned}" in err and "NaN/Inf at sample index" in err
    assert "7" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


class InjectNaN:
    """Replaces the tokens of the ``at``-th batch the loader hands out (1-based) by NaN/Inf."""

    def __init__(self, trainer: Trainer, at: set[int], value: float) -> None:
        self.calls, self.at, self.value = 0, at, value
        source = trainer.loader.sources[0]
        self.tokenize = source.tokenize
        trainer.loader.sources[0] = attrs.evolve(source, tokenize=self)
        trainer.batches = iter(trainer.loader)

    def __call__(self, fields):
        batch = self.tokenize(fields)
        self.calls += 1
        if self.calls in self.at:
            tokens = batch.tokens.clone()
            tokens[0, 0, 0] = self.value
            batch = attrs.evolve(batch, tokens=tokens)
        return batch


def trainer(tmp_path, store, rel, *extra) -> Trainer:
    components = Components(make_plugin_manager(entry_points=False))
    config = resolve_config(components, "toy", [*rel.tiny_overrides(store, tmp_path, 6),
                                                 "checkpoint.every=2", "log_every=1000", *extra])
    return Trainer(config, components=components, progress=False)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_batch_at_run_time_stops_with_the_step(tmp_path, toy_store, rel, value):
    tr = trainer(tmp_path, toy_store, rel)
    InjectNaN(tr, {4}, value)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4: .*=nan") as e:
        tr.fit()
    assert str(tmp_path / "checkpoints") in str(e.value)
    assert tr.step == 4  # found at the read-back before step 4's checkpoint: none written
    latest = checkpoint.latest(tmp_path / "checkpoints")
    state = checkpoint.load(latest)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_batch_at_run_time_is_skipped_when_asked(tmp_path, toy_store, rel):
    tr = trainer(tmp_path, toy_store, rel, "on_nonfinite=skip", "max_skipped=2")
    injected = InjectNaN(tr, {2, 5}, math.nan)
    summary = tr.fit()
    assert summary["step"] == 6 and tr.skipped == 2 and injected.calls >= 8
    assert tr.loader.state_dict()["step"] == 8  # the two bad batches were dropped, not retried
    assert all(math.isfinite(x) for x in tr.losses) and len(tr.losses) == 6
    assert all(torch.isfinite(v).all() for v in tr.backbone.state_dict().values())
    assert checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))["skipped"] == 2
