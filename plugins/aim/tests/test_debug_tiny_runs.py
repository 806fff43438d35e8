"""Every installed modality's ``<modality>_debug_tiny`` preset, trained to the end with the aim
tracker, then read back from the aim repo: each run's sample images and sounds are there, under
their own sequences (``samples/images``, ``samples/audio``), byte for byte what the run wrote.

The presets run shortened (2 steps, 2 samples of 2 ODE steps, stores and runs in a tmp folder)
in one aim repo; the whole module takes ~20 s on a 2-core machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
from PIL import Image
from selfflow_aim import AimTracker, audio_sequence, images_sequence
from selfflow_aim.tracker import AUDIO_SUFFIXES, IMAGE_SUFFIXES

from selfflow_core import Trainer
from selfflow_core.testing import installed_components, torch_threads

aim = pytest.importorskip("aim")

pytestmark = pytest.mark.slow

#: built-in sources that need a system tool (the audio plugins synthesise speech)
SOURCE_TOOLS = {"spoken_digits": "espeak-ng", "moving_spoken_digits": "espeak-ng"}
STEPS = 2


def reindex(repo: Path) -> None:
    """Index the repo with aim's CLI, as ``test_aim.reindex`` does: finished runs are invisible
    to queries until then."""
    aim_cli = Path(sys.executable).with_name("aim")
    cmd = [str(aim_cli)] if aim_cli.exists() else [sys.executable, "-m", "aim.cli.cli"]
    subprocess.run([*cmd, "storage", "--repo", str(repo), "reindex", "-y"], check=True,
                   capture_output=True, timeout=120)


def debug_tiny_presets() -> list[str]:
    return sorted(n for n in installed_components().presets if n.endswith("_debug_tiny"))


def tiny_config(components, name: str, runs: Path):
    """The preset, shortened, with its stores in ``runs/stores`` and its run in ``runs/<name>``;
    the aim tracker with its default repo (``runs/aim``, next to the run)."""
    config = components.presets.get(name)()
    modalities = {m: attrs.evolve(spec, store=str(runs / "stores" / f"{name}-{m}.zarr"))
                  for m, spec in config.modalities.items()}
    return attrs.evolve(config, modalities=modalities, run_dir=str(runs / name), steps=STEPS,
                        sampling=attrs.evolve(config.sampling, count=2, steps=2, every=0),
                        checkpoint=attrs.evolve(config.checkpoint, every=STEPS),
                        tracker=AimTracker.Config())


def missing_tool(config) -> str | None:
    for spec in config.modalities.values():
        tool = SOURCE_TOOLS.get(spec.source)
        if tool and shutil.which(tool) is None:
            return f"source {spec.source!r} needs {tool}, which is not installed"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{preset: (run_dir, None) | (None, the error its training raised) | (None, skip reason)}``
    and the aim repo holding every run, indexed."""
    root = tmp_path_factory.mktemp("runs")
    components = installed_components()
    results: dict[str, tuple[Path | None, object]] = {}
    for name in debug_tiny_presets():
        config = tiny_config(components, name, root)
        reason = missing_tool(config)
        if reason:
            results[name] = (None, reason)
            continue
        try:
            with torch_threads(1):
                Trainer(config, components=components, progress=False).fit()
        except Exception as e:  # reported by the preset's own test
            results[name] = (None, e)
        else:
            results[name] = (Path(config.run_dir), None)
    repo_dir = root / "aim"
    if (repo_dir / ".aim").is_dir():
        reindex(repo_dir)
    return results, repo_dir


def sequences(repo, kind: str, name: str, run_hash: str) -> list:
    query = {"images": repo.query_images, "audios": repo.query_audios}[kind]
    return [s for s in query(f"{kind}.name == {name!r}").iter() if s.run.hash == run_hash]


def written(run_dir: Path, suffixes) -> dict[str, Path]:
    """The sample files of the run's last step, by file name."""
    step = run_dir / "samples" / f"step-{STEPS:08d}"
    return {p.name: p for p in sorted(step.rglob("*")) if p.suffix.lower() in suffixes}


def read_back(repo, kind: str, name: str, run_hash: str) -> dict[str, object]:
    """The one record of sequence ``name`` at the last step: ``{caption: aim object}``."""
    found = sequences(repo, kind, name, run_hash)
    if not found:
        return {}
    assert len(found) == 1, f"{len(found)} {kind} sequences named {name!r}"
    steps, (items, *_rest) = found[0].data.items_list()
    assert list(steps) == [STEPS]
    return {obj.json()["caption"]: obj for obj in items[0]}


def test_there_are_presets():
    assert "image_debug_tiny" in debug_tiny_presets()


@pytest.mark.parametrize("preset", debug_tiny_presets())
def test_samples_read_back_from_aim(runs, preset):
    results, repo_dir = runs
    run_dir, problem = results[preset]
    if isinstance(problem, str):
        pytest.skip(problem)
    if problem is not None:
        raise problem
    run_hash = json.loads((run_dir / "aim.json").read_text())["run_hash"]
    repo = aim.Repo(str(repo_dir))
    assert repo.get_run(run_hash).name == preset

    images, sounds = written(run_dir, IMAGE_SUFFIXES), written(run_dir, AUDIO_SUFFIXES)
    got_images = read_back(repo, "images", images_sequence("samples"), run_hash)
    got_sounds = read_back(repo, "audios", audio_sequence("samples"), run_hash)
    assert sorted(got_images) == sorted(images)
    assert sorted(got_sounds) == sorted(sounds)
    for caption, obj in got_images.items():
        with Image.open(images[caption]) as im:
            assert obj.to_pil_image().size == im.size, caption
            if im.format == "PNG":
                np.testing.assert_array_equal(np.asarray(obj.to_pil_image().convert(im.mode)),
                                              np.asarray(im), err_msg=caption)
    for caption, obj in got_sounds.items():
        assert obj.get().getvalue() == sounds[caption].read_bytes(), caption
    # nothing is tracked under the undivided name
    assert not sequences(repo, "images", "samples", run_hash)
    assert not sequences(repo, "audios", "samples", run_hash)
