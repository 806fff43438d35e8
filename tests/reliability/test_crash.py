"""Crashes: kill -9 during checkpoint writes, during training and during ``selfflow encode``;
SIGTERM at random steps. The latest complete checkpoint always loads, a resumed run equals the
uninterrupted one, an interrupted encode completes with every sample exactly once."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import selfflow_core.cli.main as cli
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.converter import make_converter, to_data
from selfflow_core.data.store import check_store, open_store
from selfflow_core.data.writer import encode_store
from selfflow_core.runtime import checkpoint

CHECKPOINT_TRIALS = 60
STEPS = 10


def steps_of(directory: Path) -> list[int]:
    return [int(p.name[5:13]) for p in checkpoint.list_checkpoints(directory)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_store, rel):
    """An uninterrupted STEPS-step run, in this process: its final checkpoint is the truth."""
    run = tmp_path_factory.mktemp("reference")
    assert cli.main(["train", "toy", *rel.tiny_overrides(toy_store, run, STEPS),
                     "checkpoint.every=3", "log_every=1000"]) == 0
    return run, checkpoint.load(checkpoint.path_for(run / "checkpoints", STEPS))


def assert_resumes_to_reference(rel, toy_store, run: Path, reference_state: dict) -> None:
    assert cli.main(["train", "toy", *rel.tiny_overrides(toy_store, run, STEPS),
                     "log_every=1000"]) == 0
    final = checkpoint.load(checkpoint.path_for(run / "checkpoints", STEPS))
    differ = rel.same_state(rel.training_state(final), rel.training_state(reference_state))
    assert not differ, f"{run}: resumed run differs from the uninterrupted one at {differ[:10]}"


# -- kill -9 during checkpoint writes -----------------------------------------------------------

def test_kill9_during_checkpoint_writes_leaves_a_loadable_latest(tmp_path, reference, rel):
    """60 writers of a real trainer state, each SIGKILLed at a random moment of its save loop
    (mid-``torch.save``, mid-fsync, between rename and pruning ...)."""
    template = checkpoint.path_for(reference[0] / "checkpoints", STEPS)
    summary = rel.run_driver("checkpoint", {
        "template": str(template), "trials": CHECKPOINT_TRIALS, "seed": 8, "keep": 2,
        "min_delay": 0.01, "max_delay": 0.25}, tmp_path)
    truth = rel.training_state(reference[1])
    killed_mid_write, none_complete, temps, latest_steps = 0, 0, 0, []
    for trial in summary["trials"]:
        assert trial["status"] == -9, trial  # the writer never failed on its own
        d = Path(trial["dir"])
        if not d.exists():  # killed before its first save made the directory
            none_complete += 1
            continue
        leftovers = [p for p in d.iterdir() if checkpoint.files.TEMP_PATTERN.match(p.name)]
        killed_mid_write += bool(leftovers)
        temps += len(leftovers)
        assert len(leftovers) <= 1, leftovers
        # nothing but complete checkpoints and at most one temp file
        assert {p.name for p in d.iterdir()} == (
            {p.name for p in checkpoint.list_checkpoints(d)} | {p.name for p in leftovers})
        latest = checkpoint.latest(d)
        if latest is None:
            none_complete += 1
            continue
        steps = steps_of(d)
        latest_steps.append(steps[-1])
        assert steps == list(range(steps[0], steps[-1] + 1)) and len(steps) <= 3, steps
        for path in checkpoint.list_checkpoints(d):  # every complete one loads, not only latest
            state = checkpoint.load(path)
            step = int(path.name[5:13])
            assert state["step"] == step and torch.equal(state["marker"],
                                                         torch.full((64,), float(step)))
            state.pop("marker")
            assert not rel.same_state({**rel.training_state(state), "step": STEPS}, truth)
        # a resume cleans up what the killed writer left, and only that
        before = {p: p.read_bytes() for p in checkpoint.list_checkpoints(d)}
        assert set(checkpoint.remove_stale_temps(d)) == set(leftovers)
        assert {p: p.read_bytes() for p in checkpoint.list_checkpoints(d)} == before
    print(f"\ncheckpoint kill -9: {len(summary['trials'])} trials, {killed_mid_write} killed "
          f"mid-write (temp file left), {none_complete} before the first save completed; "
          f"latest complete step per trial: {sorted(latest_steps)}")
    assert len(summary["trials"]) >= 50
    assert killed_mid_write >= len(summary["trials"]) // 2  # the kills do land inside writes
    assert none_complete < len(summary["trials"]) // 2


# -- kill -9 and SIGTERM during training --------------------------------------------------------

def train_trials(rel, toy_store, root: Path, signal_name: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        run = root / f"run-{i}"
        every = ["checkpoint.every=1", "checkpoint.keep=2"] if signal_name == "SIGKILL" else \
            ["checkpoint.every=1000"]  # SIGTERM: the only checkpoint is the one it writes
        trials.append({"argv": [*rel.tiny_overrides(toy_store, run, STEPS), "log_every=1",
                                *every],
                       "run": str(run), "signal": signal_name,
                       # at a random point inside a step, with >= 3 steps left: a step of
                       # this model takes ~10 ms on an idle machine (a longer delay could land
                       # after the last step, where there is nothing left to stop)
                       "target": rng.randint(1, STEPS - 3), "delay": rng.uniform(0, 0.01)})
    return trials


@pytest.mark.slow
def test_kill9_during_training_resumes_to_the_uninterrupted_run(tmp_path, toy_store, reference,
                                                                rel):
    trials = train_trials(rel, toy_store, tmp_path, "SIGKILL", 3, seed=3)
    summary = rel.run_driver("train", {"trials": trials}, tmp_path / "driver")
    for trial in summary["trials"]:
        assert trial["status"] == -9 and trial["sent_after_step"] is not None, trial["output"]
        run = Path(trial["run"])
        latest = checkpoint.latest(run / "checkpoints")
        assert latest is not None and checkpoint.load(latest)["step"] >= trial["target"] - 1
        assert_resumes_to_reference(rel, toy_store, run, reference[1])
        assert not [p for p in (run / "checkpoints").iterdir()
                    if checkpoint.files.TEMP_PATTERN.match(p.name)]  # the resume removed them
    print("\ntraining kill -9 after steps", [t["sent_after_step"] for t in summary["trials"]])


@pytest.mark.slow
def test_sigterm_at_random_steps_checkpoints_exits_0_and_resumes_exactly(tmp_path, toy_store,
                                                                         reference, rel):
    trials = train_trials(rel, toy_store, tmp_path, "SIGTERM", 3, seed=5)
    summary = rel.run_driver("train", {"trials": trials}, tmp_path / "driver")
    stopped = []
    for trial in summary["trials"]:
        out = trial["output"]
        assert trial["status"] == 0, out
        assert "Traceback" not in out and trial["sent_after_step"] is not None, out
        lines = [ln for ln in out.splitlines() if "stopped by SIGTERM after step" in ln]
        assert lines, out
        k = int(lines[0].split("after step ")[1].split(";")[0])
        # it finished the step it was in (on a fast machine that can be the last step)
        assert trial["sent_after_step"] <= k <= STEPS, out
        run = Path(trial["run"])
        assert steps_of(run / "checkpoints") == [k]  # written because of the signal
        assert checkpoint.load(checkpoint.path_for(run / "checkpoints", k))["step"] == k
        stopped.append(k)
        assert_resumes_to_reference(rel, toy_store, run, reference[1])
    print("\nSIGTERM stops after steps", stopped)


# -- kill -9 during `selfflow encode` -----------------------------------------------------------

ENCODE_COUNT, ENCODE_BATCH = 2000, 32
ENCODE = ToyModality.Config(tokens=8, channels=4, classes=4, count=ENCODE_COUNT)
ENCODE_OPTIONS = [f"count={ENCODE_COUNT}", "tokens=8", "channels=4"]


@pytest.mark.slow
def test_kill9_during_encode_then_rerun_completes_exactly(tmp_path, rel, monkeypatch):
    summary = rel.run_driver("encode", {
        "options": ENCODE_OPTIONS, "batch_size": ENCODE_BATCH, "seed": 11, "stores": 4,
        "kills_per_store": 2, "batches": -(-ENCODE_COUNT // ENCODE_BATCH)}, tmp_path / "driver")
    direct = encode_store(ENCODE.build(), "waves", tmp_path / "direct.zarr",
                          adapter_config=to_data(make_converter(), ENCODE), progress=False)
    truth = direct.read(np.arange(ENCODE_COUNT))
    monkeypatch.chdir(tmp_path)
    partial, uncommitted_rows = 0, 0
    for entry in summary["stores"]:
        store = Path(entry["store"])
        for kill in entry["kills"]:
            assert kill["status"] in (-9, 0), kill  # killed (or it had just finished)
            committed, rows = kill["after"]
            partial += committed is not None and committed < ENCODE_COUNT
            uncommitted_rows += rows is not None and committed is not None and rows > committed
        assert cli.main(["encode", "toy", "waves", str(store), *ENCODE_OPTIONS,
                         "--batch-size", str(ENCODE_BATCH)]) == 0
        assert check_store(store) == []
        got = open_store(store).read(np.arange(ENCODE_COUNT))
        for name, values in truth.items():
            np.testing.assert_array_equal(got[name], values, err_msg=f"{store} {name}")
        assert not Path(f"{store}.lock").exists()
    kills = sum(len(e["kills"]) for e in summary["stores"])
    print(f"\nencode kill -9: {kills} kills on {len(summary['stores'])} stores "
          f"(uninterrupted encode {summary['duration']:.2f}s); {partial} left a partial store, "
          f"{uncommitted_rows} left uncommitted rows")
    assert partial >= kills // 2
