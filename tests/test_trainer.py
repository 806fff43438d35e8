"""The trainer's bookkeeping: exact resume, checkpoint files, signals, non-finite losses, DDP,
hooks and label dropout. Tiny toy runs on CPU (one thread: the machine is shared)."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.cli.main import main as cli_main
from selfflow_core.cli.main import resolve_config
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.config.run import CheckpointConfig, TrainerConfig
from selfflow_core.eval.samples import load_for_sampling, sample_run
from selfflow_core.objective import ObjectiveConfig
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.runtime import assembly, checkpoint
from selfflow_core.runtime.dist import Dist
from selfflow_core.teachers import NoTeacher
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`
from selfflow_core.testing import torch_threads
from selfflow_core.timesteps import DualTimestep, SingleTimestep
from selfflow_core.trainer import NonFiniteLossError, Trainer

NULL_CLASS = TOY.classes
#: environment of child processes: one thread each (2 shared cores), no output buffering
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(run_dir, store, **changes):
    """The toy preset shrunk: depth 3, width 32, batch 8, 7 steps, checkpoints every 3 (on
    ``store``, the kit's ``toy_store``: the spec has no source, so nothing writes to it)."""
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, store=store, source="",
                        batch_size=8)
    cfg = attrs.evolve(
        base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32, heads=4),
        optim=attrs.evolve(base.optim, warmup_steps=2, schedule="cosine"),
        checkpoint=CheckpointConfig(every=3, keep=3),
        sampling=attrs.evolve(base.sampling, count=4, steps=2),
        tracker=NullTracker.Config(), steps=7, run_dir=str(run_dir), log_every=1)
    return attrs.evolve(cfg, **changes)


def components(*plugins) -> Components:
    return Components(make_plugin_manager(list(plugins), entry_points=False))


def ckpt_steps(run_dir) -> list[int]:
    return [int(p.name[5:13]) for p in checkpoint.list_checkpoints(Path(run_dir) / "checkpoints")]


def snapshot(tr: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the training state: backbone, head, EMA teacher, eval EMA, optimizer."""
    out = {}
    parts = {"model": tr.backbone.state_dict(), "head": tr.model.objective.state_dict(),
             "teacher": tr.teacher.state_dict()["model"]}
    if tr.eval_ema is not None:
        parts["eval_ema"] = tr.eval_ema.state_dict()["model"]
    for part, sd in parts.items():
        out.update({f"{part}.{k}": v.detach().clone() for k, v in sd.items()})
    for pid, st in tr.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optimizer.{pid}.{k}"] = (v.clone() if torch.is_tensor(v) else torch.tensor(v))
    assert any(k.endswith("exp_avg_sq") for k in out)
    return out


def assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"differ after resume: {differ[:10]}"
    assert a.losses == b.losses
    assert a.teacher.ema.updates == b.teacher.ema.updates
    assert a.lr_schedule.state_dict() == b.lr_schedule.state_dict()
    assert a.loader.state_dict() == b.loader.state_dict()
    if a.eval_ema is not None:
        assert a.eval_ema.updates == b.eval_ema.updates


class SigtermAt:
    """Sends this process SIGTERM at the end of step ``step`` (fit's handler makes it a stop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        if step == self.step:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "fit() installed no SIGTERM handler"
            signal.raise_signal(signal.SIGTERM)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def selfflow_on_train_start(self, trainer):
        self.events.append(("start", trainer.step))

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        self.events.append(("step", step, float(terms.total.detach())))

    @hookimpl
    def selfflow_on_checkpoint(self, trainer, step, path):
        self.events.append(("checkpoint", step, Path(path), Path(path).is_file(),
                            hashlib.sha256(Path(path).read_bytes()).hexdigest()))

    @hookimpl
    def selfflow_on_train_end(self, trainer, step, reason):
        self.events.append(("end", step, reason))

    def of(self, kind):
        return [e[1:] for e in self.events if e[0] == kind]


# -- exact resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [{}, {"grad_accum": 2}, {"eval_ema_decay": 0.9}],
                         ids=["plain", "grad_accum2", "eval_ema"])
def test_resume_is_bit_exact(tmp_path, toy_store, changes):
    steps, k = 7, 4  # k: not a multiple of checkpoint.every (3)
    straight = Trainer(tiny(tmp_path / "a", toy_store, **changes), components=components(),
                       progress=False)
    assert straight.fit()["reason"] == "done"
    assert len(straight.losses) == steps and ckpt_steps(tmp_path / "a") == [3, 6, 7]

    stopped = Trainer(tiny(tmp_path / "b", toy_store, **changes),
                      components=components(SigtermAt(k)), progress=False)
    handler = signal.getsignal(signal.SIGTERM)
    summary = stopped.fit()
    assert summary["reason"] == "signal" and summary["step"] == k
    assert ckpt_steps(tmp_path / "b") == [3, k]
    assert signal.getsignal(signal.SIGTERM) == handler  # fit() restored the previous handler
    assert stopped.losses == straight.losses[:k]
    del stopped

    rec = Recorder()
    resumed = Trainer(tiny(tmp_path / "b", toy_store, **changes), components=components(rec),
                      progress=False)
    assert resumed.fit()["reason"] == "done"
    assert rec.of("start") == [(k,)] and [s[0] for s in rec.of("step")] == list(range(k + 1, 8))
    assert_same_state(straight, resumed)

    if not changes:  # also from a periodic checkpoint copied into a fresh run
        (tmp_path / "c" / "checkpoints").mkdir(parents=True)
        shutil.copy(checkpoint.path_for(tmp_path / "a" / "checkpoints", 3),
                    tmp_path / "c" / "checkpoints")
        again = Trainer(tiny(tmp_path / "c", toy_store), components=components(), progress=False)
        again.fit()
        assert_same_state(straight, again)


class MicroBatches:
    """Records the modality of every micro-batch of each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def watch(self, tr: Trainer) -> Trainer:
        original = tr._next_batch

        def next_batch():
            m, batch = original()
            if len(self.steps) <= tr.step:
                self.steps.append([])
            self.steps[tr.step].append(m.name)
            return m, batch

        tr._next_batch = next_batch
        return tr


def test_an_optimizer_step_holds_one_modality_and_resumes_exactly(tmp_path, toy_store):
    """Paper App. D: each batch holds one modality; with grad_accum=3, all 3 micro-batches of an
    optimizer step come from one modality (drawn once per step), and resume stays exact."""
    def config(run_dir):
        base = tiny(run_dir, toy_store, grad_accum=3, steps=8)
        spec = attrs.evolve(base.modalities["toy"], batch_size=6)
        return attrs.evolve(base, modalities={
            "a": attrs.evolve(spec, probability=0.5), "b": attrs.evolve(spec, probability=0.5)})

    rec = MicroBatches()
    straight = rec.watch(Trainer(config(tmp_path / "a"), components=components(),
                                 progress=False))
    straight.fit()
    assert len(rec.steps) == 8 and all(len(step) == 3 for step in rec.steps)
    assert all(len(set(step)) == 1 for step in rec.steps), rec.steps
    assert {step[0] for step in rec.steps} == {"a", "b"}

    stopped = Trainer(config(tmp_path / "b"), components=components(SigtermAt(5)),
                      progress=False)
    assert stopped.fit()["step"] == 5
    del stopped
    again = MicroBatches()
    again.steps = [[] for _ in range(5)]
    resumed = again.watch(Trainer(config(tmp_path / "b"), components=components(),
                                  progress=False))
    resumed.fit()
    assert again.steps[5:] == rec.steps[5:]
    assert_same_state(straight, resumed)


def test_same_config_same_initial_weights(tmp_path, toy_store):
    torch.manual_seed(123)  # the global RNG must not matter
    a = Trainer(tiny(tmp_path / "a", toy_store), components=components(), progress=False)
    torch.rand(5)
    b = Trainer(tiny(tmp_path / "b", toy_store), components=components(), progress=False)
    c = Trainer(tiny(tmp_path / "c", toy_store, seed=1), components=components(), progress=False)
    sa, sb, sc = a.backbone.state_dict(), b.backbone.state_dict(), c.backbone.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(not torch.equal(sa[n], sc[n]) for n in sa)


# -- checkpoint files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_store):
    """A 3-step run (checkpoint at step 3), as a template for the checkpoint tests."""
    run = tmp_path_factory.mktemp("trained")
    with torch_threads(1):
        tr = Trainer(tiny(run, toy_store, steps=3), components=components(), progress=False)
        tr.fit()
    return run, list(tr.losses)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst


def test_keep_last_n_and_temp_files_are_ignored(tmp_path):
    d = tmp_path / "ck"
    for step in range(1, 6):
        checkpoint.save({"format": 1, "step": step, "w": torch.full((2,), float(step))}, d, step,
                        keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(d)] == ["step-00000004.pt",
                                                                "step-00000005.pt"]
    for junk in (".step-00000009.pt.tmp-123", "step-00000010.pt.tmp-7", "step-11.pt",
                 "step-00000012.pt.partial", "notes.txt"):
        (d / junk).write_bytes(b"partial")
    assert [p.name for p in checkpoint.list_checkpoints(d)] == ["step-00000004.pt",
                                                                "step-00000005.pt"]
    assert checkpoint.latest(d).name == "step-00000005.pt"
    assert checkpoint.load(checkpoint.latest(d))["step"] == 5
    # saving again prunes checkpoints only, never foreign files
    checkpoint.save({"format": 1, "step": 6}, d, 6, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(d)] == ["step-00000005.pt",
                                                                "step-00000006.pt"]
    assert (d / ".step-00000009.pt.tmp-123").exists() and (d / "notes.txt").exists()
    assert checkpoint.latest(tmp_path / "missing") is None


def test_trainer_keeps_last_n(tmp_path, trained, toy_store):
    run = copy_run(trained[0], tmp_path / "run")
    tr = Trainer(tiny(run, toy_store, steps=6, checkpoint=CheckpointConfig(every=1, keep=2)),
                 components=components(), progress=False)
    tr.fit()
    assert ckpt_steps(run) == [5, 6]


class Exploit:
    def __init__(self, payload) -> None:
        self.payload = payload

    def __reduce__(self):
        return self.payload


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker_sh, marker_py = tmp_path / "pwned-sh", tmp_path / "pwned-py"
    payloads = {
        "system": (os.system, (f"touch {marker_sh}",)),
        "exec": (exec, (f"open({str(marker_py)!r}, 'w').close()",)),
    }
    for name, payload in payloads.items():
        path = tmp_path / name / "step-00000001.pt"
        path.parent.mkdir()
        torch.save({"format": 1, "step": 1, "model": {"w": torch.zeros(2)},
                    "evil": Exploit(payload)}, path)
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(path)
        assert str(path) in str(e.value)
        assert not marker_sh.exists() and not marker_py.exists()
    # the crafted file is a live exploit: an unsafe load would have run it
    torch.load(tmp_path / "exec" / "step-00000001.pt", weights_only=False)
    assert marker_py.exists()


def test_pickle_with_code_is_refused_on_resume(tmp_path, toy_store):
    marker = tmp_path / "pwned"
    path = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": 1, "evil": Exploit((exec, (f"open({str(marker)!r}, 'w').close()",)))},
               path)
    tr = Trainer(tiny(tmp_path / "run", toy_store), components=components(), progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="step-00000002.pt"):
        tr.fit()
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(tmp_path, trained, toy_store):
    run = copy_run(trained[0], tmp_path / "run")
    good = checkpoint.path_for(run / "checkpoints", 3)
    data = good.read_bytes()
    for size in (len(data) // 2, 10, 0):
        bad = checkpoint.path_for(run / "checkpoints", 4)
        bad.write_bytes(data[:size])
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(bad)
        assert str(bad) in str(e.value)
    tr = Trainer(tiny(run, toy_store), components=components(), progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="step-00000004.pt"):
        tr.fit()
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(run / "checkpoints" / "step-00000099.pt")
    not_ours = run / "checkpoints" / "step-00000005.pt"
    torch.save({"weights": torch.zeros(1)}, not_ours)
    with pytest.raises(checkpoint.CheckpointError, match="not a selfflow checkpoint"):
        checkpoint.load(not_ours)


def test_loader_state_of_another_setup_names_the_file(tmp_path, trained, toy_store):
    run = copy_run(trained[0], tmp_path / "run")
    path = checkpoint.path_for(run / "checkpoints", 3)
    state = checkpoint.load(path)
    state["loader"]["world_size"] = 4  # e.g. written by a 4-process run
    torch.save(state, path)
    tr = Trainer(tiny(run, toy_store), components=components(), progress=False)
    with pytest.raises(checkpoint.CheckpointError) as e:
        tr.fit()
    assert str(path) in str(e.value) and "world_size" in str(e.value)


def test_resume_with_other_config_names_the_key_and_steps_may_change(tmp_path, trained, toy_store):
    template, losses = trained
    run = copy_run(template, tmp_path / "run")
    before = checkpoint.path_for(run / "checkpoints", 3).read_bytes()
    with pytest.raises(checkpoint.CheckpointError) as e:  # refused on construction
        Trainer(tiny(run, toy_store, backbone=DiT.Config(depth=3, width=64, heads=4)),
                components=components(), progress=False)
    assert "backbone" in str(e.value) and "step-00000003.pt" in str(e.value)
    assert "steps" not in str(e.value).split("differs in:")[1]
    with pytest.raises(checkpoint.CheckpointError) as e:
        Trainer(tiny(run, toy_store, seed=5, label_dropout=0.5), components=components(),
                progress=False)
    assert "label_dropout" in str(e.value) and "seed" in str(e.value)
    assert checkpoint.path_for(run / "checkpoints", 3).read_bytes() == before
    assert ckpt_steps(run) == [3]

    longer = Trainer(tiny(run, toy_store, steps=5, log_every=2), components=components(),
                     progress=False)
    summary = longer.fit()
    assert summary["step"] == 5 and longer.losses[:3] == losses and len(longer.losses) == 5
    assert ckpt_steps(run) == [3, 5]


# -- SIGTERM in a real process ------------------------------------------------------------------

def cli_overrides(run_dir, store, steps):
    return [f"run_dir={run_dir}", f"modalities.toy.store={store}", 'modalities.toy.source=""',
            "modalities.toy.batch_size=8", "modalities.toy.modality.tokens=8",
            "modalities.toy.modality.channels=4", "modalities.toy.modality.count=64",
            "backbone.depth=3", "backbone.width=32", f"steps={steps}", "log_every=1",
            "checkpoint.every=1000", "sampling.count=4", "sampling.steps=2", "tracker.kind=none"]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path, toy_store, capsys, monkeypatch):
    cmd = [sys.executable, "-m", "selfflow_core.cli.main", "train", "toy",
           *cli_overrides(tmp_path / "a", toy_store, 100000)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step="):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        watchdog.cancel()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    stops = [ln for ln in out.splitlines() if "stopped by SIGTERM after step" in ln]
    assert stops, out
    k = int(stops[0].split("after step ")[1].split(";")[0])
    assert f"trained {k} steps (signal)" in out
    assert ckpt_steps(tmp_path / "a") == [k]
    assert checkpoint.load(checkpoint.path_for(tmp_path / "a" / "checkpoints", k))["step"] == k

    n = k + 2  # the toy schedule is constant after warm-up: `steps` does not change the math
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "toy", *cli_overrides(tmp_path / "a", toy_store, n)]) == 0
    assert f"resumed from {checkpoint.path_for(tmp_path / 'a' / 'checkpoints', k)}" in \
        capsys.readouterr().out
    assert cli_main(["train", "toy", *cli_overrides(tmp_path / "b", toy_store, n)]) == 0
    resumed = torch.load(checkpoint.path_for(tmp_path / "a" / "checkpoints", n),
                         weights_only=True)
    straight = torch.load(checkpoint.path_for(tmp_path / "b" / "checkpoints", n),
                          weights_only=True)
    assert resumed["step"] == straight["step"] == n
    for part in ("model", "head"):
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name}"
    assert resumed["losses"] == straight["losses"]


# -- non-finite losses --------------------------------------------------------------------------

class PoisonAt:
    """At the end of step ``step``, sets a parameter of ``where`` to NaN."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        if step == self.step:
            module = (trainer.backbone.outputs[0] if self.where == "flow"
                      else trainer.model.objective.head[-1])
            with torch.no_grad():
                module.weight.fill_(float("nan"))


@pytest.mark.parametrize("term", ["flow", "rep"])
def test_nonfinite_loss_stops_naming_step_and_term(tmp_path, toy_store, term):
    rec = Recorder()
    tr = Trainer(tiny(tmp_path, toy_store, checkpoint=CheckpointConfig(every=2, keep=3)),
                 components=components(PoisonAt(3, term), rec), progress=False)
    with pytest.raises(NonFiniteLossError) as e:
        tr.fit()
    message = str(e.value)
    assert "step 4" in message and f"{term}=nan" in message
    other = "rep" if term == "flow" else "flow"
    assert f"{other}=" not in message
    # found at the read-back before step 4's checkpoint: nothing of the NaN weights is written
    assert rec.of("end") == [(4, "error")]
    assert tr.step == 4 and ckpt_steps(tmp_path) == [2]
    (step, path, existed, digest), = rec.of("checkpoint")
    assert step == 2 and existed
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # untouched
    state = checkpoint.load(path)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in state["head"].values())


def poison(tr: Trainer, bad) -> list[int]:
    """Make the objective return a NaN flow term whenever ``bad(step, call)`` says so."""
    original, calls = tr.model.objective.forward, []

    def forward(*args, **kwargs):
        terms = original(*args, **kwargs)
        step = tr.step + 1
        if bad(step, len(calls)):
            calls.append(step)
            flow = terms.flow * float("nan")
            terms = attrs.evolve(terms, flow=flow, total=flow + terms.rep)
        return terms

    tr.model.objective.forward = forward
    return calls


def test_skip_mode_skips_batches_then_raises(tmp_path, toy_store):
    cfg = tiny(tmp_path / "a", toy_store, steps=5, on_nonfinite="skip", max_skipped=2)
    tr = Trainer(cfg, components=components(), progress=False)
    calls = poison(tr, lambda step, n: step == 3 and n < 2)  # two bad batches at step 3
    summary = tr.fit()
    assert calls == [3, 3]
    assert summary["step"] == 5 and tr.skipped == 2
    assert len(tr.losses) == 5 and all(math.isfinite(x) for x in tr.losses)
    assert tr.loader.state_dict()["step"] == 5 + 2  # the bad batches were dropped, not retried
    assert all(torch.isfinite(v).all() for v in tr.backbone.state_dict().values())
    assert checkpoint.load(checkpoint.latest(tmp_path / "a" / "checkpoints"))["skipped"] == 2

    tr = Trainer(attrs.evolve(cfg, run_dir=str(tmp_path / "b")), components=components(),
                 progress=False)
    calls = poison(tr, lambda step, n: step >= 3)
    with pytest.raises(NonFiniteLossError, match=r"step 3: flow=nan") as e:
        tr.fit()
    assert calls == [3, 3, 3] and tr.skipped == 2 and tr.step == 2
    assert "rep=" not in str(e.value)


def test_a_skipped_step_drops_all_its_micro_batches(tmp_path, toy_store):
    """With grad_accum=3, a non-finite first micro-batch drops the step's other two as well, so
    the next step starts a modality group of its own (one modality per optimizer step)."""
    base = tiny(tmp_path, toy_store, grad_accum=3, steps=5, on_nonfinite="skip")
    spec = attrs.evolve(base.modalities["toy"], batch_size=6)
    cfg = attrs.evolve(base, modalities={"a": spec, "b": spec})
    rec = MicroBatches()
    tr = rec.watch(Trainer(cfg, components=components(), progress=False))
    calls = poison(tr, lambda step, n: step == 3 and n < 1)
    tr.fit()
    assert calls == [3] and tr.skipped == 1 and tr.step == 5
    assert tr.loader.state_dict()["step"] == 3 * (5 + 1)
    assert len(rec.steps[2]) == 1 + 3  # the bad micro-batch, then the step again
    assert all(len(set(step[-3:])) == 1 for step in rec.steps), rec.steps


@attrs.frozen
class OtherRankNaN(Dist):
    """One process standing in for rank 0 of a group whose other rank gets one NaN loss at step
    3: the all-reduce behind ``Dist.any`` reports it while this rank's own loss is finite."""

    fired: list = attrs.Factory(list)

    def any(self, flag: bool) -> bool:  # on_nonfinite="skip": the per-step check
        caller = sys._getframe(1)
        if caller.f_code.co_name == "_finite" and caller.f_locals["step"] == 3 and not self.fired:
            self.fired.append(3)
            return True
        return flag

    def mean(self, values):  # on_nonfinite="stop": the read-back of the pending step losses
        caller = sys._getframe(1)
        if caller.f_code.co_name == "flush" and not self.fired:
            steps = [s for s, *_ in caller.f_locals["self"]._pending] or caller.f_locals["steps"]
            if 3 in steps:
                self.fired.append(3)
                values = values.clone()
                values[steps.index(3), 0] = float("nan")  # the mean with the other rank's NaN
        return values


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_on_another_rank_is_acted_on_by_every_rank(tmp_path, toy_store, mode):
    tr = Trainer(tiny(tmp_path, toy_store, steps=4, on_nonfinite=mode), components=components(),
                 dist=OtherRankNaN(), progress=False)
    if mode == "stop":
        with pytest.raises(NonFiniteLossError, match="step 3: on another rank"):
            tr.fit()
        assert tr.step == 3  # found at the read-back before step 3's checkpoint (none written)
    else:
        assert tr.fit()["step"] == 4 and tr.skipped == 1


# -- DDP ----------------------------------------------------------------------------------------

DDP_DRIVER = textwrap.dedent("""
    import importlib, json, os, sys
    import torch
    from selfflow_core.runtime import checkpoint
    from selfflow_core.cli.main import resolve_config
    from selfflow_core.plugins.manager import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    out, runs, plugins = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    saves = []
    real_save = checkpoint.save
    def save(state, directory, step, *, keep):
        saves.append(step)
        return real_save(state, directory, step, keep=keep)
    checkpoint.save = save
    components = Components(make_plugin_manager([importlib.import_module(p) for p in plugins],
                                                 entry_points=False))
    for method, overrides in runs.items():  # one launch for every method: one start-up
        saves.clear()
        try:
            tr = Trainer(resolve_config(components, "toy", overrides), components=components,
                         progress=False)
            summary = tr.fit()
            # a second trainer in the same group resumes every rank from rank 0's checkpoint
            more = Trainer(resolve_config(components, "toy", overrides + ["steps=6"]),
                           components=components, progress=False)
            more_summary = more.fit()
            info = {"world": tr.dist.world_size, "rank": tr.dist.rank, "saves": list(saves),
                    "ddp": type(tr.trained).__name__, "step": summary["step"],
                    "rows": tr.loader.sources[0].batch_size, "losses": more.losses,
                    "resumed_step": more_summary["step"]}
        except Exception as exc:  # recorded, and the next method runs (every rank fails alike)
            info = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        with open(os.path.join(out, f"{method}-rank{rank}.json"), "w") as f:
            json.dump(info, f)
""")

#: the four methods as overrides of the toy preset (each scheduler named: no default assumed)
DDP_METHODS = {
    "vanilla": ["teacher.kind=none", "modalities.toy.scheduler.kind=single"],
    "dts": ["teacher.kind=none", "modalities.toy.scheduler.kind=dual"],
    "selfflow": ["teacher.kind=ema", "modalities.toy.scheduler.kind=dual"],
    "repa": ["modalities.toy.scheduler.kind=single", "objective.gamma=0.5"],  # + the encoder
}
DDP_EXTRA = ["checkpoint.every=2", "checkpoint.keep=3", "label_dropout=0.5"]


def method_overrides(method: str, root: Path) -> list[str]:
    extra = ([f'teacher={{kind="repa", encoder="{root / "encoder.pt"}", feature_dim=6}}']
             if method == "repa" else [])
    return extra + DDP_METHODS[method]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, toy_store):
    """Every method of :data:`DDP_METHODS` trained by one 2-process gloo launch: 4 steps, then
    a second trainer resuming every rank from rank 0's step-4 checkpoint to step 6. REPA only
    with ``selfflow-repa`` installed (its encoder: a tiny TorchScript file)."""
    root = tmp_path_factory.mktemp("ddp")
    methods, plugins = [m for m in DDP_METHODS if m != "repa"], []
    try:
        from selfflow_repa import save_encoder
    except ImportError:
        save_encoder = None
    if save_encoder is not None:
        torch.manual_seed(0)
        save_encoder(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()),
                     root / "encoder.pt")
        methods, plugins = [*methods, "repa"], ["selfflow_repa.plugin"]
    runs = {m: cli_overrides(root / m, toy_store, 4) + DDP_EXTRA + method_overrides(m, root)
            for m in methods}
    driver = root / "driver.py"
    driver.write_text(DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(root), json.dumps({m: list(map(str, o)) for m, o in runs.items()}),
           json.dumps(plugins)]
    proc = subprocess.run(cmd, cwd=root, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=400)
    return root, plugins, proc


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DDP_METHODS))
def test_ddp_two_processes_match_one(ddp_runs, method, tmp_path, toy_store):
    root, plugins, proc = ddp_runs
    if method == "repa" and not plugins:
        pytest.skip("selfflow-repa is not installed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((root / f"{method}-rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert "error" not in info, f"{method} under DDP, rank {r}: {info['error']}"
        assert (info["world"], info["rank"], info["ddp"], info["step"], info["rows"],
                info["resumed_step"]) == (2, r, "DistributedDataParallel", 4, 4, 6)
    assert ranks[0]["saves"] == [2, 4, 6] and ranks[1]["saves"] == []
    assert ckpt_steps(root / method) == [2, 4, 6]

    comps = components(*[importlib.import_module(p) for p in plugins])
    one = Trainer(resolve_config(comps, "toy", cli_overrides(tmp_path / "one", toy_store, 6)
                                 + DDP_EXTRA + method_overrides(method, root)),
                  components=comps, progress=False)
    one.fit()
    for step in (4, 6):  # 4: straight DDP; 6: after every rank resumed from rank 0's file
        ddp = torch.load(checkpoint.path_for(root / method / "checkpoints", step),
                         weights_only=True)
        ref = torch.load(checkpoint.path_for(tmp_path / "one" / "checkpoints", step),
                         weights_only=True)
        parts = {"model": ref["model"], "head": ref["head"],
                 "teacher": ref["teacher"].get("model", {}),
                 "eval_ema": ref["eval_ema"].get("model", {})}
        assert bool(parts["head"]) == (method in ("selfflow", "repa"))  # a head only if used
        assert parts["eval_ema"], "every method keeps an evaluation EMA"
        for part, tensors in parts.items():
            got = ddp[part] if part in ("model", "head") else ddp[part].get("model", {})
            assert got.keys() == tensors.keys()
            for name, value in tensors.items():
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, step=step, part=part, name=name:
                                           f"{method} step {step} {part}.{name}: {m}")
    # logged losses are of the global batch: equal on both ranks and to the 1-process run's
    assert ranks[0]["losses"] == ranks[1]["losses"] == ddp["losses"]
    assert ddp["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)


# -- which weights samples come from -----------------------------------------------------------

def method_changes(method: str, store: str) -> dict:
    """``tiny``'s changes for each method (the toy preset is Self-Flow with dual timesteps)."""
    if method in ("selfflow", "gamma0"):
        return {} if method == "selfflow" else {"objective": ObjectiveConfig(gamma=0.0)}
    spec = attrs.evolve(tiny("-", store).modalities["toy"],
                        scheduler=SingleTimestep.Config() if method == "vanilla"
                        else DualTimestep.Config())
    return {"teacher": NoTeacher.Config(), "modalities": {"toy": spec}}


@pytest.mark.parametrize("method", ["vanilla", "dts", "gamma0", "selfflow"])
def test_a_projection_head_only_where_a_representation_loss_is_computed(tmp_path, toy_store,
                                                                       method):
    changes = method_changes(method, toy_store)
    tr = Trainer(tiny(tmp_path, toy_store, steps=3, **changes), components=components(),
                 progress=False)
    head = tr.model.objective.head
    assert (head is None) == (method != "selfflow")
    optimized = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in tr.model.parameters()}  # nothing idle in DDP's graph
    tr.fit()
    state = checkpoint.load(checkpoint.path_for(tmp_path / "checkpoints", 3))
    assert (state["head"] == {}) == (method != "selfflow")
    more = Trainer(tiny(tmp_path, toy_store, steps=4, **changes), components=components(),
                   progress=False)
    assert more.fit()["start_step"] == 3


def test_older_checkpoints_resume_without_their_unused_head_or_an_eval_ema(tmp_path, toy_store,
                                                                           monkeypatch):
    """A vanilla checkpoint written when such runs built an unused head and kept no evaluation
    EMA: it resumes, the head dropped, the evaluation EMA started from the resumed student, and
    trains on exactly as a run of today's code."""
    changes = method_changes("vanilla", toy_store)
    with monkeypatch.context() as m:  # as before: a head whatever the objective
        m.setattr(assembly, "uses_representation", lambda *a: True)
        old = Trainer(tiny(tmp_path / "old", toy_store, steps=3, eval_ema_decay=None,
                           **changes), components=components(), progress=False)
        assert old.model.objective.head is not None and old.eval_ema is None
        old.fit()
    state = checkpoint.load(checkpoint.path_for(tmp_path / "old" / "checkpoints", 3))
    assert state["head"] and state["eval_ema"] == {}
    # a config from before eval_ema_warmup existed (and with the old default, null)
    config = json.loads(state["config"])
    del config["eval_ema_warmup"]
    state["config"] = json.dumps(config, sort_keys=True)
    torch.save(state, checkpoint.path_for(tmp_path / "old" / "checkpoints", 3))

    resumed = Trainer(tiny(tmp_path / "old", toy_store, steps=5, **changes),
                      components=components(), progress=False)
    assert resumed.fit()["start_step"] == 3 and resumed.eval_ema.updates == 2
    # the same with today's code: 3 steps (a 3-step cosine schedule), resumed to 5
    Trainer(tiny(tmp_path / "new", toy_store, steps=3, eval_ema_decay=None, **changes),
            components=components(), progress=False).fit()
    today = Trainer(tiny(tmp_path / "new", toy_store, steps=5, **changes),
                    components=components(), progress=False)
    today.fit()
    assert resumed.losses == today.losses and resumed.eval_ema.updates == today.eval_ema.updates
    for a, b in [(resumed.backbone, today.backbone),
                 (resumed.eval_ema.model, today.eval_ema.model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = resumed.optimizer.state_dict(), today.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k])
               for i in oa["state"] for k in oa["state"][i])


@pytest.mark.parametrize("method", ["vanilla", "selfflow"])
def test_every_method_samples_from_its_evaluation_ema(tmp_path, toy_store, method):
    changes = method_changes(method, toy_store)
    # decay 0.5 without warm-up: another average than the EMA teacher's (0.99 with warm-up)
    tr = Trainer(tiny(tmp_path, toy_store, steps=3, eval_ema_decay=0.5, eval_ema_warmup=False,
                      **changes), components=components(), progress=False)
    summary = tr.fit()
    assert tr.eval_weights() == "eval_ema" and tr.eval_model() is tr.eval_ema.model
    ema = tr.eval_ema.model.state_dict()
    student = tr.backbone.state_dict()
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # not the raw student
    if method == "selfflow":
        teacher = tr.teacher.model.state_dict()
        assert any(not torch.equal(ema[k], teacher[k]) for k in ema)  # nor the teacher
    folder = Path(summary["samples_dir"])
    info = json.loads((folder / "sample_info.json").read_text())
    assert info == {"weights": "eval_ema", "decay": 0.5, "warmup": False, "updates": 3,
                    "step": 3, "method": method, "checkpoint": None,
                    "sampling": to_data(make_converter(), tr.config.sampling)}

    # `selfflow sample` / load_for_sampling: the same weights, so the same samples
    config, _, model = load_for_sampling(tmp_path, components())
    loaded = model.state_dict()
    assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], ema[k]) for k in ema)
    result = sample_run(tmp_path, components(), out_dir=tmp_path / "again")
    assert result.weights == "evaluation EMA" and result.info["weights"] == "eval_ema"
    again = json.loads((tmp_path / "again" / "sample_info.json").read_text())
    assert again == {**info, "checkpoint": str(checkpoint.path_for(tmp_path / "checkpoints", 3))}
    assert np.array_equal(np.load(tmp_path / "again" / "toy" / "samples.npy"),
                          np.load(folder / "toy" / "samples.npy"))


def test_the_evaluation_ema_is_on_by_default_with_warm_up():
    config = TrainerConfig(modalities=toy().modalities)
    assert (config.eval_ema_decay, config.eval_ema_warmup) == (0.9999, True)
    data = to_data(make_converter(), config)
    old = {k: v for k, v in data.items() if k != "eval_ema_warmup"}  # a config of before
    assert structure(make_converter(Components()), old, TrainerConfig) == config


# -- hooks and label dropout --------------------------------------------------------------------

def test_hooks_observe_the_run(tmp_path, toy_store):
    rec = Recorder()
    summary = Trainer(tiny(tmp_path, toy_store, steps=4,
                           checkpoint=CheckpointConfig(every=2, keep=3)),
                      components=Components(make_plugin_manager([rec], entry_points=False)),
                      progress=False).fit()
    assert summary["reason"] == "done"
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert rec.of("start") == [(0,)]
    assert [s[0] for s in rec.of("step")] == [1, 2, 3, 4]
    assert all(math.isfinite(s[1]) for s in rec.of("step"))
    assert [(c[0], c[2]) for c in rec.of("checkpoint")] == [(2, True), (4, True)]
    assert [c[1] for c in rec.of("checkpoint")] == [
        checkpoint.path_for(tmp_path / "checkpoints", s) for s in (2, 4)]
    assert rec.of("end") == [(4, "done")]
    # each checkpoint hook comes after its step's step hook
    assert kinds.index("checkpoint") == kinds.index("step") + 2


@pytest.mark.parametrize("dropout", [1.0, 0.0])
def test_label_dropout(tmp_path, toy_store, dropout):
    tr = Trainer(tiny(tmp_path, toy_store, label_dropout=dropout), components=components(),
                 progress=False)
    seen, data = [], []
    forward = tr.backbone.forward
    tokenize = tr.loader.sources[0].tokenize

    def record(x, t, batch, **kwargs):
        seen.append(batch.labels.clone())
        return forward(x, t, batch, **kwargs)

    tr.backbone.forward = record
    loader_sources = tr.loader.sources
    loader_sources[0] = attrs.evolve(
        loader_sources[0], tokenize=lambda f: (data.append(f["labels"].clone()), tokenize(f))[1])
    tr.batches = iter(tr.loader)
    for _ in range(3):
        tr.train_step()
    assert len(seen) == 3 and len(data) >= 3
    labels = torch.cat(seen)
    assert labels.shape == (24,)
    if dropout == 1.0:
        assert (labels == NULL_CLASS).all()
    else:
        assert (labels < NULL_CLASS).all()
        assert torch.equal(labels, torch.cat(data[:3]))


def test_diagnostics_are_logged_and_leave_training_unchanged(tmp_path, toy_store):
    from selfflow_core.builtin.trackers import JsonlTracker
    from selfflow_core.config.run import DiagnosticsConfig

    plain = Trainer(tiny(tmp_path / "plain", toy_store, steps=4), progress=False)
    plain.fit()
    cfg = tiny(tmp_path / "diag", toy_store, steps=4, tracker=JsonlTracker.Config(),
               diagnostics=DiagnosticsConfig(every=2, samples=32, t=0.25, timestep_buckets=2))
    diag = Trainer(cfg, progress=False)
    diag.fit()
    assert diag.losses == plain.losses  # they only read the model
    assert torch.equal(torch.nn.utils.parameters_to_vector(diag.backbone.parameters()),
                       torch.nn.utils.parameters_to_vector(plain.backbone.parameters()))
    rows = [json.loads(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text()
            .splitlines()]
    logged = {r["step"]: r for r in rows if any(k.startswith("diag/") for k in r)}
    assert sorted(logged) == [2, 4]
    final = logged[4]
    for i in (1, 2, 3):
        assert 0 <= final[f"diag/toy/probe_acc/layer{i}"] <= 1
        assert final[f"diag/toy/erank/layer{i}"] > 1
    assert {"diag/toy/flow_t/0.0-0.5", "diag/toy/flow_t/0.5-1.0"} <= set(final)
    # the same numbers as the offline functions on the same fixed set
    from selfflow_core.data.store import open_store
    from selfflow_core.eval.diagnostics import probe_layers, stored_batch

    batch = stored_batch(open_store(toy_store), TOY.build(), 32)
    assert batch.tokens.shape[0] == 32
    offline = probe_layers(diag.backbone, batch, t=0.25)
    assert final["diag/toy/probe_acc/layer2"] == pytest.approx(offline["probe_acc/layer2"])


def test_diagnostics_config_errors_name_the_field():
    from selfflow_core.config.converter import ConfigError, apply_overrides, structure
    from selfflow_core.config.run import TrainerConfig

    conv = make_converter(Components(make_plugin_manager([], entry_points=False)))
    data = to_data(conv, toy())
    cfg = structure(conv, apply_overrides(data, ["diagnostics.every=50"]), TrainerConfig)
    assert cfg.diagnostics.every == 50 and cfg.diagnostics.samples == 512
    with pytest.raises(ConfigError, match=r"diagnostics\.samples"):
        structure(conv, apply_overrides(data, ["diagnostics.samples=1"]), TrainerConfig)


def test_two_trainers_on_one_run_dir_are_refused(tmp_path, toy_store):
    from selfflow_core.runtime.guard import RunDirInUse

    run = tmp_path / "run"
    run.mkdir()
    lock = run / "train.lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{alive.pid} {__import__('socket').gethostname()}\n")
        tr = Trainer(tiny(run, toy_store, steps=2), progress=False)
        with pytest.raises(RunDirInUse, match=f"pid {alive.pid}.*delete .*train.lock"):
            tr.fit()
        assert tr.step == 0 and not (run / "checkpoints").exists()  # nothing was touched
        assert lock.read_text().split()[0] == str(alive.pid)
    finally:
        alive.kill()
        alive.wait()
    # the holder is gone (killed): its stale lock is taken over, and released at the end
    assert Trainer(tiny(run, toy_store, steps=2), progress=False).fit()["step"] == 2
    assert not lock.exists()
