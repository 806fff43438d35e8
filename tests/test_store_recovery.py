"""Recovering from what goes wrong around a latent store, each from the library and the CLI:

- re-running an encode on a complete store verifies it: a damaged chunk is refused, naming it,
  and ``--repair`` (``repair=True``) re-encodes only the damaged chunks from the source;
- an encode interrupted by an error resumes once the cause is removed, even when that changed
  the source's description, if the source still yields the committed samples (else: refused,
  naming the store to delete);
- a store of another configuration is refused saying how it differs, in words;
- ``selfflow store check`` shows what the store holds before "ok";
- a store locked by another writer names it as "pid N on host H";
- a trainer whose config differs from the run's latest checkpoint is refused before it encodes a
  store or opens its tracker.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import attrs
import numpy as np
import pytest
import zarr
from toys import FailingToy

import selfflow_core.cli.main as cli
from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy as toy_preset
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.run import CheckpointConfig
from selfflow_core.config.validate import config_data
from selfflow_core.data.check import describe_store
from selfflow_core.data.store import StoreError, check_store, open_store, store_schema
from selfflow_core.data.writer import StoreWriter, encode_store
from selfflow_core.errors import CheckpointError, LockHeld
from selfflow_core.interfaces import Source, Tracker, TrackerConfig
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.runtime import checkpoint
from selfflow_core.trainer import Trainer

COUNT, BATCH, CHUNK = 300, 64, 32
TOY = ToyModality.Config(tokens=8, channels=4, classes=4, count=COUNT)
DIES = "cannot decode sample"  # what the failing encoder raises
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


def encode(path, adapter=None, **kw):
    return encode_store(adapter or TOY.build(), "waves", path, adapter_config=attrs.asdict(TOY),
                        batch_size=BATCH, progress=False, chunks=CHUNK, **kw)


def stored(path) -> dict[str, np.ndarray]:
    store = open_store(path)
    return store.read(np.arange(len(store)))


def source_data(adapter=None) -> dict[str, np.ndarray]:
    raw = (adapter or TOY.build()).open_source("waves")
    return raw.read(0, len(raw))


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def chunk_file(store: Path, k: int, field: str = "latents") -> Path:
    return store / field / "c" / str(k) / ("0/0" if field == "latents" else "")


def flip(path: Path, position: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1
    path.write_bytes(bytes(data))


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err




class Without(Source):
    """A source with sample ``drop`` left out (and so another description), like a folder after
    an unreadable file was removed."""

    def __init__(self, raw: Source, drop: int) -> None:
        self.keep = np.delete(np.arange(len(raw)), drop)
        self.data = raw.read(0, len(raw))
        self.description = f"{raw.description}, without sample {drop}"

    def __len__(self) -> int:
        return len(self.keep)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[self.keep[start:stop]] for k, v in self.data.items()}


class ToyWithout(ToyModality):
    def __init__(self, config, drop: int) -> None:
        super().__init__(config)
        self.drop = drop

    def open_source(self, name):
        return Without(super().open_source(name), self.drop)


# -- a damaged complete store: verified on re-encode, repaired on request ------------------------

def test_reencoding_a_damaged_store_is_refused_naming_the_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    encode(path)
    target = chunk_file(path, 3)
    flip(target)
    before = digest(path)
    with pytest.raises(StoreError) as e:
        encode(path)
    message = str(e.value)
    assert "field 'latents': chunk 3 (samples 96..127) is unreadable" in message
    assert str(target) in message and "--repair" in message and f"delete {path}" in message
    assert digest(path) == before  # refused: nothing written
    assert encode(path, verify=False).verified is False  # the old behaviour, on request


def test_repair_reencodes_only_the_damaged_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    encode(path)
    flip(chunk_file(path, 3))
    chunk_file(path, 5).unlink()  # a missing chunk
    chunk_file(path, 1, "labels").unlink()
    lat = zarr.open_group(str(path), mode="r+")["latents"]
    lat[200, 0, 0] = np.nan  # chunk 6
    damaged = {f"latents/c/{k}/0/0" for k in (3, 5, 6)} | {"labels/c/1"}
    before = digest(path)
    store = encode(path, repair=True)
    after = digest(path)
    assert store.verified and check_store(path) == []
    assert_same(stored(path), source_data())
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed - {"zarr.json"} == damaged  # every other chunk is untouched


def test_repair_of_an_interrupted_store_then_resumes(tmp_path):
    """Damage in the committed part of an interrupted store (an early chunk and the partly filled
    last one): refused on resume (it would be marked complete), repaired with ``repair``."""
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        encode(path, FailingToy(TOY, fail_at=3, message=DIES))
    assert zarr.open_group(str(path), mode="r").attrs["committed"] == 2 * BATCH
    flip(chunk_file(path, 1))
    with pytest.raises(StoreError, match=r"chunk 1 \(samples 32..63\) is unreadable"):
        encode(path)
    assert not open_store(path, require_complete=False).schema["complete"]
    encode(path, repair=True)
    assert check_store(path) == [] and len(open_store(path)) == COUNT
    assert_same(stored(path), source_data())


def test_repair_of_a_damaged_partly_filled_last_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    adapter = TOY.build()
    schema = store_schema(adapter, source="waves",
                          source_description=adapter.open_source("waves").description,
                          adapter_config=attrs.asdict(TOY))
    with StoreWriter(path, schema, chunks=CHUNK) as writer:
        writer.append(adapter.open_source("waves").read(0, 40))  # chunk 1 holds 8 of 32
    flip(chunk_file(path, 1), 5)
    with pytest.raises(StoreError, match="--repair"):
        encode(path)
    encode(path, repair=True)
    assert check_store(path) == []
    assert_same(stored(path), source_data())


def test_chunks_of_fill_values_are_written_after_reopening(tmp_path):
    """All-zero chunks (e.g. the labels of an unlabelled folder) must be written too: a missing
    chunk file means damage. The setting is not stored with the array, so each writer sets it."""
    schema = store_schema(TOY.build(), source="waves", source_description="",
                          adapter_config=attrs.asdict(TOY))
    zeros = {"latents": np.zeros((8, 8, 4), np.float32), "labels": np.zeros(8, np.int64)}
    path = tmp_path / "z.zarr"
    with StoreWriter(path, schema, chunks=4) as w:
        w.append(zeros)
    with StoreWriter(path, schema, chunks=4) as w:
        w.append(zeros)
        w.finish()
    assert check_store(path) == []


def test_cli_encode_refuses_a_damaged_store_and_repairs_it(capsys, tmp_path):
    store = tmp_path / "s.zarr"
    argv = ["encode", "toy", "waves", store, "count=100", "tokens=8", "channels=4",
            "--batch-size", "16"]
    rc, out, err = cli_run(capsys, *argv)
    assert rc == 0, err
    target = store / "latents" / "c" / "0" / "0" / "0"
    flip(target)
    rc, out, err = cli_run(capsys, *argv)
    assert rc == 2 and "samples of toy" not in out  # never reported as complete
    assert err.startswith("error: latent store") and str(target) in err and "--repair" in err
    assert "Traceback" not in err
    rc, out, err = cli_run(capsys, *argv, "--repair")
    assert rc == 0 and f"store {store}: 100 samples of toy" in out, err
    assert "chunk 0 (samples 0..99) re-encoded from the source" in err
    rc, out, _ = cli_run(capsys, "store", "check", store)
    assert rc == 0 and out.splitlines()[-1] == f"store {store}: ok"


# -- an interrupted encode whose source changed -------------------------------------------------

def test_interrupted_encode_resumes_from_a_changed_source_that_yields_the_same_samples(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="cannot decode"):
        encode(path, FailingToy(TOY, fail_at=3, message=DIES))  # 128 committed
    fixed = ToyWithout(TOY, drop=250)  # "the cause removed": a later sample left out
    store = encode(path, fixed)
    assert len(store) == COUNT - 1 and check_store(path) == []
    assert_same(stored(path), source_data(fixed))
    direct = encode(tmp_path / "direct.zarr", fixed)
    assert store.schema["config_hash"] == direct.schema["config_hash"]
    assert store.schema["source"] == direct.schema["source"]


def test_interrupted_encode_from_a_source_that_no_longer_yields_its_samples_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        encode(path, FailingToy(TOY, fail_at=3, message=DIES))
    before = digest(path)
    with pytest.raises(StoreError) as e:
        encode(path, ToyWithout(TOY, drop=5))  # a committed sample left out: the rest shifts
    message = str(e.value)
    assert "incomplete (128 samples committed)" in message
    assert "without sample 5" in message and "do not match" in message
    assert f"Delete {path} and encode it again" in message
    assert digest(path) == before


@pytest.mark.filterwarnings("ignore")
def test_cli_encode_resumes_after_an_unreadable_image_is_removed(capsys, tmp_path, monkeypatch):
    """The case as a user meets it: an image folder with a broken file stops the encode; once
    the file is removed the folder has one image less, and the encode continues."""
    pytest.importorskip("selfflow_image")
    image = pytest.importorskip("PIL.Image")
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")
    folder, store = tmp_path / "imgs", tmp_path / "img.zarr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (folder / "025.png").write_bytes(b"not a png")
    argv = ["encode", "image", folder, store, "--batch-size", "8"]
    try:
        rc = cli.main([str(a) for a in argv])
    except Exception:  # noqa: BLE001 - how the image modality reports the file is not tested here
        rc = None
    capsys.readouterr()
    assert rc != 0 and open_store(store, require_complete=False).schema["committed"] == 24
    (folder / "025.png").unlink()
    rc, out, err = cli_run(capsys, *argv)
    assert rc == 0, err
    assert f"store {store}: 39 samples of image" in out
    assert check_store(store) == []


# -- another configuration, in words ------------------------------------------------------------

def test_other_configuration_is_said_in_words(capsys, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli_run(capsys, "encode", "toy", "waves", store, "count=40")[0] == 0
    rc, _, err = cli_run(capsys, "encode", "toy", "waves", store, "count=40", "channels=3",
                         "seed=2")
    assert rc == 2 and "different configuration" in err and "config hash" not in err
    assert "field 'latents' [16, 8] float32, expected [16, 3] float32" in err
    assert "adapter_config.channels 8, expected 3" in err
    assert "adapter_config.seed 0, expected 2" in err
    assert f"delete {store} to encode it again" in err

    class Other(ToyModality):
        name = "waves2"

        def fields(self):
            return {**super().fields(), "extra": super().fields()["labels"]}

    with pytest.raises(StoreError) as e:
        encode_store(Other(ToyModality.Config(count=40)), "waves", store,
                     adapter_config=attrs.asdict(ToyModality.Config(count=40)), progress=False)
    message = str(e.value)
    assert "it holds modality 'toy', expected 'waves2'" in message
    assert ("fields (latents [16, 8] float32, labels [] int64), expected (latents [16, 8] "
            "float32, labels [] int64, extra [] int64)") in message
    assert "encoder" not in message  # another modality: its fields say enough


def test_adapter_mismatch_on_open_is_said_in_words(tmp_path):
    path = tmp_path / "s.zarr"
    encode(path)
    with pytest.raises(StoreError) as e:
        open_store(path, adapter=attrs.evolve(TOY, channels=6).build())
    assert "field 'latents': store has [8, 4] float32, the adapter expects [8, 6] float32" in str(
        e.value)


# -- store check shows the schema ---------------------------------------------------------------

def test_store_check_shows_the_schema_then_ok(capsys, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli_run(capsys, "encode", "toy", "waves", store, "count=40", "tokens=6")[0] == 0
    rc, out, _ = cli_run(capsys, "store", "check", store)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"store {store}:" and lines[-1] == f"store {store}: ok"
    for part in ["modality: 'toy', 4 classes", "encoder: 'identity' version 1",
                 "source: 'waves' (toy waves: 40 x 6 tokens x 8 ch, seed 0)",
                 "samples: 40, complete",
                 "field latents: [6, 8] float32, chunks of 2048 samples, compressor none, "
                 "crc32c checksum",
                 "field labels: [] int64, chunks of 65536 samples, compressor none, "
                 "crc32c checksum"]:
        assert f"  {part}" in lines, (part, out)


def test_store_check_of_an_incomplete_compressed_store(capsys, tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        encode(path, FailingToy(TOY, fail_at=2, message=DIES), compressor="zstd")
    lines = describe_store(path)
    assert any(line.startswith("samples: 64 committed, incomplete") for line in lines), lines
    assert "field latents: [8, 4] float32, chunks of 32 samples, compressor zstd level 3, " \
           "crc32c checksum" in lines
    rc, out, _ = cli_run(capsys, "store", "check", path)
    assert rc == 1 and "incomplete" in out.splitlines()[-1]
    assert describe_store(tmp_path / "missing.zarr") == []


# -- a lock held by another writer --------------------------------------------------------------

def test_lock_holder_is_named_in_words(capsys, tmp_path):
    assert LockHeld("x.lock", (26975, "vm")).who == "pid 26975 on host vm"
    assert "held by pid 26975 on host vm" in str(LockHeld("x.lock", (26975, "vm")))
    store = tmp_path / "s.zarr"
    Path(f"{store}.lock").write_text("26975 otherhost\n")  # another host: assumed alive
    rc, _, err = cli_run(capsys, "encode", "toy", "waves", store, "count=40")
    assert rc == 2 and "(pid 26975 on host otherhost)" in err and "((" not in err, err
    assert f"{store}.lock" in err and not store.exists()
    Path(f"{store}.lock").write_text(f"{__import__('os').getpid()} {socket.gethostname()}\n")
    with pytest.raises(StoreError, match=f"pid {__import__('os').getpid()} on host"):
        encode(store)


# -- a trainer that will refuse its checkpoint refuses first -------------------------------------

BUILDS: list[Path] = []


class RecordingTracker(Tracker):
    @attrs.frozen(kw_only=True)
    class Config(TrackerConfig):
        kind = "recording"

        def build(self, *, run_dir: Path, experiment: str = "selfflow") -> RecordingTracker:
            BUILDS.append(Path(run_dir))
            return RecordingTracker()

    def log_hparams(self, hparams):
        pass

    def log_metrics(self, metrics, *, step):
        pass


class RecordingPlugin:
    @hookimpl
    def selfflow_register_trackers(self, registry):
        registry.add(RecordingTracker.Config)


def small(run_dir: Path, store: Path, **changes):
    base = toy_preset()
    spec = attrs.evolve(base.modalities["toy"], modality=ToyModality.Config(
        tokens=8, channels=4, classes=4, count=32), store=str(store), source="waves",
        batch_size=8)
    cfg = attrs.evolve(base, modalities={"toy": spec}, tracker=RecordingTracker.Config(),
                       backbone=DiT.Config(depth=3, width=32, heads=4),
                       checkpoint=CheckpointConfig(every=3, keep=3), steps=3,
                       run_dir=str(run_dir))
    return attrs.evolve(cfg, **changes)


def test_trainer_refuses_a_checkpoint_of_another_config_before_encoding_or_tracking(tmp_path):
    components = Components(make_plugin_manager([RecordingPlugin()], entry_points=False))
    run, old, new = tmp_path / "run", tmp_path / "old.zarr", tmp_path / "new.zarr"
    first = small(run, old)
    checkpoint.save({"format": 1, "step": 3, "config": json.dumps(config_data(first, components))},
                    run / "checkpoints", 3, keep=3)
    BUILDS.clear()
    with pytest.raises(CheckpointError) as e:
        Trainer(small(run, new, seed=4), components=components, progress=False)
    assert "step-00000003.pt" in str(e.value) and "seed" in str(e.value)
    assert not new.exists() and not Path(f"{new}.lock").exists()  # nothing was encoded
    assert BUILDS == []  # the tracker was never built
    # the checkpoint's own config gets past construction: its store encoded, its tracker built
    Trainer(first, components=components, progress=False)
    assert len(open_store(old)) == 32 and BUILDS == [run]
