"""Damaged inputs: flipped bytes and truncation in store chunks and checkpoints, a deleted array, a
store of another schema, a checkpoint of another config. Each is one clear error naming the file,
from the library, the trainer and the CLI (exit 2, no traceback), and nothing written is changed.

Already covered elsewhere (not repeated): ``check_store`` on a truncated/deleted chunk, a missing
array, a wrong dtype, a newer format (tests/test_store.py); a truncated checkpoint, a checkpoint of
another config or another loader setup refused by ``Trainer.fit`` (tests/test_trainer.py)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import zarr

import selfflow_core.cli.main as cli
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.converter import make_converter, to_data
from selfflow_core.data.store import StoreError, check_store, open_store, store_schema
from selfflow_core.data.writer import StoreWriter, encode_store
from selfflow_core.runtime import checkpoint
from selfflow_core.testing import torch_threads

COUNT, CHUNK = 256, 32
TOY = ToyModality.Config(tokens=8, channels=4, classes=4, count=COUNT)


def encode(path: Path, cfg=TOY, **kw):
    return encode_store(cfg.build(), "waves", path, adapter_config=to_data(make_converter(), cfg),
                        progress=False, batch_size=64, chunks=CHUNK, **kw)


def chunk_file(store: Path, k: int) -> Path:
    return store / "latents" / "c" / str(k) / "0" / "0"


def flip(path: Path, position: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def cli_run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out + err


def train_argv(rel, store, run, steps=2, *extra):
    return ["train", "toy", *rel.tiny_overrides(store, run, steps),
            f"modalities.toy.modality.count={COUNT}", "log_every=1000", *extra]


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    encode(path)
    return path


# -- flipped bytes in a zarr chunk --------------------------------------------------------------

@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_every_flipped_bit_in_a_chunk_is_detected(tmp_path, compressor):
    """Uncompressed chunks read flipped bytes as wrong numbers, silently: the CRC-32C codec of
    every chunk makes each single flipped bit (in data or checksum) a decode error."""
    path = tmp_path / "s.zarr"
    encode(path, compressor=compressor)
    arr = zarr.open_group(str(path), mode="r")["latents"]
    assert "crc32c" in [c.to_dict()["name"] for c in arr.compressors]
    target = chunk_file(path, 2)
    pristine = target.read_bytes()
    rng = random.Random(0)
    positions = sorted({*rng.sample(range(len(pristine)), 60), 0, len(pristine) - 1})
    for position in positions:
        flip(target, position, rng.randrange(8))
        with pytest.raises(Exception, match="checksum|[Cc]orrupt|[Dd]ecompress|[Ee]rror"):
            arr[2 * CHUNK: 3 * CHUNK]
        target.write_bytes(pristine)
    np.testing.assert_array_equal(arr[2 * CHUNK: 3 * CHUNK],
                                  TOY.build().open_source("waves").read(64, 96)["latents"])


def test_flipped_byte_is_refused_everywhere_naming_the_chunk_file(tmp_path, store, rel, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = chunk_file(store, 3)
    flip(target, 100)
    before = rel.tree_digest(store)
    where = "field 'latents': chunk 3 (samples 96..127) is unreadable"
    problems = check_store(store)
    assert len(problems) == 1 and where in problems[0] and str(target) in problems[0]
    assert "checksum" in problems[0]
    with pytest.raises(StoreError, match="chunk 3") as e:
        open_store(store, verify=True)
    assert str(target) in str(e.value)
    # reading it later (no verification on open) names it too, cached or not
    for cache_bytes in (None, 0):
        opened = open_store(store) if cache_bytes is None else open_store(store, cache_bytes=0)
        with pytest.raises(StoreError) as e:
            opened.read(np.arange(90, 110))
        assert where in str(e.value) and str(target) in str(e.value)
    opened = open_store(store, cache_bytes=0)
    assert len(opened.read(np.arange(0, 96))["latents"]) == 96  # other chunks still read

    # the trainer refuses it before step 1 (verify_stores) or at the first batch that reads it
    run = tmp_path / "run"
    rc, out = cli_run(capsys, *train_argv(rel, store, run))
    assert rc == 2 and out.startswith("error: latent store") and str(target) in out, out
    assert "Traceback" not in out
    rc, out = cli_run(capsys, *train_argv(rel, store, run, 2, "verify_stores=false"))
    assert rc == 2 and "error: latent store" in out and str(target) in out, out
    assert "Traceback" not in out and "RuntimeError" not in out  # not torchdata's wrapper
    rc, out = cli_run(capsys, "store", "check", store)
    assert rc == 1 and str(target) in out
    assert rel.tree_digest(store) == before  # nothing rewrote or "repaired" the store


def test_stores_without_checksums_still_read(tmp_path):
    """Stores written before the checksum codec keep working (their flips go unnoticed:
    re-encode them to get checksums)."""
    path = tmp_path / "old.zarr"
    encode(path)
    group = zarr.open_group(str(path), mode="r+")
    data = group["latents"][:]
    del group["latents"]
    group.create_array("latents", shape=data.shape, dtype=data.dtype, chunks=(CHUNK, 8, 4),
                       compressors=None)
    group["latents"][:] = data
    assert check_store(path) == []
    np.testing.assert_array_equal(open_store(path).read(np.arange(COUNT))["latents"], data)


# -- truncated chunk, deleted array, wrong schema -----------------------------------------------

def test_truncated_chunk_is_refused_at_the_first_batch_naming_the_file(tmp_path, store, rel,
                                                                       capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = chunk_file(store, 0)
    target.write_bytes(target.read_bytes()[:37])
    before = rel.tree_digest(store)
    rc, out = cli_run(capsys, *train_argv(rel, store, tmp_path / "run", 2, "verify_stores=false"))
    assert rc == 2 and "field 'latents': chunk 0 (samples 0..31) is unreadable" in out, out
    assert str(target) in out and "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step ran, nothing written
    assert rel.tree_digest(store) == before


def test_resuming_an_encode_over_a_damaged_chunk_is_refused(tmp_path, rel):
    """An interrupted store whose last (partial) chunk got damaged: appending would have to
    read it; the encode stops with the chunk named and writes nothing."""
    path = tmp_path / "s.zarr"
    adapter = TOY.build()
    schema = store_schema(adapter, source="waves",
                          source_description=adapter.open_source("waves").description,
                          adapter_config=to_data(make_converter(), TOY))
    with StoreWriter(path, schema, chunks=CHUNK) as writer:
        writer.append(adapter.open_source("waves").read(0, 40))  # chunk 1 holds 8 of 32
    target = chunk_file(path, 1)
    flip(target, 5)
    before = rel.tree_digest(path)
    with pytest.raises(StoreError, match="chunk 1") as e:
        encode(path)
    assert str(target) in str(e.value)
    assert rel.tree_digest(path) == before


def test_deleted_array_is_refused_and_left_alone(tmp_path, store, rel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(store / "latents")
    before = rel.tree_digest(store)
    rc, out = cli_run(capsys, *train_argv(rel, store, tmp_path / "run"))
    assert rc == 2 and f"latent store {store}" in out and "field 'latents': array missing" in out
    # re-running the encode does not recreate an empty array in the damaged store
    rc, out = cli_run(capsys, "encode", "toy", "waves", store, f"count={COUNT}", "tokens=8",
                      "channels=4")
    assert rc == 2 and "field 'latents'" in out and "Traceback" not in out, out
    assert rel.tree_digest(store) == before and not (store / "latents").exists()


def test_store_of_another_schema_is_refused(tmp_path, store, rel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "wide.zarr"
    encode(other, attrs.evolve(TOY, channels=6))
    before = rel.tree_digest(tmp_path)
    rc, out = cli_run(capsys, *train_argv(rel, other, tmp_path / "run"))
    assert rc == 2 and f"latent store {other}" in out and "field 'latents'" in out, out
    assert "Traceback" not in out
    # damaged schemas: each a StoreError naming the store, never a KeyError/TypeError
    damage = {
        "format_version": lambda a: a.__setitem__("format_version", "1"),
        "fields": lambda a: a.__setitem__("fields", {"latents": 5}),
        "committed": lambda a: a.pop("committed"),
        "complete": lambda a: a.__setitem__("complete", False),
    }
    meta = store / "zarr.json"
    pristine = meta.read_text()
    for key, change in damage.items():
        data = json.loads(pristine)
        change(data["attributes"])
        meta.write_text(json.dumps(data))
        with pytest.raises(StoreError) as e:
            open_store(store)
        assert str(store) in str(e.value), key
        rc, out = cli_run(capsys, *train_argv(rel, store, tmp_path / "run"))
        assert rc == 2 and f"latent store {store}" in out and "Traceback" not in out, (key, out)
        assert check_store(store), key
    meta.write_text(pristine)
    assert rel.tree_digest(tmp_path) == before


# -- checkpoints --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_template(tmp_path_factory, toy_store, rel):
    run = tmp_path_factory.mktemp("run")
    with torch_threads(1):
        assert cli.main(["train", "toy", *rel.tiny_overrides(toy_store, run, 4),
                         "checkpoint.every=2", "checkpoint.keep=3", "log_every=1000"]) == 0
    return run


def test_flipped_bytes_in_a_checkpoint_are_refused_or_harmless(tmp_path, run_template, rel):
    """``torch.load`` ignores the zip CRCs, so a flipped byte in the weights loaded silently;
    ``checkpoint.load`` checks them: a flip is refused naming the file, or changed nothing."""
    good = checkpoint.path_for(run_template / "checkpoints", 4)
    pristine, truth = good.read_bytes(), checkpoint.load(good)
    rng = random.Random(1)
    flips = [(rng.randrange(len(pristine)), 1 << rng.randrange(8)) for _ in range(80)]
    refused = refused_or_harmless(tmp_path / "step-00000004.pt", pristine, truth, flips, rel)
    print(f"\ncheckpoint bit flips: {refused} refused, {80 - refused} harmless (padding)")
    assert refused >= 60


def refused_or_harmless(bad: Path, pristine: bytes, truth, flips, rel) -> int:
    """Write ``pristine`` with each ``(position, xor mask)`` flip to ``bad`` and load it: every
    damaged file is refused naming it, or loads the same state (a flip in zip padding). Returns
    how many were refused."""
    refused = 0
    for position, mask in flips:
        data = bytearray(pristine)
        data[position] ^= mask
        bad.write_bytes(bytes(data))
        try:
            loaded = checkpoint.load(bad)
        except checkpoint.CheckpointError as e:
            assert str(bad) in str(e)
            refused += 1
            continue
        assert not rel.same_state(loaded, truth), position
    return refused


def test_every_flipped_byte_of_a_small_checkpoint_is_refused_or_harmless(tmp_path, rel):
    """Every byte inverted, headers and the zip directory included. (Inverting a member's
    attribute byte in the directory sets its "directory" bit: torch then loaded garbage with
    every CRC valid; ``load`` refuses it.)"""
    state = {"format": 1, "step": 3, "model": {"w": torch.randn(64), "b": torch.randn(8)},
             "losses": [1.0, 2.0]}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    pristine = good.read_bytes()
    flips = [(position, 0xFF) for position in range(len(pristine))]
    refused = refused_or_harmless(tmp_path / "step-00000003.pt", pristine, state, flips, rel)
    print(f"\nsmall checkpoint: {len(pristine)} bytes inverted one at a time, {refused} refused, "
          f"the rest harmless")


def test_truncated_latest_checkpoint_via_cli_names_it_and_changes_nothing(
        tmp_path, run_template, toy_store, rel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(run_template, run)
    latest = checkpoint.path_for(run / "checkpoints", 4)
    data = latest.read_bytes()
    rng = random.Random(2)
    for size in sorted({0, 1, 22, len(data) - 1, *rng.sample(range(len(data)), 25)}):
        latest.write_bytes(data[:size])
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(latest)
        assert str(latest) in str(e.value)
    before = rel.tree_digest(run)
    rc, out = cli_run(capsys, "train", "toy", *rel.tiny_overrides(toy_store, run, 6))
    assert rc == 2 and out.startswith(f"error: checkpoint {latest}") and "Traceback" not in out
    assert rel.tree_digest(run) == before
    latest.unlink()  # the documented way back: delete it, the previous one is used
    rc, out = cli_run(capsys, "train", "toy", *rel.tiny_overrides(toy_store, run, 6))
    assert rc == 0 and "resumed from" in out and "step-00000002.pt" in out


def test_checkpoint_of_another_config_via_cli_changes_nothing(tmp_path, run_template, toy_store,
                                                              rel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(run_template, run)
    before = rel.tree_digest(run)
    rc, out = cli_run(capsys, "train", "toy", *rel.tiny_overrides(toy_store, run, 6),
                      "backbone.width=64", "seed=3")
    assert rc == 2 and "error: checkpoint" in out and "step-00000004.pt" in out
    assert "backbone" in out and "seed" in out and "Traceback" not in out
    assert rel.tree_digest(run) == before


def test_sampling_from_a_damaged_checkpoint_names_it(tmp_path, run_template, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "step-00000004.pt"
    data = bytearray(checkpoint.path_for(run_template / "checkpoints", 4).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    rc, out = cli_run(capsys, "sample", bad, "--out", tmp_path / "samples")
    assert rc == 2 and f"checkpoint {bad}" in out and "Traceback" not in out
    assert not (tmp_path / "samples").exists()

