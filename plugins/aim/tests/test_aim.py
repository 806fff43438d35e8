"""Tests of the selfflow-aim plugin: write a run, index the repo, read everything back."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from selfflow_aim import AimTracker, audio_sequence, images_sequence

from selfflow_core import Components
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.interfaces import Tracker, TrackerConfig

try:
    from selfflow_core.testing import check_config_contract
except ImportError:
    check_config_contract = None
try:
    from selfflow_core.testing import check_discovered
except ImportError:  # a core without the plugin checks
    check_discovered = None

aim = pytest.importorskip("aim")


def reindex(repo: Path) -> None:
    """Finished runs are invisible to queries until the repo is indexed (aim's CLI, which leaves
    no watcher threads behind in this process)."""
    aim_cli = Path(sys.executable).with_name("aim")
    cmd = [str(aim_cli)] if aim_cli.exists() else [sys.executable, "-m", "aim.cli.cli"]
    subprocess.run([*cmd, "storage", "--repo", str(repo), "reindex", "-y"], check=True,
                   capture_output=True, timeout=120)


def metric_values(repo, name: str) -> tuple[list[int], list[float]]:
    found = list(repo.query_metrics(f"metric.name == {name!r}").iter())
    assert len(found) == 1, f"{len(found)} metrics named {name!r}"
    steps, (values, _epochs, _timestamps) = found[0].data.numpy()
    return steps.tolist(), values.tolist()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One run with everything a trainer logs, written to runs/aim next to runs/demo."""
    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "demo"
    grid = run_dir / "samples" / "step_2" / "samples.png"
    grid.parent.mkdir(parents=True)
    Image.fromarray(np.arange(66 * 34, dtype=np.uint32).reshape(34, 66).astype(np.uint8)).save(grid)
    (grid.parent / "samples.npy").write_bytes(b"ignored: not an image")
    sound = grid.parent / "sample-000-label3.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((np.sin(np.arange(800) / 5) * 3000).astype("<i2").tobytes())
    tracker = AimTracker.Config().build(run_dir=run_dir, experiment="digits")
    hparams = {"lr": 3e-4, "modality": {"kind": "image", "size": 8}, "betas": (0.9, 0.95),
               "out": Path("runs/demo")}
    tracker.log_hparams(hparams)
    metrics = {}
    for step in range(1, 6):
        m = {"loss": 1.0 / step, "loss/flow": 0.5 / step, "loss/rep": torch.tensor(0.1 * step),
             "grad_norm": 2.0 + step, "lr": 1e-4 * step, "rep/cosine": 0.2 * step,
             "throughput/samples_per_s": 100.0 + step}
        tracker.log_metrics(m, step=step)
        metrics[step] = {k: float(v) for k, v in m.items()}
    timesteps = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    tracker.log_distribution("timesteps/student", timesteps, step=2)
    # a modality's files of both kinds in one call (audio runs write WAVs and a spectrogram)
    tracker.log_images("samples", [sound, grid, grid.parent / "samples.npy"], step=2)
    run_hash = tracker.hash
    tracker.close()
    tracker.close()  # idempotent
    reindex(runs / "aim")
    return {"runs": runs, "run_dir": run_dir, "hash": run_hash, "metrics": metrics,
            "timesteps": timesteps.numpy(), "sound": sound}


@pytest.fixture(scope="module")
def repo(logged):
    return aim.Repo(str(logged["runs"] / "aim"))


@pytest.mark.skipif(check_discovered is None, reason="the core has no check_discovered")
def test_entry_point_discovery():
    check_discovered("trackers", "aim", "selfflow-aim", config_class=AimTracker.Config)


def test_config():
    cfg = AimTracker.Config()
    assert (cfg.repo, cfg.experiment, cfg.system_tracking) == ("", "selfflow", False)
    assert issubclass(AimTracker.Config, TrackerConfig) and AimTracker.Config.kind == "aim"
    conv = make_converter(Components())
    data = {"kind": "aim", "repo": "/tmp/x", "experiment": "e", "system_tracking": True}
    got = structure(conv, data, TrackerConfig)
    assert got == AimTracker.Config(repo="/tmp/x", experiment="e", system_tracking=True)
    assert to_data(conv, got) == data
    if check_config_contract is not None:
        check_config_contract(cfg, "trackers")


def test_default_repo_is_next_to_the_run(logged, repo):
    assert (logged["runs"] / "aim" / ".aim").is_dir()
    marker = json.loads((logged["run_dir"] / "aim.json").read_text())
    assert marker["run_hash"] == logged["hash"]
    assert Path(marker["repo"]) == (logged["runs"] / "aim").resolve()
    run = repo.get_run(logged["hash"])
    assert run.experiment == "digits" and run.name == "demo"
    assert run["run_dir"] == str(logged["run_dir"].resolve())


def test_hparams(repo, logged):
    hp = repo.get_run(logged["hash"])["hparams"]
    assert hp == {"lr": 3e-4, "modality": {"kind": "image", "size": 8}, "betas": [0.9, 0.95],
                  "out": "runs/demo"}


def test_metrics_read_back(repo, logged):
    names = next(iter(logged["metrics"].values())).keys()
    for name in names:
        steps, values = metric_values(repo, name)
        assert steps == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(values, [logged["metrics"][s][name] for s in steps],
                                   rtol=1e-12, err_msg=name)


def test_distribution_stored(repo, logged):
    found = list(repo.query_distributions("distributions.name == 'timesteps/student'").iter())
    assert len(found) == 1
    steps, (items, *_rest) = found[0].data.items_list()
    assert list(steps) == [2]
    dist = items[0]
    hist, edges = dist.to_np_histogram()
    assert hist.sum() == 1000 and len(hist) == 64
    assert edges[0] == 0.0 and edges[-1] == 1.0  # timesteps get the fixed [0, 1] range
    want, _ = np.histogram(logged["timesteps"], bins=64, range=(0, 1))
    np.testing.assert_array_equal(hist, want)


def test_sequence_names():
    assert images_sequence("samples") == "samples/images"
    assert audio_sequence("samples") == "samples/audio"


def test_images_stored(repo):
    assert not list(repo.query_images("images.name == 'samples'").iter())
    found = list(repo.query_images("images.name == 'samples/images'").iter())
    assert len(found) == 1
    steps, (items, *_rest) = found[0].data.items_list()
    assert list(steps) == [2]
    images = items[0]  # one record per step: the list of files logged together
    assert len(images) == 1  # the .npy file is not an image and is skipped
    assert images[0].caption == "samples.png"
    assert images[0].to_pil_image().size == (66, 34)


def test_audio_stored_apart_from_the_images(repo, logged):
    """Images and sounds logged together go to two sequences: one aim sequence holds one type."""
    found = list(repo.query_audios("audios.name == 'samples/audio'").iter())
    assert len(found) == 1
    steps, (items, *_rest) = found[0].data.items_list()
    assert list(steps) == [2]
    (audio,) = items[0]
    assert audio.json() == {"caption": "sample-000-label3.wav", "format": "wav"}
    assert audio.get().getvalue() == logged["sound"].read_bytes()
    assert not list(repo.query_audios("audios.name == 'samples'").iter())


def test_resume_appends_to_the_same_run(tmp_path: Path):
    repo_dir, run_dir = tmp_path / "repo", tmp_path / "runs" / "r1"
    cfg = AimTracker.Config(repo=str(repo_dir), experiment="mine")
    first = cfg.build(run_dir=run_dir, experiment="ignored: config wins")
    first.log_metrics({"loss": 1.0}, step=1)
    h = first.hash
    first.close()
    second = cfg.build(run_dir=run_dir)
    assert second.resumed and second.hash == h
    second.log_metrics({"loss": 0.5}, step=2)
    second.close()
    other = cfg.build(run_dir=tmp_path / "runs" / "r2")
    assert not other.resumed and other.hash != h
    other.close()
    reindex(repo_dir)
    r = aim.Repo(str(repo_dir))
    run = r.get_run(h)
    assert run.experiment == "mine"
    from aim.storage.context import Context
    steps, (values, *_rest) = run.get_metric("loss", Context({})).data.numpy()
    assert steps.tolist() == [1, 2] and values.tolist() == [1.0, 0.5]


def test_is_a_tracker():
    assert issubclass(AimTracker, Tracker)
