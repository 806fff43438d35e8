"""``selfflow new-modality NAME``: names are validated, nothing is overwritten, and the package it
writes installs (editable, offline), is discovered through its entry point and passes its own
generated tests out of the box.

The package is installed into a throwaway environment layered over this one (see
``test_examples.py``), never into the shared environment.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from isolated_env import (
    entry_point_in,
    overlay_python,
    pip_install_editable,
    run_plugin_tests,
)

from selfflow_core.cli.main import main
from selfflow_core.cli.scaffold import (
    ScaffoldError,
    default_directory,
    names,
    new_modality,
    render,
    render_files,
    validate_name,
)

# ---- names and directories ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eeg", "eeg_signals", "lidar2d", "a"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("", "invalid"), ("EEG", "'eeg'"), ("eeg-signals", "'eeg_signals'"), ("2d", "invalid"),
    ("eeg__x", "invalid"), ("_eeg", "invalid"), ("eeg_", "invalid"), ("my eeg", "'my_eeg'"),
    ("x" * 41, "longer than 40"), ("toy", "reserved"), ("core", "reserved"),
    ("class", "reserved")])
def test_invalid_names_are_refused_with_a_reason(name, why):
    with pytest.raises(ScaffoldError, match=re.escape(why)):
        validate_name(name)


def test_derived_names():
    assert names("eeg_signals") == {"name": "eeg_signals", "package": "selfflow_eeg_signals",
                                    "dist": "selfflow-eeg-signals", "Class": "EegSignals"}
    assert default_directory("eeg_signals") == Path("selfflow-eeg-signals")


def test_rendered_package(tmp_path: Path):
    dest = render("eeg_signals", tmp_path / "pkg")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/selfflow_eeg_signals/__init__.py",
                     "src/selfflow_eeg_signals/adapter.py", "src/selfflow_eeg_signals/plugin.py",
                     "src/selfflow_eeg_signals/presets.py", "src/selfflow_eeg_signals/py.typed",
                     "tests/test_eeg_signals.py"]
    meta = tomllib.loads((dest / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "selfflow-eeg-signals"
    assert meta["project"]["entry-points"]["selfflow"] == {
        "eeg_signals": "selfflow_eeg_signals.plugin"}
    for py in dest.rglob("*.py"):
        compile(py.read_text(), str(py), "exec")  # valid Python
    adapter = (dest / "src/selfflow_eeg_signals/adapter.py").read_text()
    assert 'name = "eeg_signals"' in adapter and "class EegSignalsModality" in adapter
    assert "timeseries" not in "".join(render_files("eeg_signals").values()).lower()


def test_refuses_to_overwrite(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="refusing to overwrite"):
        render("eeg", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScaffoldError, match="not an empty directory"):
        render("eeg", tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert (render("eeg", tmp_path / "empty") / "pyproject.toml").is_file()


def test_refuses_the_name_of_an_installed_plugin(tmp_path: Path, monkeypatch):
    installed = sorted(ep.name for ep in md.entry_points(group="selfflow"))
    if not installed:
        pytest.skip("no selfflow plugin is installed")
    with pytest.raises(ScaffoldError, match="already installed"):
        new_modality(installed[0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new-modality", "eeg"]) == 0
    out = capsys.readouterr().out
    assert "wrote selfflow-eeg" in out and "pip install -e selfflow-eeg" in out
    assert (tmp_path / "selfflow-eeg" / "src" / "selfflow_eeg" / "adapter.py").is_file()
    assert main(["new-modality", "eeg"]) == 2  # exists now
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["new-modality", "Bad-Name", "--dir", "other"]) == 2
    assert "invalid modality name 'Bad-Name'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main(["new-modality", "eeg", "--dir", "custom/place"]) == 0
    assert (tmp_path / "custom" / "place" / "tests" / "test_eeg.py").is_file()


# ---- the rendered package works out of the box ------------------------------------------------

@pytest.mark.slow
def test_scaffold_installs_is_discovered_and_passes_its_tests(tmp_path: Path):
    kind = "scaffold_probe"
    pkg = render(kind, tmp_path / "selfflow-scaffold-probe")
    python = overlay_python(tmp_path / "env")
    pip_install_editable(python, pkg)
    assert entry_point_in(python, kind) == "selfflow_scaffold_probe.plugin"
    out = run_plugin_tests(python, kind, pkg / "tests", tmp_path)
    assert f"discovered {kind} from selfflow-scaffold-probe 0.1.0" in out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20, out[-3000:]
    assert not re.search(r"\d+ (failed|skipped|errors?)\b", out), out[-3000:]
