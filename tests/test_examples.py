"""The template plugin ``docs/examples/selfflow-timeseries``: it is what ``selfflow new-modality
timeseries`` renders, it installs (editable, offline), selfflow discovers it through its entry
point, and it passes its own tests (the core's contract kit and a few training steps).

The package is installed into a throwaway environment layered over this one (a venv whose
``.pth`` adds this interpreter's site-packages), never into the shared environment itself, so no
other test run sees it and nothing has to be uninstalled afterwards.
"""

from __future__ import annotations

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

from selfflow_core.cli.scaffold import render_files

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "selfflow-timeseries"


def _generated(part: str) -> bool:
    """Path parts that tools make (caches, build metadata), not the package's own files."""
    return part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info")


# ---- the tests --------------------------------------------------------------------------------

def test_example_is_what_the_scaffold_renders():
    """One source of truth: the example is the template rendered for ``timeseries``."""
    rendered = render_files("timeseries")
    present = {p.relative_to(EXAMPLE).as_posix(): p for p in EXAMPLE.rglob("*")
               if p.is_file() and not any(_generated(part)
                                          for part in p.relative_to(EXAMPLE).parts)}
    assert sorted(present) == sorted(rendered), "files differ from the template's"
    stale = [rel for rel, text in rendered.items() if present[rel].read_text() != text]
    assert not stale, (
        f"{stale} differ from selfflow_core/cli/templates/modality; edit the template, then "
        f"regenerate: rm -r {EXAMPLE.relative_to(ROOT)} && python -c "
        f"\"from selfflow_core.cli.scaffold import render; "
        f"render('timeseries', '{EXAMPLE.relative_to(ROOT)}')\"")


def test_example_package_metadata():
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "selfflow-timeseries"
    assert meta["project"]["entry-points"]["selfflow"] == {
        "timeseries": "selfflow_timeseries.plugin"}
    for name in ("__init__", "adapter", "plugin", "presets"):
        assert (EXAMPLE / "src" / "selfflow_timeseries" / f"{name}.py").is_file()
    assert (EXAMPLE / "tests" / "test_timeseries.py").is_file()
    assert (EXAMPLE / "README.md").is_file()


@pytest.mark.slow
def test_example_installs_is_discovered_and_passes_its_tests(tmp_path: Path):
    python = overlay_python(tmp_path / "env")
    pip_install_editable(python, EXAMPLE)
    assert entry_point_in(python, "timeseries") == "selfflow_timeseries.plugin"
    out = run_plugin_tests(python, "timeseries", EXAMPLE / "tests", tmp_path)
    assert "discovered timeseries from selfflow-timeseries 0.1.0" in out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20, out[-3000:]
    assert not re.search(r"\d+ (failed|skipped|errors?)\b", out), out[-3000:]
