"""The ``selfflow`` command, called in-process through ``selfflow_core.cli.main.main``."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import selfflow_core.cli.main as cli
from selfflow_core.builtin.presets import toy
from selfflow_core.config.converter import make_converter, read_file, structure
from selfflow_core.config.run import TrainerConfig
from selfflow_core.plugins.manager import Components
from selfflow_core.runtime import checkpoint

#: a run of seconds: the toy preset shrunk through overrides
TINY = ["modalities.toy.batch_size=8", "modalities.toy.modality.tokens=8",
        "modalities.toy.modality.channels=4", "modalities.toy.modality.count=64",
        "backbone.depth=3", "backbone.width=32", "steps=2", "log_every=1", "checkpoint.every=1",
        "sampling.count=4", "sampling.steps=2", "tracker.kind=none"]


@pytest.fixture(autouse=True)
def isolated(one_thread, tmp_path, monkeypatch):
    """One thread; cwd in tmp_path (the toy preset writes data/ and runs/ there); only the core's
    plugin unless a test turns entry points back on."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- plugins ------------------------------------------------------------------------------------

def test_plugins_lists_the_core_and_every_installed_distribution(capsys, monkeypatch):
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")
    rc, out, err = run(capsys, "plugins")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"selfflow_core.builtin.plugin  (selfflow {md.version('selfflow')})"
    for entry in ("modality:toy", "backbone:dit", "teacher:ema", "teacher:none",
                  "tracker:jsonl", "tracker:none", "preset:toy", "timestep scheduler:dual"):
        assert f"    {entry}" in lines
    installed = list(md.entry_points(group="selfflow"))
    for ep in installed:
        assert f"{ep.name}  ({ep.dist.name} {ep.dist.version})" in lines, out

    rc, out, _ = run(capsys, "plugins", "--json")
    rows = json.loads(out)
    assert rc == 0 and rows[0]["plugin"] == "selfflow_core.builtin.plugin"
    assert rows[0]["distribution"] == "selfflow" and "preset:toy" in rows[0]["components"]
    assert {r["plugin"] for r in rows[1:]} == {ep.name for ep in installed}
    assert {r["distribution"] for r in rows[1:]} == {ep.dist.name for ep in installed}


def test_plugins_honours_disable_and_block(capsys, monkeypatch):
    rc, out, _ = run(capsys, "plugins", "--json")
    assert rc == 0 and [r["plugin"] for r in json.loads(out)] == ["selfflow_core.builtin.plugin"]
    installed = [ep.name for ep in md.entry_points(group="selfflow")]
    if installed:
        monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")
        monkeypatch.setenv("SELFFLOW_BLOCK_PLUGINS", ",".join(installed))
        rc, out, _ = run(capsys, "plugins", "--json")
        assert rc == 0 and [r["plugin"] for r in json.loads(out)] == [
            "selfflow_core.builtin.plugin"]


# -- config -------------------------------------------------------------------------------------

def test_config_show_round_trips_through_validate_and_structure(capsys, tmp_path):
    rc, shown, err = run(capsys, "config", "show", "toy")
    assert rc == 0, err
    path = tmp_path / "toy.toml"
    path.write_text(shown)
    rc, out, err = run(capsys, "config", "validate", path)
    assert rc == 0 and out.strip() == f"ok: {path} is a valid config", err
    back = structure(make_converter(Components()), read_file(path), TrainerConfig)
    assert back == toy()
    rc, again, _ = run(capsys, "config", "show", path)
    assert rc == 0 and again == shown  # a fixed point

    rc, shown, _ = run(capsys, "config", "show", "toy", "steps=7", "optim.lr=3e-4",
                       "backbone.width=32")
    path.write_text(shown)
    back = structure(make_converter(Components()), read_file(path), TrainerConfig)
    assert (back.steps, back.optim.lr, back.backbone.width) == (7, 3e-4, 32)


def test_config_validate_reports_cross_field_problems(capsys, tmp_path):
    rc, _, err = run(capsys, "config", "validate", "toy", "modalities.toy.batch_size=7",
                     "grad_accum=2")
    assert rc == 2 and "$.modalities.toy.batch_size" in err and "Traceback" not in err


def test_cross_field_problems_of_a_file_name_the_file(capsys, tmp_path):
    _, shown, _ = run(capsys, "config", "show", "toy")
    path = tmp_path / "deep.toml"
    path.write_text(shown.replace("teacher_layer = 0.7", "teacher_layer = 99"))
    for command in (["config", "validate"], ["train"]):
        rc, out, err = run(capsys, *command, path)
        assert rc == 2 and "$.objective" in err and "99" in err and str(path) in err, err
        assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists()


def test_train_with_misspelled_keys_exits_2_listing_paths(capsys, tmp_path):
    _, shown, _ = run(capsys, "config", "show", "toy")
    path = tmp_path / "bad.toml"
    path.write_text("stpes = 3\n" + shown.replace("[optim]\n", "[optim]\nlrr = 0.1\n"))
    rc, out, err = run(capsys, "train", path)
    assert rc == 2
    assert "stpes" in err and "$.optim" in err and "lrr" in err and str(path) in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()

    rc, _, err = run(capsys, "train", "toy", "optim.lrr=0.1", "backbone.depht=2")
    assert rc == 2 and "$.optim" in err and "lrr" in err and "$.backbone" in err
    assert "depht" in err and "Traceback" not in err


def test_unknown_preset_lists_installed_presets(capsys, monkeypatch):
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")
    rc, _, err = run(capsys, "train", "nosuch")
    assert rc == 2 and "unknown preset 'nosuch'" in err and "Traceback" not in err
    for name in Components().presets:
        assert name in err
    rc, _, err = run(capsys, "config", "show", "nosuch")
    assert rc == 2 and "toy" in err


def test_misspelled_names_get_a_did_you_mean(capsys, monkeypatch, tmp_path):
    rc, _, err = run(capsys, "train", "toi")  # a preset
    assert rc == 2 and "unknown preset 'toi' (did you mean 'toy'?); installed: toy" in err
    rc, _, err = run(capsys, "train", "toy", "teacher.kind=emaa")  # a registered kind
    assert rc == 2 and "$.teacher: unknown teacher 'emaa' (did you mean 'ema'?)" in err
    rc, _, err = run(capsys, "train", "toy", "modalities.toy.scheduler.distribution.kind=unifrom")
    assert rc == 2 and "(did you mean 'uniform'?)" in err  # a kind of a component's catalog
    rc, _, err = run(capsys, "config", "validate", "toy", "optim.lrr=0.1", "stpes=3",
                     "backbone.depht=2", "backbone.widht=8", "sampling.method=hune")  # keys
    assert rc == 2
    assert "$.optim: unknown key(s) ['lrr'] (did you mean 'lr'?)" in err
    assert "$: unknown key(s) ['stpes'] (did you mean 'steps'?)" in err
    assert ("$.backbone: unknown key(s) ['depht', 'widht'] (did you mean: depht -> 'depth', "
            "widht -> 'width'?)") in err
    assert "got 'hune' (did you mean 'heun'?)" in err
    rc, _, err = run(capsys, "encode", "tyo", "waves", tmp_path / "x.zarr")
    assert rc == 2 and "unknown modality 'tyo' (did you mean 'toy'?)" in err
    rc, _, err = run(capsys, "config", "validate", "toy", "optim.zzzzz=1")  # nothing close
    assert rc == 2 and "['zzzzz']" in err and "did you mean" not in err

    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")  # the installed presets
    if "image" in Components().presets:
        rc, _, err = run(capsys, "train", "imgae")
        assert rc == 2 and "unknown preset 'imgae' (did you mean 'image'?)" in err


def test_a_first_override_applies_to_the_default_preset(capsys):
    rc, out, err = run(capsys, "config", "show", "steps=7", "optim.lr=0.5")  # no preset named
    assert rc == 0, err
    assert out == run(capsys, "config", "show", "toy", "steps=7", "optim.lr=0.5")[1]
    assert "steps = 7" in out


def test_missing_config_file_is_a_user_error(capsys, tmp_path):
    rc, _, err = run(capsys, "config", "validate", tmp_path / "nope.toml")
    assert rc == 2 and "nope.toml" in err and "Traceback" not in err


# -- stores -------------------------------------------------------------------------------------

def test_encode_then_store_check(capsys, tmp_path):
    store = tmp_path / "stores" / "toy.zarr"
    rc, out, err = run(capsys, "encode", "toy", "waves", store, "count=40", "tokens=6",
                       "--batch-size", "16")
    assert rc == 0, err
    assert f"store {store}: 40 samples of toy from 'waves'" in out
    rc, out, _ = run(capsys, "store", "check", store)
    assert rc == 0 and out.strip().splitlines()[-1] == f"store {store}: ok"
    # running it again finds the complete store and keeps it
    rc, out, _ = run(capsys, "encode", "toy", "waves", store, "count=40", "tokens=6")
    assert rc == 0 and "40 samples" in out
    # another configuration into the same store is refused
    rc, _, err = run(capsys, "encode", "toy", "waves", store, "count=41")
    assert rc == 2 and str(store) in err and "Traceback" not in err
    rc, _, err = run(capsys, "encode", "toy", "waves", tmp_path / "x.zarr", "cuont=3")
    assert rc == 2 and "cuont" in err
    rc, _, err = run(capsys, "encode", "nosuch", "waves", tmp_path / "y.zarr")
    assert rc == 2 and "unknown modality 'nosuch'" in err


def test_store_check_reports_problems(capsys, tmp_path):
    rc, out, _ = run(capsys, "store", "check", tmp_path / "missing.zarr")
    assert rc == 1 and "problem" in out


# -- train and sample ---------------------------------------------------------------------------

def files(out: str) -> list[Path]:
    """The files ``selfflow sample`` wrote: the lines after its first (what it did)."""
    return [Path(p) for p in out.splitlines()[1:]]


def test_train_from_file_then_sample(capsys, tmp_path):
    rc, shown, err = run(capsys, "config", "show", "toy", *TINY)
    assert rc == 0, err
    config = tmp_path / "run.toml"
    config.write_text(shown)
    rc, out, err = run(capsys, "train", config)
    assert rc == 0, err
    assert "trained 2 steps (done)" in out and "step=2/2" in out
    # the final line says where the samples and the run are
    assert out.splitlines()[-1].endswith("; samples: runs/toy/samples/step-00000002; run: runs/toy")
    ckpts = checkpoint.list_checkpoints(tmp_path / "runs" / "toy" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000001.pt", "step-00000002.pt"]
    assert (tmp_path / "data" / "toy.zarr").is_dir()
    samples = tmp_path / "runs" / "toy" / "samples" / "step-00000002" / "toy" / "samples.npy"
    assert samples.is_file()
    trained = samples.read_bytes()

    # re-running the same command resumes and, the run being done, only re-samples
    rc, out, _ = run(capsys, "train", config)
    assert rc == 0 and "resumed from" in out
    assert out.splitlines()[-1] == ("already done (step 2); re-sampled to "
                                    "runs/toy/samples/step-00000002; run: runs/toy")

    rc, out, err = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s1", "--count", 3,
                       "--steps", 2, "--method", "heun", "--cfg-scale", 2.0, "--seed", 1)
    assert rc == 0, err
    assert out.splitlines()[0] == (
        f"sampled 3 per modality from {ckpts[-1]} (step 2) with the evaluation EMA weights: heun, "
        f"2 steps, cfg scale 2, seed 1; wrote 1 file(s) to {tmp_path / 's1'}")
    assert files(out) == [tmp_path / "s1" / "toy" / "samples.npy"]
    info = json.loads((tmp_path / "s1" / "sample_info.json").read_text())
    assert (info["weights"], info["decay"], info["updates"], info["step"], info["method"]) == (
        "eval_ema", 0.99, 2, 2, "selfflow")
    assert info["sampling"]["method"] == "heun" and info["checkpoint"] == str(ckpts[-1])
    trained_info = samples.parents[1] / "sample_info.json"  # the training's samples say so too
    assert json.loads(trained_info.read_text())["weights"] == "eval_ema"
    first = np.load(files(out)[0])
    assert first.shape == (3, 8, 4) and np.isfinite(first).all()

    rc, out, _ = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s2", "--count", 3,
                     "--steps", 2, "--method", "heun", "--cfg-scale", 2.0, "--seed", 1)
    assert np.array_equal(np.load(files(out)[0]), first)  # seeded
    rc, out, _ = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s3", "--count", 3,
                     "--steps", 2, "--seed", 2)
    assert not np.array_equal(np.load(files(out)[0]), first)

    # default: a new folder in the run's samples/ each time, with the run's settings; the
    # training's own samples are never overwritten
    rc, out, _ = run(capsys, "sample", ckpts[-1])
    assert rc == 0
    default = tmp_path / "runs" / "toy" / "samples" / "sample-00000002-1" / "toy" / "samples.npy"
    assert files(out) == [default] and np.load(default).shape == (4, 8, 4)
    assert "euler, 2 steps, cfg scale 1, seed 0" in out.splitlines()[0]
    rc, out, _ = run(capsys, "sample", ckpts[-1])
    assert files(out) == [default.parents[1].with_name("sample-00000002-2") / "toy" / "samples.npy"]
    assert samples.read_bytes() == trained


def test_sample_takes_a_run_dir_its_checkpoints_folder_or_a_file(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "toy", *TINY)
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "toy"
    latest = run_dir / "checkpoints" / "step-00000002.pt"
    for n, target in enumerate([run_dir, run_dir / "checkpoints", latest], 1):
        rc, out, err = run(capsys, "sample", target, "--count", 2)
        assert rc == 0, err
        assert f"from {latest} (step 2)" in out.splitlines()[0]
        assert files(out) == [run_dir / "samples" / f"sample-00000002-{n}" / "toy" / "samples.npy"]

    # `step-*.pt` expanded by the shell: one clear line, nothing written
    rc, out, err = run(capsys, "sample", *checkpoint.list_checkpoints(run_dir / "checkpoints"))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: selfflow sample takes one checkpoint, got 2 paths")
    assert "run directory" in err and "Traceback" not in err
    assert not (run_dir / "samples" / "sample-00000002-4").exists()
    # a folder with no checkpoint in it
    rc, _, err = run(capsys, "sample", tmp_path / "data")
    assert rc == 2 and f"no checkpoint in {tmp_path / 'data'}" in err


@pytest.mark.parametrize("option, value, message", [
    ("--count", "0", "argument --count: must be >= 1, got 0"),
    ("--steps", "0", "argument --steps: must be >= 1, got 0"),
    ("--cfg-scale", "-5", "argument --cfg-scale: must be >= 0.0, got -5"),
    ("--count", "many", "argument --count: expected an integer, got 'many'"),
])
def test_sample_options_out_of_range_are_one_error_line(capsys, tmp_path, option, value, message):
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before anything is loaded
        cli.main(["sample", str(tmp_path / "run"), option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err == f"selfflow sample: error: {message} (usage: selfflow sample --help)\n"


def test_sample_options_are_checked_by_the_python_api_too(tmp_path):
    from selfflow_core import ConfigError, sample_checkpoint

    for options, path in [({"count": 0}, "$.count"), ({"cfg_scale": -5.0}, "$.cfg_scale"),
                          ({"method": "hune"}, "'heun'")]:
        with pytest.raises(ConfigError, match="sampling options") as e:
            sample_checkpoint(tmp_path / "missing.pt", Components(), **options)
        assert path in str(e.value)


def test_a_run_dir_of_another_config_says_what_to_do(capsys, tmp_path):
    assert run(capsys, "train", "toy", *TINY)[0] == 0
    rc, out, err = run(capsys, "train", "toy", *TINY, "optim.lr=0.5")
    assert rc == 2 and "Traceback" not in out + err
    assert "was written by a different config (differs in: optim)" in err
    assert "run_dir=<new dir>" in err and "delete runs/toy/checkpoints" in err
    rc, out, err = run(capsys, "train", "toy", *TINY, "optim.lr=0.5", "run_dir=runs/lr")
    assert rc == 0 and out.splitlines()[-1].endswith("; run: runs/lr"), err
    rc, out, err = run(capsys, "train", "toy", *TINY, "steps=4")  # longer: a resumable change
    assert rc == 0, err
    assert out.splitlines()[-1].startswith("trained steps 3-4 (done) in ")


@pytest.mark.parametrize("is_main", [True, False])
def test_the_final_train_line_comes_from_rank_0_only(capsys, monkeypatch, is_main):
    import selfflow_core.trainer

    class OneRank:  # what `selfflow train` sees of a Trainer in one process of a torchrun
        def __init__(self, config, *, components):
            self.dist = SimpleNamespace(is_main=is_main)

        def fit(self):
            return {"step": 2, "reason": "done", "seconds": 1.0, "final_loss": 0.5,
                    "start_step": 0, "steps_run": 2,
                    "samples_dir": "runs/toy/samples/step-00000002" if is_main else None}

    monkeypatch.setattr(selfflow_core.trainer, "Trainer", OneRank)
    rc, out, err = run(capsys, "train", "toy")
    assert rc == 0, err
    assert out == ("trained 2 steps (done) in 1s; final loss 0.5000; samples: "
                   "runs/toy/samples/step-00000002; run: runs/toy\n" if is_main else "")


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, tmp_path):
    import selfflow_core.data.writer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfflow_core.data.writer, "encode_store", interrupted)
    rc, out, err = run(capsys, "encode", "toy", "waves", tmp_path / "toy.zarr", "count=40")
    assert rc == 130 and out == ""
    assert err.strip() == "interrupted; run the same command again to resume"
    monkeypatch.setitem(cli.COMMANDS, "plugins", interrupted)
    rc, _, err = run(capsys, "plugins")
    assert rc == 130 and err.strip() == "interrupted"  # nothing to resume


def test_a_ctrl_c_while_the_loader_stops_is_not_ignored(capsys, monkeypatch):
    """The loader's threads stop inside ``fit``: a Ctrl-C arriving then is an ordinary
    KeyboardInterrupt (exit 130), not "Exception ignored in: <generator LatentLoader.__iter__>"
    from the generator's finalizer when the trainer is collected (or the interpreter exits)."""
    import gc
    import sys

    import selfflow_core.data.loader as loader

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    original = loader._stop_threads

    def second_ctrl_c(node, seen):  # arrives while the pipeline's threads are being stopped
        monkeypatch.setattr(loader, "_stop_threads", original)
        original(node, seen)
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_stop_threads", second_ctrl_c)
    rc, _, err = run(capsys, "train", "toy", *TINY)
    gc.collect()
    assert not unraisable, [(u.exc_type, u.object) for u in unraisable]
    assert rc == 130 and err.strip().endswith("interrupted; run the same command again to resume")


def test_sample_refuses_a_bad_checkpoint(capsys, tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    rc, _, err = run(capsys, "sample", bad)
    assert rc == 2 and str(bad) in err and "Traceback" not in err
    rc, _, err = run(capsys, "sample", tmp_path / "missing.pt")
    assert rc == 2 and "missing.pt" in err


# -- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], *[[c] for c in cli.COMMANDS]])
def test_help_works_for_every_subcommand(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: selfflow {' '.join(argv)}".rstrip())
    if not argv:
        for command in cli.COMMANDS:
            assert command in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "usage: selfflow" in capsys.readouterr().err
