"""Encoding one store over several processes: ``selfflow encode --workers N`` (spawned processes)
and ``torchrun ... -m selfflow_core.cli encode`` (ranks) write the same store, file for file and
byte for byte, as one process; a worker or rank killed mid-encode (SIGKILL) leaves an incomplete
store that ``open_store`` refuses, and a rerun continues it (skipping the ranges done, a half-done
range after its last counted batch) to the same store; the completeness marker is written once,
by the coordinator, after every chunk. CPU, one thread per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import numpy as np
import pytest
import zarr
from toys import FailingToy

import selfflow_core.cli.main as cli
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.data.check import describe_store
from selfflow_core.data.ranges import PLAN, WORK, Plan, encode_share, finish, prepare, read_done
from selfflow_core.data.store import StoreError, open_store, store_schema
from selfflow_core.data.writer import StoreWriter, encode_store

ROOT = Path(__file__).resolve().parents[1]
#: 300 toy samples of 64 x 64 float32 (16 KiB): latents chunks of 32 samples, so 10 ranges of 32
#: for 2 workers; labels (65 536 per chunk) and captions (2 048) are staged
OPTIONS = ["count=300", "tokens=64", "channels=64", "captions=2"]
BATCH = 8  # 4 batches per range
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")

#: runs ``selfflow`` (argv) with every group-attribute write and every source read logged to
#: $ENCODE_LOG, one JSON line each, by every process (spawned workers import this script as
#: their main module; torchrun runs it per rank); $KILL_AT: the process reading that sample
#: SIGKILLs itself first; $MEET and $READ_S: the processes encode at the same time
DRIVER = textwrap.dedent("""
    import json, os, signal, sys, time

    import zarr.core.attributes as za

    from selfflow_core.builtin import toy

    def note(**entry):
        with open(os.environ["ENCODE_LOG"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK"), **entry})
                    + "\\n")

    put, setitem, read = za.Attributes.put, za.Attributes.__setitem__, toy.WaveSource.read

    def logged_put(self, d):
        note(kind="attrs", keys=sorted(d), complete=d.get("complete"))
        return put(self, d)

    def logged_setitem(self, key, value):
        note(kind="attrs", keys=[key], complete=value if key == "complete" else None)
        return setitem(self, key, value)

    met = []

    def meet():
        # $MEET: every process reading waits for the others (N files in the folder) once,
        # so that they write at the same time
        folder, n = os.environ["MEET"].rsplit(",", 1)
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
            time.sleep(0.01)
        met.append(True)

    def logged_read(self, start, stop):
        if os.environ.get("MEET") and not met:
            meet()
        time.sleep(float(os.environ.get("READ_S", "0")))
        if start <= int(os.environ.get("KILL_AT", "-1")) < stop:
            note(kind="killed", start=start, stop=stop)
            os.kill(os.getpid(), signal.SIGKILL)
        note(kind="read", start=start, stop=stop)
        return read(self, start, stop)

    za.Attributes.put, za.Attributes.__setitem__ = logged_put, logged_setitem
    toy.WaveSource.read = logged_read

    if __name__ == "__main__":
        import selfflow_core.cli.main as cli
        sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.fixture(autouse=True)
def core_only(monkeypatch):
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KILL_AT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The store as one process encodes it."""
    path = tmp_path_factory.mktemp("one") / "one.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
        assert cli.main(encode_argv(path)) == 0
    return path


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


def assert_same_store(one: Path, other: Path) -> None:
    """The same files with the same bytes; the group's attributes differ in ``created_at`` only."""
    a, b = files(one), files(other)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    assert [k for k in a if k != "zarr.json" and a[k] != b[k]] == []
    attrs_a, attrs_b = (json.loads(a["zarr.json"])["attributes"],
                        json.loads(b["zarr.json"])["attributes"])
    attrs_a.pop("created_at"), attrs_b.pop("created_at")
    assert attrs_a == attrs_b
    assert not any(WORK in k or k.endswith(".partial") for k in b)
    x, y = open_store(one), open_store(other)
    assert len(x) == len(y) == 300
    for name, values in x.read(np.arange(300)).items():
        np.testing.assert_array_equal(values, y.read(np.arange(300))[name], err_msg=name)


def assert_marker_last(store: Path) -> None:
    """The group's metadata (holding the marker) was written after every chunk."""
    marker = (store / "zarr.json").stat().st_mtime_ns
    chunks = [p for p in store.rglob("*") if p.is_file() and "/c/" in str(p)]
    assert chunks and max(p.stat().st_mtime_ns for p in chunks) <= marker


def log_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def markers(log: list[dict]) -> list[dict]:
    return [e for e in log if e["kind"] == "attrs" and e["complete"]]


def reads(log: list[dict]) -> set[tuple[int, int]]:
    return {(e["start"], e["stop"]) for e in log if e["kind"] == "read"}


def driver(tmp_path: Path, argv: list[str], *, torchrun: bool = False, kill_at: int | None = None,
           log: Path, meet: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "encode_driver.py"
    script.write_text(DRIVER)
    env = {**CHILD_ENV, "ENCODE_LOG": str(log)}
    if meet:
        folder = tmp_path / f"meet-{len(list(tmp_path.glob('meet-*')))}"
        folder.mkdir()
        env.update(MEET=f"{folder},{meet}", READ_S="0.005")
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2"] if torchrun else [sys.executable])
    return subprocess.run([*launch, str(script), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def encode_argv(store: Path, *extra: str) -> list[str]:
    return ["encode", "toy", "waves", str(store), *OPTIONS, "--batch-size", str(BATCH), *extra]


# -- the same store --------------------------------------------------------------------------------

def test_two_workers_write_the_store_one_process_writes(reference, tmp_path):
    store, log = tmp_path / "two.zarr", tmp_path / "encode.log"
    proc = driver(tmp_path, encode_argv(store, "--workers", "2"), log=log, meet=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == f"store {store}: 300 samples of toy from 'waves'\n"
    assert "(2 workers)" in proc.stderr and "sample/s" in proc.stderr  # one bar, every range
    assert_same_store(reference, store)
    assert_marker_last(store)
    entries = log_of(log)
    assert len({e["pid"] for e in entries if e["kind"] == "read"}) == 2  # both workers read
    # only the coordinator writes the group's attributes: the plan first, then the marker
    # once, last, with the plan dropped in the same write
    written = [e for e in entries if e["kind"] == "attrs"]
    assert len({e["pid"] for e in written}) == 1
    assert [e["keys"] for e in written[:1]] == [[PLAN]]
    assert markers(entries) == [written[-1]] and PLAN not in written[-1]["keys"]
    # running it again finds it complete
    assert cli.main(encode_argv(store, "--workers", "2")) == 0
    assert_same_store(reference, store)


@pytest.mark.slow
def test_torchrun_ranks_write_the_store_one_process_writes(reference, tmp_path):
    store = tmp_path / "ranks.zarr"
    # the documented command (the ranks start encoding together, once rank 0 prepared it)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "selfflow_core.cli", *encode_argv(store)],
        cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("300 samples of toy") == 1  # rank 0 only
    assert proc.stderr.count("(2 ranks): 100%") >= 1
    assert_same_store(reference, store)
    assert_marker_last(store)


def test_plan_ranges_fit_the_chunks():
    # toy latents of 32 per chunk, int64 labels of 65 536: ranges of 32, labels staged
    plan = Plan.choose(300, {"latents": 32, "labels": 65536}, workers=2)
    assert (plan.size, plan.count, plan.staged) == (32, 10, ["labels"])
    assert plan.lengths.tolist() == [32] * 9 + [12]
    # a million samples over 8 workers: about 8 ranges each, multiples of every chunk in place
    plan = Plan.choose(1_000_000, {"latents": 64, "captions": 1024, "labels": 65536}, workers=8)
    assert plan.size % 1024 == 0 and 48 <= plan.count <= 80 and plan.staged == ["labels"]
    # chunks longer than the whole share of a worker: the shortest is always written in place
    plan = Plan.choose(300, {"latents": 1024, "labels": 65536}, workers=2)
    assert (plan.size, plan.count, plan.staged) == (1024, 1, ["labels"])


# -- killed mid-encode, then run again ------------------------------------------------------------

def test_a_worker_killed_mid_encode_is_resumed_to_the_same_store(reference, tmp_path):
    store, log = tmp_path / "killed.zarr", tmp_path / "encode.log"
    # worker 0 of 2 owns ranges 0, 2, 4, 6, 8; it dies reading sample 147 in the third batch
    # of range 4 (samples 128..159), two batches of it counted
    proc = driver(tmp_path, encode_argv(store, "--workers", "2"), kill_at=147, log=log)
    assert proc.returncode == 2, proc.stderr[-4000:]
    error = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any("encode worker 0 of 2" in line and "was killed by SIGKILL" in line
               and "run the encode again to resume" in line for line in error), error
    killed = log_of(log)
    assert [e["start"] for e in killed if e["kind"] == "killed"] == [144]
    assert markers(killed) == []
    # not complete in between: refused, and the ranges done are on disk
    with pytest.raises(StoreError, match="incomplete: an encode in ranges"):
        open_store(store)
    group = zarr.open_group(str(store), mode="r")
    done = read_done(group)
    assert done[0] == done[2] == 32 and done[4] == 16, done.tolist()
    assert any(line.startswith("ranges: ") for line in describe_store(store))
    # run again in one process (no --workers): the ranges done are not read again, range 4
    # continues at sample 144
    log.unlink()
    proc = driver(tmp_path, encode_argv(store), log=log)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = reads(log_of(log))
    assert (144, 152) in again and not {(128, 136), (136, 144)} & again
    assert not any(start < 32 or 64 <= start < 96 for start, _ in again)
    assert len(markers(log_of(log))) == 1
    assert_same_store(reference, store)
    assert_marker_last(store)


@pytest.mark.slow
def test_a_rank_killed_mid_encode_is_resumed_by_a_new_torchrun(reference, tmp_path):
    store, log = tmp_path / "killed.zarr", tmp_path / "encode.log"
    # rank 1 owns ranges 1, 3, 5, 7, 9; it dies in the second batch of range 5 (160..191);
    # torchrun then stops rank 0
    proc = driver(tmp_path, encode_argv(store), torchrun=True, kill_at=169, log=log)
    assert proc.returncode != 0
    killed = log_of(log)
    assert [(e["rank"], e["start"]) for e in killed if e["kind"] == "killed"] == [("1", 168)]
    assert markers(killed) == []
    with pytest.raises(StoreError, match="incomplete: an encode in ranges"):
        open_store(store)
    assert read_done(zarr.open_group(str(store), mode="r"))[5] == 8
    log.unlink()
    proc = driver(tmp_path, encode_argv(store), torchrun=True, log=log)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    again = log_of(log)
    assert (168, 176) in reads(again) and (160, 168) not in reads(again)
    assert [m["rank"] for m in markers(again)] == ["0"]  # once, by rank 0
    assert_same_store(reference, store)
    assert_marker_last(store)


# -- continuing other stores; refusals -------------------------------------------------------------

COUNT = 300
TOY = ToyModality.Config(count=COUNT)




def encode(path, adapter=None, **kw):
    return encode_store(adapter or TOY.build(), "waves", path, adapter_config=attrs.asdict(TOY),
                        batch_size=20, progress=False, chunks={"latents": 16}, **kw)


def test_a_one_process_encode_interrupted_is_continued_by_workers(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="encoder died"):
        encode(path, FailingToy(TOY, fail_at=3))
    assert open_store(path, require_complete=False).schema["committed"] == 40
    store = encode(path, workers=2)  # ranges of 16: 0 and 1 done, 2 half done (40 = 2.5 x 16)
    direct = encode(tmp_path / "direct.zarr")
    assert_same_store(Path(direct.path), Path(store.path))


def planned(path: Path, share: list[int]) -> dict:
    """A store planned in ranges of 16 with the ranges ``share`` encoded (in this process), as
    an encode over 2 workers stopped then leaves it; returns its schema."""
    adapter = TOY.build()
    schema = store_schema(adapter, source="waves",
                          source_description=adapter.open_source("waves").description,
                          adapter_config=attrs.asdict(TOY))
    with StoreWriter(path, schema, chunks={"latents": 16}) as writer:
        assert prepare(writer, COUNT, workers=2).size == 16
    encode_share(path, adapter, "waves", share, adapter_config=attrs.asdict(TOY), batch_size=20)
    return schema


def test_an_encode_in_ranges_is_refused_to_plain_appends_and_in_memory(tmp_path):
    path = tmp_path / "s.zarr"
    schema = planned(path, [0, 3])
    with StoreWriter(path, schema) as writer:
        assert writer.ranges is not None
        assert writer.group["latents"].shape[0] == COUNT  # not cut back to `committed`
        with pytest.raises(StoreError, match="is being encoded in ranges"):
            writer.append(TOY.build().open_source("waves").read(0, 4))
        with pytest.raises(StoreError, match=r"17 of 19 ranges not done \(1, 2, 4, "):
            finish(writer, Plan.of(writer.group.attrs))  # no marker before every range
    assert "ranges: 2 of 19 ranges of 16 samples done, 32 of 300 samples" in "\n".join(
        describe_store(path))
    with pytest.raises(StoreError, match="incomplete: an encode in ranges"):
        open_store(path)
    assert len(encode(path)) == COUNT  # continued by a plain encode_store
    with pytest.raises(StoreError, match="not an in-memory store"):
        encode("memory://parallel", workers=2)


def test_workers_under_torchrun_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = cli.main(["encode", "toy", "waves", str(tmp_path / "s.zarr"), "--workers", "2"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--workers 2 under torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


def test_a_damaged_chunk_of_a_range_done_is_refused_then_encoded_again(tmp_path):
    path = tmp_path / "s.zarr"
    planned(path, [0, 1, 2])
    chunk = path / "latents" / "c" / "1" / "0" / "0"  # range 1's (samples 16..31)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(StoreError, match=r"field 'latents': chunk 1 \(samples 16..31\) is "
                       "unreadable") as e:
        encode(path, workers=1)
    assert "--repair" in str(e.value)
    assert encode(path, repair=True).schema["complete"]
    assert_same_store(Path(encode(tmp_path / "direct.zarr").path), path)
