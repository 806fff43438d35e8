"""Every user mistake ends in one ``error:`` line and exit status 2, never a traceback: all
user-facing errors derive from :class:`SelfFlowError`, which the CLI catches."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

import selfflow_core.cli.main as cli
from selfflow_core import errors
from selfflow_core.runtime import checkpoint

CORE_ONLY = ["SELFFLOW_DISABLE_PLUGIN_AUTOLOAD"]


@pytest.fixture(autouse=True)
def core_only(one_thread, monkeypatch):
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")


def one_line_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` paragraph and no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    # progress bars may come first; the error is the last thing said
    start = err.rfind("\nerror: ") + 1
    assert err[start:].startswith("error: "), err
    return err[start:]


def tiny_toy(tmp_path, *more) -> list[str]:
    return ["toy", f"run_dir={tmp_path / 'run'}",
            f"modalities.toy.store={tmp_path / 'toy.zarr'}", "steps=2", "log_every=1",
            "checkpoint.every=2", "sampling.count=2", "sampling.steps=1",
            "backbone.depth=3", "backbone.width=16", "tracker.kind=none", *more]


def test_every_user_error_derives_from_the_one_base():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SelfFlowError), name
    # and keeps the built-in it refines, so `except ValueError` callers keep working
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.CheckpointError, RuntimeError)


def test_the_cli_turns_any_selfflow_error_into_one_line(capsys, monkeypatch):
    class Custom(errors.SelfFlowError):
        pass

    def fails(args, components):
        raise Custom("the plugin's own message")

    monkeypatch.setitem(cli.COMMANDS, "plugins", fails)
    assert one_line_error(capsys, ["plugins"]) == "error: the plugin's own message\n"


def test_a_run_dir_in_use_is_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(f"{alive.pid} {socket.gethostname()}\n")
        err = one_line_error(capsys, ["train", *tiny_toy(tmp_path)])
    finally:
        alive.kill()
        alive.wait()
    assert f"pid {alive.pid}" in err and "in use" in err
    assert not (run / "checkpoints").exists()


def test_a_misspelled_source_is_a_config_error_listing_the_sources(capsys, tmp_path):
    err = one_line_error(capsys, ["train", *tiny_toy(tmp_path, "modalities.toy.source=wavez")])
    assert "$.modalities.toy.source" in err and "'wavez'" in err and "waves" in err
    assert not (tmp_path / "toy.zarr").exists()  # refused before anything was written
    # `config validate` finds it too, without training
    err = one_line_error(capsys, ["config", "validate",
                                  *tiny_toy(tmp_path, "modalities.toy.source=wavez")])
    assert "unknown source 'wavez'" in err


def test_encoding_a_misspelled_source_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["encode", "toy", "wavez", str(tmp_path / "s.zarr")])
    assert "unknown source 'wavez'" in err and "waves" in err
    assert not (tmp_path / "s.zarr").exists()


def test_an_existing_path_is_accepted_as_a_source(tmp_path):
    from selfflow_core.builtin.toy import ToyModality
    from selfflow_core.config.validate import source_problems

    assert source_problems(ToyModality.Config(), "waves") == []
    assert source_problems(ToyModality.Config(), str(tmp_path)) == []
    assert source_problems(ToyModality.Config(), str(tmp_path / "nope"))


def test_sampling_a_checkpoint_of_another_model_is_one_line(capsys, tmp_path):
    assert cli.main(["train", *tiny_toy(tmp_path)]) == 0
    path = checkpoint.latest(tmp_path / "run" / "checkpoints")
    state = checkpoint.load(path)
    # the weights of a wider model under this run's config (e.g. a file copied between runs)
    for part in ("model", "teacher", "eval_ema"):
        if "model" in state[part] or part == "model":
            weights = state[part] if part == "model" else state[part]["model"]
            for k, v in weights.items():
                weights[k] = torch.zeros(*(s + 1 for s in v.shape))
    other = tmp_path / "other" / "step-00000002.pt"
    other.parent.mkdir()
    torch.save(state, other)
    capsys.readouterr()
    err = one_line_error(capsys, ["sample", str(other), "--count", "1", "--steps", "1"])
    assert str(other) in err and "do not fit" in err
