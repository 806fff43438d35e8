"""The zarr latent store: round trip, schema, resume after interruption, lock, validation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import zarr
from zarr.storage import MemoryStore

from selfflow_core.builtin.toy import ToyModality
from selfflow_core.data.loader import sample_posterior
from selfflow_core.data.store import (
    FORMAT_VERSION,
    StoreError,
    check_store,
    open_store,
    store_schema,
)
from selfflow_core.data.writer import StoreWriter, encode_store

COUNT, BATCH = 300, 64


@pytest.fixture
def toy():
    cfg = ToyModality.Config(count=COUNT)
    return cfg.build(), attrs.asdict(cfg)


def encode(toy, path, **kw):
    adapter, config = toy
    return encode_store(adapter, "waves", path, adapter_config=config, batch_size=BATCH,
                        progress=False, **kw)


def source_data(toy):
    return toy[0].open_source("waves").read(0, COUNT)


def stored(path) -> dict[str, np.ndarray]:
    store = open_store(path)
    return store.read(np.arange(len(store)))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class FailingToy(ToyModality):
    """The toy modality whose encoder raises ``error`` at its ``fail_at``-th call."""

    def __init__(self, config, fail_at: int, error: BaseException) -> None:
        super().__init__(config)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def encode(self, raw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return raw


# ---------------------------------------------------------------- round trip and schema

@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc-lz4"])
def test_round_trip_equals_source(toy, tmp_path, compressor):
    store = encode(toy, tmp_path / "s.zarr", compressor=compressor)
    src = source_data(toy)
    assert len(store) == COUNT and store.path == str(tmp_path / "s.zarr")
    assert_same(store.read(np.arange(COUNT)), src)
    idx = np.array([5, 299, 0, 5, 17])  # any order, repeats allowed
    assert_same(store.read(idx), {k: v[idx] for k, v in src.items()})
    uncached = open_store(tmp_path / "s.zarr", cache_bytes=0)
    assert not uncached.cached
    assert_same(uncached.read(idx), {k: v[idx] for k, v in src.items()})
    with pytest.raises(IndexError, match="sample index 300 out of range"):
        store.read([1, 300])


def test_schema_content(toy, tmp_path):
    adapter, config = toy
    s = encode(toy, tmp_path / "s.zarr").schema
    assert s["format_version"] == FORMAT_VERSION == 1
    assert s["modality"] == "toy" and s["num_classes"] == 4
    assert s["fields"] == {"latents": {"shape": [16, 8], "dtype": "float32"},
                           "labels": {"shape": [], "dtype": "int64"}}
    assert s["encoder"] == {"name": "identity", "version": "1"}
    assert s["normalization"] == {"scale": 1.0, "shift": 0.0}
    assert s["adapter_config"] == config
    assert s["source"] == {"name": "waves", "description": adapter.open_source("waves").description}
    assert len(s["config_hash"]) == 16 and s["created_at"].endswith("+00:00")
    assert s["complete"] is True and s["count"] == s["committed"] == COUNT
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    lat = group["latents"]
    assert lat.chunks == (1024, 16, 8) and group["labels"].chunks == (65536,)  # ~0.5 MiB chunks
    # no compression by default; every chunk carries a CRC-32C checksum (docs/reliability.md)
    assert lat.compressors == (zarr.codecs.Crc32cCodec(),)


def test_explicit_chunks_and_unknown_compressor(toy, tmp_path):
    encode(toy, tmp_path / "s.zarr", chunks={"latents": 16})
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["latents"].chunks[0] == 16
    with pytest.raises(ValueError, match="unknown compressor 'lzma'"):
        encode(toy, tmp_path / "t.zarr", compressor="lzma")


def test_reencode_complete_store_is_noop(toy, tmp_path):
    path = tmp_path / "s.zarr"
    first = encode(toy, path)
    again = encode(toy, path)
    assert again.schema["created_at"] == first.schema["created_at"]
    assert_same(stored(path), source_data(toy))


def test_reencode_with_other_config_refused(toy, tmp_path):
    path = tmp_path / "s.zarr"
    encode(toy, path)
    cfg = ToyModality.Config(count=COUNT, seed=1)
    with pytest.raises(StoreError, match=r"different configuration.*adapter_config") as e:
        encode_store(cfg.build(), "waves", path, adapter_config=attrs.asdict(cfg), progress=False)
    assert str(path) in str(e.value)
    assert_same(stored(path), source_data(toy))  # nothing lost


# ---------------------------------------------------------------- interruption and resume

@pytest.mark.parametrize("error", [RuntimeError("encoder died"), KeyboardInterrupt()])
def test_interrupted_encode_resumes_exactly(toy, tmp_path, error):
    path = tmp_path / "s.zarr"
    adapter, config = toy
    failing = FailingToy(adapter.config, fail_at=3, error=error)
    with pytest.raises(type(error)):
        encode_store(failing, "waves", path, adapter_config=config, batch_size=BATCH,
                     progress=False)
    assert not Path(f"{path}.lock").exists()  # the lock is released on the way out
    partial = open_store(path, require_complete=False)
    assert len(partial) == 2 * BATCH
    with pytest.raises(StoreError, match="incomplete: 128 samples committed") as e:
        open_store(path)
    assert str(path) in str(e.value)
    assert any("incomplete" in p for p in check_store(path))
    encode(toy, path)
    assert_same(stored(path), stored(encode(toy, tmp_path / "direct.zarr").path))
    assert check_store(path) == []


def test_resume_cuts_uncommitted_rows(toy, tmp_path):
    """A crash after some arrays of a batch were written (committed not yet updated)."""
    path = tmp_path / "s.zarr"
    adapter, config = toy
    with pytest.raises(RuntimeError):
        encode_store(FailingToy(adapter.config, 3, RuntimeError()), "waves", path,
                     adapter_config=config, batch_size=BATCH, progress=False)
    group = zarr.open_group(str(path), mode="r+")
    lat = group["latents"]
    lat.resize((200, *lat.shape[1:]))
    lat[128:200] = 99.0  # rows beyond the committed count, never committed
    assert group.attrs["committed"] == 128
    encode(toy, path)
    result = stored(path)
    assert_same(result, source_data(toy))
    assert not (result["latents"] == 99.0).any()


def test_writer_append_validates(toy, tmp_path):
    adapter, config = toy
    schema = store_schema(adapter, source="waves", source_description="", adapter_config=config)
    src = source_data(toy)
    with StoreWriter(tmp_path / "s.zarr", schema) as w:
        with pytest.raises(StoreError, match=r"batch fields \['latents'\]"):
            w.append({"latents": src["latents"][:4]})
        with pytest.raises(StoreError, match="field 'latents': batch per-sample shape"):
            w.append({"latents": src["latents"][:4, :3], "labels": src["labels"][:4]})
        with pytest.raises(StoreError, match="different sample counts"):
            w.append({"latents": src["latents"][:4], "labels": src["labels"][:3]})
        with pytest.raises(StoreError, match="field 'labels': batch dtype float64"):
            w.append({"latents": src["latents"][:4], "labels": src["labels"][:4] + 0.5})
        w.append({"latents": src["latents"][:4], "labels": src["labels"][:4]})
        w.finish()
        with pytest.raises(StoreError, match="is complete"):
            w.append({"latents": src["latents"][:4], "labels": src["labels"][:4]})
    assert len(open_store(tmp_path / "s.zarr")) == 4


# ---------------------------------------------------------------- lock

def test_second_writer_refused(toy, tmp_path):
    adapter, config = toy
    path = tmp_path / "s.zarr"
    encode(toy, tmp_path / "other.zarr")
    schema = store_schema(adapter, source="waves", source_description="", adapter_config=config)
    with StoreWriter(path, schema):
        with pytest.raises(StoreError, match="another writer holds the lock") as e:
            StoreWriter(path, schema)
        assert str(path) in str(e.value)
        encode(toy, tmp_path / "other.zarr")  # other stores are not affected
    with StoreWriter(path, schema):  # released on exit
        pass


def test_complete_store_opens_while_another_process_holds_its_lock(toy, tmp_path):
    """Two trainers starting on one finished store: neither has anything to write, so the
    second is not refused because the first holds the write lock while it verifies."""
    path = tmp_path / "s.zarr"
    encode(toy, path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        Path(f"{path}.lock").write_text(f"{other.pid} {os.uname().nodename}\n")
        store = encode(toy, path)  # verify=True: read in full, without the lock
        assert len(store) == COUNT and store.verified_fraction == 1.0
        np.testing.assert_array_equal(store.read(np.arange(COUNT))["latents"],
                                      source_data(toy)["latents"])
        assert Path(f"{path}.lock").read_text().split()[0] == str(other.pid)  # not taken
        assert encode(toy, path, verify=False).verified_fraction == 0.0
        # what needs the writer still waits for it: a repair, or another store's encode
        with pytest.raises(StoreError, match="another writer holds the lock"):
            encode(toy, path, repair=True)
    finally:
        other.kill()
        other.wait()


def test_stale_lock_of_dead_process_is_taken_over(toy, tmp_path):
    path = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    Path(f"{path}.lock").write_text(f"{dead.stdout.strip()} {os.uname().nodename}\n")
    assert len(encode(toy, path)) == COUNT
    assert not Path(f"{path}.lock").exists()


def test_refused_operations_lose_nothing(toy, tmp_path):
    path = tmp_path / "s.zarr"
    adapter, config = toy
    encode(toy, path)
    before = stored(path)
    schema = store_schema(adapter, source="waves", source_description=adapter.open_source(
        "waves").description, adapter_config=config)
    with StoreWriter(path, schema) as w:
        with pytest.raises(StoreError):
            encode(toy, path, repair=True)  # locked: a repair writes
        with pytest.raises(StoreError):
            w.append(source_data(toy))  # complete
    assert_same(stored(path), before)
    assert check_store(path) == []


# ---------------------------------------------------------------- validation

@pytest.fixture
def good(toy, tmp_path) -> Path:
    path = tmp_path / "s.zarr"
    encode(toy, path, chunks=64)
    return path


def problems_of(path) -> str:
    problems = "\n".join(check_store(path))
    assert problems
    return problems


def test_check_finds_nan_with_sample_and_field(good):
    lat = zarr.open_group(str(good), mode="r+")["latents"]
    lat[7, 3, 2] = np.nan
    lat[130, 0, 0] = np.inf
    assert "field 'latents': NaN/Inf at sample index 7, 130 (2 sample(s))" in problems_of(good)
    open_store(good)  # schema-level checks pass...
    with pytest.raises(StoreError, match="NaN/Inf at sample index 7"):
        open_store(good, verify=True)  # ...the full check refuses


def test_check_finds_wrong_dtype(good):
    group = zarr.open_group(str(good), mode="r+")
    del group["labels"]
    group.create_array("labels", shape=(COUNT,), dtype="int32")
    assert "field 'labels': dtype int32 but the schema says int64" in problems_of(good)
    with pytest.raises(StoreError, match="dtype int32"):
        open_store(good)


def test_check_finds_missing_array(good):
    shutil.rmtree(good / "latents")
    assert "field 'latents': array missing" in problems_of(good)
    with pytest.raises(StoreError, match=f"(?s)latent store {good}: .*array missing"):
        open_store(good)


def test_writer_refuses_damaged_store_without_touching_it(good, toy):
    shutil.rmtree(good / "latents")
    with pytest.raises(StoreError, match="field 'latents': array missing"):
        encode(toy, good)
    assert not (good / "latents").exists() and not Path(f"{good}.lock").exists()


def test_check_finds_truncated_chunk(good):
    chunk = good / "latents" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert "field 'latents': chunk 2 (samples 128..191) is unreadable" in problems_of(good)
    with pytest.raises(StoreError, match="chunk 2 .* is unreadable"):
        open_store(good, verify=True)


def test_check_finds_deleted_chunk(good):
    (good / "latents" / "c" / "1" / "0" / "0").unlink()
    assert "field 'latents': chunk 1 (samples 64..127) is missing" in problems_of(good)


def test_check_finds_unknown_field(good):
    zarr.open_group(str(good), mode="r+").create_array("extra", shape=(COUNT,), dtype="int8")
    assert "unknown array 'extra'" in problems_of(good)
    with pytest.raises(StoreError, match="unknown array 'extra'"):
        open_store(good)


def test_missing_path_named(tmp_path):
    path = tmp_path / "nowhere.zarr"
    assert check_store(path) == [f"no such store: {path} does not exist"]
    with pytest.raises(StoreError, match=f"{path} does not exist"):
        open_store(path)


def test_newer_format_refused(good):
    zarr.open_group(str(good), mode="r+").attrs["format_version"] = 2
    msg = "written by a newer selfflow (format 2 > 1)"
    assert msg in problems_of(good)
    with pytest.raises(StoreError, match=r"newer selfflow \(format 2 > 1\)"):
        open_store(good)


def test_not_a_store_refused(toy, tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert "not a selfflow latent store" in problems_of(tmp_path / "g.zarr")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="refusing to overwrite"):
        encode(toy, tmp_path / "dir")
    assert (tmp_path / "dir" / "notes.txt").read_text() == "precious"


def test_open_store_checks_adapter(good, toy):
    open_store(good, adapter=toy[0])
    other = ToyModality.Config(count=COUNT, channels=4).build()
    with pytest.raises(StoreError, match="field 'latents': store has"):
        open_store(good, adapter=other)


# ---------------------------------------------------------------- in-memory stores

def test_memory_store_object(toy):
    memory = MemoryStore()
    store = encode(toy, memory)
    assert store.path.startswith("memory://")
    assert_same(store.read(np.arange(COUNT)), source_data(toy))
    assert check_store(memory) == []
    assert len(open_store(memory)) == COUNT


def test_memory_url_and_in_process_lock(toy):
    url = "memory://selfflow-test-store"
    adapter, config = toy
    schema = store_schema(adapter, source="waves", source_description="", adapter_config=config)
    with StoreWriter(url, schema):
        with pytest.raises(StoreError, match="another writer in this process"):
            StoreWriter(url, schema)
    url2 = "memory://selfflow-test-store-2"
    assert_same(encode(toy, url2).read(np.arange(COUNT)), source_data(toy))
    assert_same(open_store(url2).read(np.arange(COUNT)), source_data(toy))


# ---------------------------------------------------------------- posterior

def test_sample_posterior():
    mean, std = torch.randn(4, 3, 2), torch.rand(4, 3, 2)
    fields = {"latents_mean": mean, "latents_std": std, "labels": torch.arange(4)}
    a = sample_posterior(fields, torch.Generator().manual_seed(0))
    b = sample_posterior(fields, torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["latents"], mean + std * noise)
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], fields["labels"])
    zero = sample_posterior({**fields, "latents_std": torch.zeros(4, 3, 2)}, torch.Generator())
    torch.testing.assert_close(zero["latents"], mean)
    assert sample_posterior({"latents": mean}, torch.Generator()).keys() == {"latents"}
