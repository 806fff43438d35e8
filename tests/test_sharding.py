"""Sharded stores and sampled checks.

- A store written with shards (many read chunks in one shard file) reads back equal to an
  unsharded one, every field (text included); the writer writes each shard file once (batches
  are held back until a shard is full), so an interrupted encode resumes to the same files.
- A damaged shard is found and named (its file and the chunk inside) and ``--repair``
  re-encodes it; the block shuffle reads a sharded store's chunks straight from its shard files
  and gives the batches of the unsharded store; an encode over 2 workers writes the store one
  process writes.
- ``shards="auto"`` shards only fields larger than ``SHARD_MIN_BYTES``, recorded in the schema.
- A sampled check (``fraction < 1``) reads only the chunks drawn (seeded, the last always), finds
  damage in them and every missing file, and at 1 is the full scan.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from toys import FailingToy
from zarr.abc.store import RangeByteRequest
from zarr.storage import LocalStore, MemoryStore

import selfflow_core.cli.main as cli
import selfflow_core.data.store as store_module
import selfflow_core.data.writer as writer_module
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.run import TrainerConfig
from selfflow_core.data.blocks import ShuffleConfig
from selfflow_core.data.check import describe_store, field_specs, open_group, sample_chunks, scan
from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.ranges import WORK, encode_share, finish, prepare
from selfflow_core.data.store import (
    StoreError,
    check_store,
    choose_shards,
    open_store,
    store_schema,
)
from selfflow_core.data.writer import StoreWriter, encode_store
from selfflow_core.interfaces import FieldSpec
from selfflow_core.types import TokenBatch

COUNT, BATCH, CHUNK, SHARD = 300, 24, 8, 32
TOY = ToyModality.Config(tokens=8, channels=4, classes=4, count=COUNT, captions=2)
TOY_ARGS = ["count=300", "tokens=8", "channels=4", "classes=4", "captions=2"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


def encode(path, adapter=None, **kw):
    kw = {"chunks": CHUNK, "shards": SHARD, **kw}
    return encode_store(adapter or TOY.build(), "waves", path, batch_size=BATCH, progress=False,
                        adapter_config={"kind": "toy", **attrs.asdict(TOY)}, **kw)  # as the CLI


def everything(path, **kw) -> dict[str, np.ndarray]:
    store = open_store(path, **kw)
    return store.read(np.arange(len(store)))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def files(store: Path) -> dict[str, bytes]:
    """The fields' files (metadata and chunks or shards); the group's attributes left out."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.parent != store}


def flip(path: Path, position: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The toy store without shards (chunks of 8 samples)."""
    path = tmp_path_factory.mktemp("plain") / "plain.zarr"
    encode(path, shards=None)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The toy store with every field in shards of 32 samples (4 chunks of 8 per file)."""
    path = tmp_path_factory.mktemp("sharded") / "sharded.zarr"
    encode(path)
    return path


# -- the same data, fewer files --------------------------------------------------------------------

def test_a_sharded_store_reads_back_equal_to_an_unsharded_one(plain, sharded):
    assert_same(everything(sharded), everything(plain))
    assert_same(everything(sharded, cache_bytes=0), everything(plain))  # zarr reads, uncached
    idx = np.random.default_rng(0).integers(0, COUNT, 50)
    assert_same(open_store(sharded, cache_bytes=0).read(idx), open_store(plain).read(idx))
    assert check_store(sharded) == []
    # 38 chunk files per field, or 10 shard files of 4 chunks (the last one partly filled)
    for field in ("latents", "labels", "captions"):
        assert len([p for p in (plain / field / "c").rglob("*") if p.is_file()]) == 38
        assert len([p for p in (sharded / field / "c").rglob("*") if p.is_file()]) == 10
    schema = open_store(sharded).schema
    assert schema["shards"] == {"latents": SHARD, "labels": SHARD, "captions": SHARD}
    assert open_store(plain).schema["shards"] == {}
    lines = describe_store(sharded)
    assert ("field latents: [8, 4] float32, chunks of 8 samples in shards of 32 samples (4 "
            "chunks per file), compressor none, crc32c checksum") in lines
    assert ("field captions: [2] str, chunks of 8 samples, compressor none, crc32c checksum"
            in describe_store(plain))


class CountingStore(MemoryStore):
    """A memory store counting the writes of each key."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.sets: dict[str, int] = {}

    async def set(self, key, value, byte_range=None):
        self.sets[key] = self.sets.get(key, 0) + 1
        return await super().set(key, value)


def test_each_shard_file_is_written_once(plain):
    memory = CountingStore()
    encode(memory)
    assert_same(everything(memory), everything(plain))
    shards = {k: n for k, n in memory.sets.items() if "/c/" in k}
    assert len(shards) == 30 and set(shards.values()) == {1}, shards  # batches of 24, held back


def test_committed_advances_by_whole_shards_and_finish_writes_the_last(tmp_path):
    adapter = TOY.build()
    raw = adapter.open_source("waves")
    schema = store_schema(adapter, source="waves", source_description=raw.description,
                          adapter_config=attrs.asdict(TOY))
    with StoreWriter(tmp_path / "s.zarr", schema, chunks=CHUNK, shards=SHARD) as writer:
        seen = []
        for start in range(0, COUNT, BATCH):
            writer.append(adapter.encode(raw.read(start, min(start + BATCH, COUNT))))
            seen.append(writer.count)
        assert seen[:5] == [0, 32, 64, 96, 96] and seen[-1] == 288  # 300 // 32 * 32
        writer.finish()
        assert writer.count == COUNT
    assert len(open_store(tmp_path / "s.zarr")) == COUNT




def test_an_interrupted_sharded_encode_resumes_to_the_same_store(sharded, tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="encoder died"):
        encode(path, FailingToy(TOY, fail_at=8))  # 7 batches of 24 = 168 samples encoded
    assert open_store(path, require_complete=False).schema["committed"] == 160  # 5 shards
    with pytest.raises(RuntimeError, match="encoder died"):
        encode(path, FailingToy(TOY, fail_at=2))  # once more, from 160
    assert open_store(path, require_complete=False).schema["committed"] == 160
    encode(path)
    assert files(path) == files(sharded)  # every shard file, byte for byte
    assert check_store(path) == []


# -- damage and repair ------------------------------------------------------------------------

def test_a_damaged_shard_is_named_and_repaired(sharded, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    for p in sorted(sharded.rglob("*")):
        if p.is_file():
            (path / p.relative_to(sharded)).parent.mkdir(parents=True, exist_ok=True)
            (path / p.relative_to(sharded)).write_bytes(p.read_bytes())
    shard = path / "latents" / "c" / "2" / "0" / "0"  # samples 64..95, chunks 8..11
    flip(shard, 1028 + 40)  # in its second chunk (8 x 128 bytes, then its CRC-32C)
    (path / "labels" / "c" / "5").unlink()  # a whole shard file
    captions = path / "captions" / "c" / "7" / "0"
    captions.write_bytes(captions.read_bytes()[:-3])  # truncated: its index is damaged
    problems = check_store(path)
    assert problems[0].startswith(
        f"field 'latents': chunk 9 (samples 72..79) is unreadable (truncated or corrupt: shard "
        f"file {shard}, inner chunk 1 of 4): ")
    assert problems[1:] == [
        f"field 'labels': shard 5 (chunks 20..23, samples 160..191) is missing (it would read "
        f"as fill values): shard file {path / 'labels' / 'c' / '5'}",
        f"field 'captions': shard 7 (chunks 28..31, samples 224..255) is unreadable (truncated "
        f"or corrupt: its index fails its checksum): shard file {captions}"]
    with pytest.raises(StoreError, match=r"chunk 9 \(samples 72\.\.79\)"):
        open_store(path, cache_bytes=0).read([75])  # a read names it too
    assert np.array_equal(open_store(path, cache_bytes=0).read([64])["latents"],
                          open_store(sharded).read([64])["latents"])  # its other chunks read
    rc = cli.main(["store", "check", str(path)])
    out = capsys.readouterr().out
    assert rc == 1 and "3 problem(s)" in out and "inner chunk 1 of 4" in out
    argv = ["encode", "toy", "waves", str(path), *TOY_ARGS, "--batch-size", str(BATCH)]
    assert cli.main(argv) == 2  # refused, naming them
    assert cli.main([*argv, "--repair"]) == 0
    err = capsys.readouterr().err
    assert "field 'latents': shard 2 (samples 64..95; damaged chunk 9) re-encoded" in err
    assert "field 'labels': shard 5 (samples 160..191; damaged chunk 20, 21, 22, 23)" in err
    assert check_store(path) == [] and files(path) == files(sharded)


# -- the block shuffle ----------------------------------------------------------------------------

def tokenize(fields: dict[str, torch.Tensor]) -> TokenBatch:
    x = fields["latents"].float()
    return TokenBatch(tokens=x, positions=torch.zeros(*x.shape[:2], 1),
                      modality_ids=torch.zeros(x.shape[:2], dtype=torch.long),
                      labels=fields["labels"])


def blocks(path, n: int = 40) -> list[dict[str, np.ndarray]]:
    store = open_store(path, cache_bytes=0)
    loader = build_loader([LoaderSource(store=store, tokenize=tokenize, batch_size=16)], seed=3,
                          shuffle=ShuffleConfig(kind="block", block_chunks=2, window_blocks=4))
    reader = loader.sources[0].store
    order = [loader.shards[0].batch(i) for i in range(n)]
    return reader, [reader.read(idx) for idx in order]


def test_the_block_shuffle_reads_a_sharded_store_as_the_unsharded_one(plain, sharded, tmp_path):
    reader, got = blocks(sharded)
    assert set(reader._files) == {"latents", "labels"}  # straight from the shard files
    assert reader._files["latents"].per_shard == 4
    _, want = blocks(plain)
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
    # a damaged chunk inside a shard: read through zarr, which names it
    path = tmp_path / "s.zarr"
    encode(path)
    flip(path / "latents" / "c" / "1" / "0" / "0", 2 * 1028 + 40)  # chunk 6: samples 48..55
    reader = blocks(path, 0)[0]
    assert np.array_equal(reader.read([40])["latents"], open_store(sharded).read([40])["latents"])
    with pytest.raises(StoreError, match=r"field 'latents': chunk 6 \(samples 48\.\.55\) is "
                       r"unreadable .*inner chunk 2 of 4"):
        reader.read([50])


def test_two_workers_write_the_sharded_store_one_process_writes(sharded, tmp_path):
    path = tmp_path / "two.zarr"
    store = encode(path, workers=2)  # ranges of 32 samples: whole shards
    assert files(path) == files(sharded)
    assert store.schema["shards"] == open_store(sharded).schema["shards"]
    assert not (path / "_encode").exists()
    # a worker holds its batches back until they fill a shard: each shard file written once
    memory, adapter = CountingStore(), TOY.build()
    config = {"kind": "toy", **attrs.asdict(TOY)}
    schema = store_schema(adapter, source="waves", adapter_config=config,
                          source_description=adapter.open_source("waves").description)
    with StoreWriter(memory, schema, chunks=CHUNK, shards=SHARD, total=COUNT) as writer:
        plan = prepare(writer, COUNT, workers=2)
        assert (plan.size, plan.staged) == (SHARD, [])
        encode_share(memory, adapter, "waves", range(plan.count), adapter_config=config,
                     batch_size=BATCH)
        finish(writer, plan)
    shards = {k: n for k, n in memory.sets.items() if "/c/" in k and WORK not in k}
    assert len(shards) == 30 and set(shards.values()) == {1}, shards
    assert_same(everything(memory), everything(sharded))


# -- the automatic choice -------------------------------------------------------------------------

def test_auto_shards_only_large_fields_in_shards_of_about_shard_bytes():
    fields = {"latents": FieldSpec(shape=(4, 32, 32), dtype="float16"),  # 8 KiB a sample
              "labels": FieldSpec(shape=(), dtype="int64"),
              "captions": FieldSpec(shape=(4,), dtype="str")}
    chunks = {k: store_module.chunk_samples(s) for k, s in fields.items()}
    assert chunks == {"latents": 64, "labels": 65536, "captions": 1024}
    assert choose_shards(fields, chunks, 100_000) == {}  # 0.8 GB: one file per chunk
    assert choose_shards(fields, chunks, None) == {}  # the size is not known
    # ImageNet: 10 GB of latents in shards of 128 MiB (256 chunks); labels (10 MB) and
    # captions (0.6 GB) keep a file per chunk
    assert choose_shards(fields, chunks, 1_281_167) == {"latents": 16384}
    # 20 M samples: captions too (10 GB), in shards of the same length; labels (160 MB) not
    assert choose_shards(fields, chunks, 20_000_000) == {"latents": 16384, "captions": 16384}
    assert choose_shards(fields, chunks, 10, shards=None) == {}
    assert choose_shards(fields, chunks, 10, shards=2048) == {"latents": 2048,
                                                               "captions": 2048}
    with pytest.raises(ValueError, match="not a multiple of its chunks of 64"):
        choose_shards(fields, chunks, 10, shards={"latents": 100})


def test_auto_shards_are_recorded_in_the_schema(tmp_path, monkeypatch):
    assert encode(tmp_path / "small.zarr", shards="auto").schema["shards"] == {}
    # latents 300 x 128 B, captions 300 x 2 x 128 B (as counted): sharded; labels (2.4 kB) not
    monkeypatch.setattr(store_module, "SHARD_MIN_BYTES", 30_000)
    # 4 chunks of the largest samples' field (captions, 8 x 256 B) per shard: 32 samples
    monkeypatch.setattr(store_module, "SHARD_BYTES", 8192)
    store = encode(tmp_path / "big.zarr", shards="auto")
    assert store.schema["shards"] == {"latents": 32, "captions": 32}
    assert any("latents: [8, 4] float32, chunks of 8 samples in shards of 32" in line
               for line in describe_store(tmp_path / "big.zarr"))
    assert_same(everything(tmp_path / "big.zarr"), everything(tmp_path / "small.zarr"))


# -- sampled checks --------------------------------------------------------------------------------

READS: list[tuple[str, object]] = []


class ReadCountingStore(LocalStore):
    """A local store noting every read of a key (and its byte range)."""

    async def get(self, key, prototype, byte_range=None):
        READS.append((key, byte_range))
        return await super().get(key, prototype, byte_range)


def chunk_reads(path, field: str = "latents", **kw) -> tuple[list[str], set]:
    READS.clear()
    problems = check_store(ReadCountingStore(str(path), read_only=True), **kw)
    return problems, {(k, r) for k, r in READS if k.startswith(f"{field}/c/")}


def test_a_sampled_check_reads_only_the_drawn_chunks(plain, sharded):
    chosen = sample_chunks(38, 0.25, 5, "latents")
    assert len(chosen) == 10 and 37 in chosen  # ceil(0.25 x 38), the last always
    assert sample_chunks(38, 0.25, 5, "latents") == chosen  # the same for the same seed
    assert sample_chunks(38, 0.25, 6, "latents") != chosen
    assert sample_chunks(38, 1.0, 5, "latents") == range(38)
    problems, reads = chunk_reads(plain, fraction=0.25, seed=5)
    assert problems == [] and reads == {(f"latents/c/{k}/0/0", None) for k in chosen}
    assert len(chunk_reads(plain)[1]) == 38  # the full scan reads every chunk
    # sharded: the drawn chunks are read by byte range from their shard files
    problems, reads = chunk_reads(sharded, fraction=0.25, seed=5)
    ranges = {(k, (r.start, r.end)) for k, r in reads if isinstance(r, RangeByteRequest)}
    assert problems == [] and len(ranges) == 10
    assert {k for k, _ in ranges} == {f"latents/c/{k // 4}/0/0" for k in chosen}


def test_a_sampled_check_finds_damage_in_a_drawn_chunk_and_every_missing_file(plain, tmp_path):
    path = tmp_path / "s.zarr"
    for p in sorted(plain.rglob("*")):
        if p.is_file():
            (path / p.relative_to(plain)).parent.mkdir(parents=True, exist_ok=True)
            (path / p.relative_to(plain)).write_bytes(p.read_bytes())
    chosen = sample_chunks(38, 0.25, 5, "latents")
    drawn, other = min(chosen), min(set(range(38)) - set(chosen) - {0})
    flip(path / "latents" / "c" / str(drawn) / "0" / "0")
    flip(path / "latents" / "c" / str(other) / "0" / "0")
    (path / "labels" / "c" / "3").unlink()  # missing: found from the listing, drawn or not
    sampled = check_store(path, fraction=0.25, seed=5)
    assert len(sampled) == 2 and f"chunk {drawn} (samples" in sampled[0]
    assert "field 'labels': chunk 3 (samples 24..31) is missing" in sampled[1]
    assert check_store(path, fraction=0.25, seed=5) == sampled  # deterministic
    full = check_store(path)
    assert len(full) == 3 and f"chunk {other} (samples" in " ".join(full)
    assert check_store(path, fraction=1.0, seed=9) == full
    group = open_group(path)
    specs = field_specs(group.attrs)
    assert scan(group, specs, COUNT, fraction=1.0, seed=3) == scan(group, specs, COUNT)
    with pytest.raises(StoreError, match=f"chunk {drawn} "):
        open_store(path, verify=True, verify_fraction=0.25, verify_seed=5)
    # a NaN in the last (partly filled) chunk is found by any sample
    nan = tmp_path / "nan.zarr"
    with StoreWriter(nan, {"format_version": 1, "modality": "t", "config_hash": "t",
                           "fields": {"x": {"shape": [], "dtype": "float32"}}},
                     chunks=8) as w:
        w.append({"x": np.r_[np.zeros(297, np.float32), np.nan, 0, 0]})
        w.finish()
    assert "NaN/Inf at sample index 297" in check_store(nan, fraction=0.01)[0]


def test_cli_encode_shards_option(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    argv = ["encode", "toy", "waves", str(path), *TOY_ARGS, "--batch-size", str(BATCH)]
    assert cli.main([*argv, "--shards", "8192"]) == 0  # default chunks: 4096, 65 536, 2048
    assert open_store(path).schema["shards"] == {"latents": 8192, "captions": 8192}
    assert cli.main(["store", "check", str(path)]) == 0
    assert "in shards of 8192 samples (2 chunks per file)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([*argv, "--shards", "many"])
    assert "expected auto, none or samples per shard" in capsys.readouterr().err


def test_sampled_verify_on_open_encode_and_the_cli(plain, capsys):
    store = open_store(plain, verify=True, verify_fraction=0.1)
    assert store.verified_fraction == 0.1 and not store.verified
    assert open_store(plain, verify=True).verified
    assert encode(plain, shards=None, verify_fraction=0.1).verified_fraction == 0.1
    assert encode(plain, shards=None, verify=False).verified_fraction == 0.0
    rc = cli.main(["store", "check", str(plain), "--sample", "0.1", "--seed", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "reading a sample of 0.1 of each field's chunks (seed 2)" in out
    with pytest.raises(SystemExit):
        cli.main(["store", "check", str(plain), "--sample", "0"])
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_trainer_config_verify_fraction(capsys, monkeypatch):
    assert TrainerConfig.__attrs_attrs__.verify_fraction.default == 1.0  # old configs: full
    assert cli.main(["config", "validate", "toy", "verify_fraction=0.05"]) == 0
    assert cli.main(["config", "validate", "toy", "verify_stores=false"]) == 0
    capsys.readouterr()
    assert cli.main(["config", "validate", "toy", "verify_fraction=0"]) == 2
    assert "verify_fraction" in capsys.readouterr().err
    from selfflow_core.config.validate import RESUMABLE_CHANGES
    assert "verify_fraction" in RESUMABLE_CHANGES


def test_the_trainer_checks_the_sampled_share_once(tmp_path, monkeypatch):
    from selfflow_core.builtin.dit import DiT
    from selfflow_core.builtin.presets import toy as toy_preset
    from selfflow_core.trainer import Trainer

    calls = []
    real = writer_module.scan

    def spy(*args, **kw):
        calls.append((kw.get("fraction"), kw.get("seed")))
        return real(*args, **kw)

    monkeypatch.setattr(writer_module, "scan", spy)  # encode_store's check
    monkeypatch.setattr("selfflow_core.data.check.scan", spy)  # open_store's
    base = toy_preset()
    spec = attrs.evolve(base.modalities["toy"], modality=ToyModality.Config(
        tokens=8, channels=4, classes=4, count=32), store=str(tmp_path / "s.zarr"),
        source="waves", batch_size=8)
    config = attrs.evolve(base, modalities={"toy": spec}, steps=1, seed=7,
                          backbone=DiT.Config(depth=3, width=32, heads=4),
                          run_dir=str(tmp_path / "run"), verify_fraction=0.5)
    Trainer(config, progress=False)  # encodes the store, then opens it: checked on open
    assert calls == [(0.5, 7)]
    Trainer(attrs.evolve(config, run_dir=str(tmp_path / "again")), progress=False)
    assert calls == [(0.5, 7)] * 2  # by encode_store on the complete store; not again on open
