"""Scale options: FSDP2 over 2 gloo processes against one process and across a restart, the
sharded checkpoint format, activation checkpointing, ``torch.compile``, padding masks and the
teacher's no-grad forward. CPU, one thread per process (the machine is shared). The 2-process DDP
run is tested in test_trainer.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.config.run import CheckpointConfig
from selfflow_core.runtime import checkpoint
from selfflow_core.runtime.checkpoint import dcp as sharded
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`
from selfflow_core.trainer import Trainer
from selfflow_core.types import TokenBatch

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(run_dir, store, **changes):
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, store=store, source="",
                        batch_size=8)
    cfg = attrs.evolve(
        base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32, heads=4),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        sampling=attrs.evolve(base.sampling, count=4, steps=2),
        tracker=NullTracker.Config(), steps=2, run_dir=str(run_dir), log_every=1)
    return attrs.evolve(cfg, **changes)


def overrides(run_dir, store, steps, *extra):
    return [f"run_dir={run_dir}", f"modalities.toy.store={store}", 'modalities.toy.source=""',
            "modalities.toy.batch_size=8", "modalities.toy.modality.tokens=8",
            "modalities.toy.modality.channels=4", "modalities.toy.modality.count=64",
            "backbone.depth=3", "backbone.width=32", f"steps={steps}", "log_every=1",
            "checkpoint.every=2", "checkpoint.keep=3", "sampling.count=4", "sampling.steps=2",
            "tracker.kind=none", "label_dropout=0.5", *extra]


def steps_of(run_dir) -> list[tuple[int, str]]:
    return [(int(p.name[5:13]), p.suffix)
            for p in checkpoint.list_checkpoints(Path(run_dir) / "checkpoints")]


def tensors(state, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint state, by path."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(tensors(v, f"{prefix}{k}/"))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


# -- FSDP2: 2 processes = 1 process, exact resume across a restart ---------------------------------

FSDP_DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    from selfflow_core.cli.main import resolve_config
    from selfflow_core.plugins.hookspecs import hookimpl
    from selfflow_core.plugins.manager import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    class Start:
        step = None
        @hookimpl
        def selfflow_on_train_start(self, trainer):
            self.step = trainer.step

    out, runs = sys.argv[1], json.loads(sys.argv[2])
    info = {}
    for name, overrides in runs.items():
        start = Start()
        components = Components(make_plugin_manager([start], entry_points=False))
        tr = Trainer(resolve_config(components, "toy", overrides), components=components,
                     progress=False)
        summary = tr.fit()
        def share(module):  # this rank's share of the module's parameters
            ps = list(module.parameters())
            return sum(p.to_local().numel() for p in ps) / sum(p.numel() for p in ps)
        info[name] = {"world": tr.dist.world_size, "trained": type(tr.trained).__name__,
                      "teacher": type(tr.teacher.model).__name__,
                      "student_share": share(tr.model), "teacher_share": share(tr.teacher.model),
                      "start": start.step, "step": summary["step"], "losses": tr.losses}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(info, f)
""")


def torchrun(tmp_path, runs: dict) -> list[dict]:
    driver = tmp_path / "fsdp_driver.py"
    driver.write_text(FSDP_DRIVER)
    for r in (0, 1):
        (tmp_path / f"rank{r}.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(tmp_path), json.dumps(runs)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_exactly(tmp_path, toy_store, core_components):
    # "a": 6 steps straight; "b": a new torchrun (a restart) from a's step-4 checkpoint to step 6.
    # With gradient accumulation, an evaluation EMA (sharded too) and activation checkpointing,
    # which must compose with FSDP2 and change no number.
    fsdp = ["parallel=fsdp", "activation_checkpointing=true", "grad_accum=2",
            "eval_ema_decay=0.9"]
    for rank in torchrun(tmp_path, {"a": overrides(tmp_path / "a", toy_store, 6, *fsdp)}):
        a = rank["a"]
        assert (a["world"], a["trained"], a["teacher"]) == (2, "FSDPStudentWithHead", "FSDPDiT")
        # every parameter sharded, the EMA teacher alike: a rank holds about half of each
        assert 0.4 < a["student_share"] < 0.6 and 0.4 < a["teacher_share"] < 0.6
        assert (a["start"], a["step"]) == (0, 6)
    assert steps_of(tmp_path / "a") == [(2, ".dcp"), (4, ".dcp"), (6, ".dcp")]
    assert not list((tmp_path / "a" / "checkpoints").glob(".*tmp*"))

    name = checkpoint.path_for(tmp_path / "a" / "checkpoints", 4, sharded=True).name
    shutil.copytree(tmp_path / "a" / "checkpoints" / name, tmp_path / "b" / "checkpoints" / name)
    ranks = torchrun(tmp_path, {"b": overrides(tmp_path / "b", toy_store, 6, *fsdp)})
    assert [r["b"]["start"] for r in ranks] == [4, 4] and ranks[0]["b"]["step"] == 6
    assert ranks[0]["b"]["losses"] == ranks[1]["b"]["losses"]
    assert steps_of(tmp_path / "b") == [(4, ".dcp"), (6, ".dcp")]

    # read in full by one process without a process group (as sampling from the run would)
    a6 = checkpoint.load(checkpoint.path_for(tmp_path / "a" / "checkpoints", 6, sharded=True))
    b6 = checkpoint.load(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    ta, tb = tensors(a6), tensors(b6)
    assert ta.keys() == tb.keys() and any(k.endswith("exp_avg_sq") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"differ after resume: {differ[:10]}"
    assert a6["losses"] == b6["losses"] == ranks[0]["b"]["losses"]
    assert a6["loader"] == b6["loader"] and a6["teacher"]["updates"] == 6

    one = Trainer(attrs.evolve(tiny(tmp_path / "one", toy_store), steps=6, label_dropout=0.5,
                               grad_accum=2, eval_ema_decay=0.9,
                               checkpoint=CheckpointConfig(every=2, keep=3)),
                  components=core_components, progress=False)
    one.fit()
    for step in (4, 6):
        f = checkpoint.load(checkpoint.path_for(tmp_path / "a" / "checkpoints", step, sharded=True))
        o = checkpoint.load(checkpoint.path_for(tmp_path / "one" / "checkpoints", step))
        for part in ("model", "head"):
            for name, value in o[part].items():
                torch.testing.assert_close(f[part][name], value, atol=1e-5, rtol=1e-4,
                                           msg=f"step {step} {part}.{name}")
        for ema in ("teacher", "eval_ema"):
            for name, value in o[ema]["model"].items():
                torch.testing.assert_close(f[ema]["model"][name], value, atol=1e-5, rtol=1e-4,
                                           msg=f"step {step} {ema}.{name}")
    assert a6["losses"] == pytest.approx(one.losses, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_fsdp_resume_with_the_evaluation_ema_switched_off_or_on(tmp_path, toy_store):
    """An evaluation EMA may be switched off or added on resume (RESUMABLE_CHANGES), under FSDP2
    too: "off" resumes a checkpoint holding sharded eval-EMA tensors without them; "on" resumes a
    checkpoint without any and restarts the EMA from the (sharded) student."""
    fsdp = ["parallel=fsdp"]
    torchrun(tmp_path, {"with": overrides(tmp_path / "with", toy_store, 2, *fsdp,
                                          "eval_ema_decay=0.9"),
                        "without": overrides(tmp_path / "without", toy_store, 2, *fsdp,
                                             "eval_ema_decay=null")})
    assert checkpoint.load(checkpoint.latest(tmp_path / "with" / "checkpoints"))["eval_ema"]
    assert not checkpoint.load(checkpoint.latest(tmp_path / "without" / "checkpoints")
                               )["eval_ema"]
    ranks = torchrun(tmp_path, {
        "with": overrides(tmp_path / "with", toy_store, 4, *fsdp, "eval_ema_decay=null"),
        "without": overrides(tmp_path / "without", toy_store, 4, *fsdp, "eval_ema_decay=0.9")})
    for name in ("with", "without"):
        assert [(r[name]["start"], r[name]["step"]) for r in ranks] == [(2, 4), (2, 4)]
    off = checkpoint.load(checkpoint.latest(tmp_path / "with" / "checkpoints"))
    on = checkpoint.load(checkpoint.latest(tmp_path / "without" / "checkpoints"))
    assert not off["eval_ema"] and on["eval_ema"]["updates"] == 2  # restarted at step 2


# -- the sharded checkpoint format -----------------------------------------------------------------

def write_sharded(path: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    """A sharded checkpoint as one process writes it (DCP without a process group)."""
    import torch.distributed.checkpoint as dcp

    meta = {"format": 1, "step": step, "model": {},
            "sharded": [["model", name] for name in tensors]}
    dcp.save({f"model/{k}": v for k, v in tensors.items()},
             storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    torch.save(meta, path / "meta.pt")


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:.*single process:UserWarning")
def test_sharded_checkpoints_list_load_prune_and_refuse_code(tmp_path):
    d = tmp_path / "checkpoints"
    weights = {"blocks.0.w": torch.randn(3, 4), "b": torch.arange(5.0)}
    for step in (1, 2):
        write_sharded(checkpoint.path_for(d, step, sharded=True), step, weights)
    (d / ".step-00000003.dcp.tmp").mkdir()  # a save that did not finish
    (d / "step-00000004.dcp").mkdir()  # no meta.pt: not a checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(d)] == ["step-00000001.dcp",
                                                                "step-00000002.dcp"]
    state = checkpoint.load(checkpoint.latest(d))
    assert state["step"] == 2 and "sharded" not in state
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
    assert checkpoint.load_meta(checkpoint.latest(d))["model"] == {}
    checkpoint.save({"format": 1, "step": 5}, d, 5, keep=2)  # mixed kinds prune together
    assert [p.name for p in checkpoint.list_checkpoints(d)] == ["step-00000002.dcp",
                                                                "step-00000005.pt"]
    assert not (d / "step-00000001.dcp").exists()

    marker = tmp_path / "pwned"
    path = checkpoint.path_for(d, 2, sharded=True)
    (path / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="step-00000002.dcp.*not allowed"):
        checkpoint.load(path)
    assert not marker.exists()

    # DCP would read a non-tensor item with torch.load(weights_only=False): refused
    import torch.distributed.checkpoint as dcp

    other = tmp_path / "other.dcp"
    dcp.save({"model/w": torch.zeros(2), "model/obj": {"x": 1}},
             storage_writer=dcp.FileSystemWriter(other), no_dist=True)
    torch.save({"format": 1, "step": 1, "sharded": [["model", "w"]]}, other / "meta.pt")
    with pytest.raises(checkpoint.CheckpointError, match="other.dcp.*BytesStorageMetadata"):
        checkpoint.load(other)


def test_split_and_insert_round_trip():
    class Fake(torch.Tensor):  # a tensor with to_local, as DTensor has
        def to_local(self):
            return self

    w = torch.ones(2).as_subclass(Fake)
    state = {"step": 3, "model": {"a.w": w, "a.b": torch.zeros(1)},
             "optimizer": {"state": {"a.w": {"exp_avg": w, "step": torch.tensor(3.0)}}}}
    rest, shards = sharded.split(state)
    assert set(shards) == {"model/a.w", "optimizer/state/a.w/exp_avg"}
    assert rest["sharded"] == [["model", "a.w"], ["optimizer", "state", "a.w", "exp_avg"]]
    assert "a.w" not in rest["model"] and "exp_avg" not in rest["optimizer"]["state"]["a.w"]
    back = sharded._insert(rest, shards)
    assert back["model"]["a.w"] is w and back["optimizer"]["state"]["a.w"]["exp_avg"] is w


# -- activation checkpointing, compile, state-dict names -------------------------------------------

def first_step(tr: Trainer):
    """One training step; the loss and every gradient (left in place by train_step)."""
    terms = tr.train_step()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    return float(terms.total.detach()), grads


def count_block_forwards(tr: Trainer) -> list[int]:
    calls = [0] * len(tr.backbone.blocks)
    for i, block in enumerate(tr.backbone.blocks):
        inner = block._forward

        def counted(*args, _i=i, _inner=inner):
            calls[_i] += 1
            return _inner(*args)

        block._forward = counted
    return calls


def test_activation_checkpointing_same_loss_and_grads(tmp_path, toy_store, core_components):
    plain = Trainer(tiny(tmp_path / "a", toy_store), components=core_components, progress=False)
    ac = Trainer(tiny(tmp_path / "b", toy_store, activation_checkpointing=True),
                 components=core_components, progress=False)
    assert all(b.activation_checkpointing for b in ac.backbone.blocks)
    assert not any(b.activation_checkpointing for b in ac.teacher.model.blocks)  # no grad there
    calls_plain, calls_ac = count_block_forwards(plain), count_block_forwards(ac)
    loss_plain, grads_plain = first_step(plain)
    loss_ac, grads_ac = first_step(ac)
    assert calls_plain == [1, 1, 1] and calls_ac == [2, 2, 2]  # recomputed in the backward
    assert loss_ac == pytest.approx(loss_plain, rel=1e-6)
    assert grads_plain.keys() == grads_ac.keys() and len(grads_plain) > 10
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ac[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # only while training: eval mode runs each block once
    ac.model.eval()
    calls_ac[:] = [0, 0, 0]
    x = torch.randn(2, 8, 4)
    ac.backbone(x, torch.rand(2), TokenBatch.single(x, positions=torch.arange(8)[None, :, None]
                                                    .expand(2, 8, 1)))
    assert calls_ac == [1, 1, 1]


def test_state_dict_names_do_not_depend_on_compile_or_checkpointing(tmp_path, toy_store,
                                                                     core_components):
    plain = Trainer(tiny(tmp_path / "a", toy_store), components=core_components, progress=False)
    other = Trainer(tiny(tmp_path / "b", toy_store, compile=True, activation_checkpointing=True),
                    components=core_components, progress=False)
    sp, so = plain.state_dict(), other.state_dict()
    for part in ("model", "head"):
        assert list(sp[part]) == list(so[part])
        assert all(torch.equal(sp[part][k], so[part][k]) for k in sp[part])
    assert list(sp["teacher"]["model"]) == list(so["teacher"]["model"]) == list(sp["model"])
    assert not [k for k in so["model"] if "_orig_mod" in k or "checkpoint" in k]
    assert sp["optimizer"]["param_groups"] == so["optimizer"]["param_groups"]


def inductor_available() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except ImportError:
        return False
    return any(shutil.which(c) for c in ("gcc", "cc", "g++", "clang"))


@pytest.mark.slow
@pytest.mark.skipif(not inductor_available(), reason="torch inductor or a C compiler unavailable")
def test_compile_same_loss_as_eager(tmp_path, toy_store, monkeypatch, core_components):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool
    # inductor's C++ build imports distutils; once another test imported the stdlib copy,
    # setuptools' override would assert: keep the stdlib one for this process
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    eager = Trainer(tiny(tmp_path / "a", toy_store), components=core_components, progress=False)
    compiled = Trainer(tiny(tmp_path / "b", toy_store, compile=True), components=core_components,
                       progress=False)
    losses_e = [float(eager.train_step().total.detach())]  # one step: one compile (fwd + bwd)
    try:
        losses_c = [float(compiled.train_step().total.detach())]
    except Exception as exc:  # no working toolchain after all
        if "compil" in str(exc).lower() and ("gcc" in str(exc) or "cc" in str(exc)):
            pytest.skip(f"inductor cannot build here: {str(exc)[:200]}")
        raise
    assert losses_c == pytest.approx(losses_e, rel=1e-4, abs=1e-5)
    for (name, p), q in zip(eager.backbone.state_dict().items(),
                            compiled.backbone.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


# -- padding masks, the teacher's forward ----------------------------------------------------------

def test_padding_gives_the_same_outputs_on_valid_tokens():
    torch.manual_seed(0)
    model = DiT(DiT.Config(depth=3, width=32, heads=4), token_dims=[4], num_classes=3).eval()
    for blk in model.blocks:  # adaLN-Zero starts every block as the identity: wake them up
        torch.nn.init.normal_(blk.ada[-1].weight, std=0.2)
    torch.nn.init.normal_(model.final_ada[-1].weight, std=0.2)
    torch.nn.init.normal_(model.outputs[0].weight, std=0.2)
    lengths, n = [5, 8], 12  # a variable-length batch padded to 12 tokens
    xs = [torch.randn(length, 4) for length in lengths]
    ts = [torch.rand(length) for length in lengths]
    labels = torch.tensor([0, 2])

    def batch_of(rows, width):
        x = torch.randn(len(rows), width, 4) * 100  # padding holds garbage
        t = torch.rand(len(rows), width)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, i in enumerate(rows):
            x[r, : lengths[i]], t[r, : lengths[i]], valid[r, : lengths[i]] = xs[i], ts[i], True
        pos = torch.arange(width)[None, :, None].expand(len(rows), width, 1)
        b = TokenBatch.single(x, positions=pos, labels=labels[rows], valid=valid)
        return x, t, b

    with torch.no_grad():
        x, t, b = batch_of([0, 1], n)
        padded = model(x, t, b, feature_layers=(2,))
        for r in (0, 1):  # each sample alone, without padding
            x1, t1, b1 = batch_of([r], lengths[r])
            alone = model(x1, t1, b1, feature_layers=(2,))
            k = lengths[r]
            torch.testing.assert_close(padded.velocity[r, :k], alone.velocity[0], atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(padded.features[2][r, :k], alone.features[2][0],
                                       atol=1e-5, rtol=1e-5)
    assert padded.velocity[0, :5].abs().mean() > 1e-3  # not a vacuous comparison


def test_teacher_forward_is_no_grad_and_inside_the_autocast(tmp_path, toy_store, monkeypatch,
                                                            core_components):
    """On CUDA the step runs under bf16 autocast; the EMA teacher's forward (inside the student's
    forward) must run in it, without grad. CPU bf16 autocast stands in for CUDA here."""
    tr = Trainer(tiny(tmp_path, toy_store), components=core_components, progress=False)
    monkeypatch.setattr(tr, "_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = []
    features = tr.teacher.features

    def record(*args, **kwargs):
        out = features(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), out.requires_grad))
        return out

    monkeypatch.setattr(tr.teacher, "features", record)
    matmul = []  # the residual stream stays fp32; the teacher's matmuls run in bf16
    tr.teacher.model.blocks[0].qkv.register_forward_hook(lambda m, a, out: matmul.append(out.dtype))
    inner = tr.teacher.ema.model.forward
    grad_inside = []
    monkeypatch.setattr(tr.teacher.ema.model, "forward",
                        lambda *a, **k: (grad_inside.append(torch.is_grad_enabled()),
                                         inner(*a, **k))[1])
    tr.train_step()
    assert grad_inside == [False]
    assert seen == [(True, False)] and matmul == [torch.bfloat16]
