"""The ``selfflow`` command, called in-process through ``selfflow_core.cli.main.main``."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

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
    assert rc == 0 and out.strip() == f"store {store}: ok"
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

def test_train_from_file_then_sample(capsys, tmp_path):
    rc, shown, err = run(capsys, "config", "show", "toy", *TINY)
    assert rc == 0, err
    config = tmp_path / "run.toml"
    config.write_text(shown)
    rc, out, err = run(capsys, "train", config)
    assert rc == 0, err
    assert "trained 2 steps (done)" in out and "step=2/2" in out
    ckpts = checkpoint.list_checkpoints(tmp_path / "runs" / "toy" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000001.pt", "step-00000002.pt"]
    assert (tmp_path / "data" / "toy.zarr").is_dir()
    samples = tmp_path / "runs" / "toy" / "samples" / "step-00000002" / "toy" / "samples.npy"
    assert samples.is_file()

    # re-running the same command resumes and, the run being done, trains nothing more
    rc, out, _ = run(capsys, "train", config)
    assert rc == 0 and "resumed from" in out and "trained 2 steps" in out

    rc, out, err = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s1", "--count", 3,
                       "--steps", 2, "--method", "heun", "--cfg-scale", 2.0, "--seed", 1)
    assert rc == 0, err
    paths = [Path(p) for p in out.split()]
    assert paths == [tmp_path / "s1" / "toy" / "samples.npy"]
    first = np.load(paths[0])
    assert first.shape == (3, 8, 4) and np.isfinite(first).all()

    rc, out, _ = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s2", "--count", 3,
                     "--steps", 2, "--method", "heun", "--cfg-scale", 2.0, "--seed", 1)
    assert np.array_equal(np.load(out.split()[0]), first)  # seeded
    rc, out, _ = run(capsys, "sample", ckpts[-1], "--out", tmp_path / "s3", "--count", 3,
                     "--steps", 2, "--seed", 2)
    assert not np.array_equal(np.load(out.split()[0]), first)

    rc, out, _ = run(capsys, "sample", ckpts[-1])  # default: next to the run, the run's settings
    assert rc == 0
    default = tmp_path / "runs" / "toy" / "samples" / "step-00000002" / "toy" / "samples.npy"
    assert [Path(p) for p in out.split()] == [default] and np.load(default).shape == (4, 8, 4)


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
