"""The template plugin ``docs/examples/selfflow-timeseries``: it is what ``selfflow new-modality
timeseries`` renders, it installs (editable, offline), selfflow discovers it through its entry
point, and it passes its own tests (the core's contract kit and a few training steps).

The package is installed into a throwaway environment layered over this one (a venv whose
``.pth`` adds this interpreter's site-packages), never into the shared environment itself, so no
other test run sees it and nothing has to be uninstalled afterwards.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import site
import subprocess
import textwrap
import tomllib
import venv
from pathlib import Path

import pytest

from selfflow_core.scaffold import render_files

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "selfflow-timeseries"


# ---- a throwaway environment over this one (the same helper is in test_scaffold.py) -----------

def overlay_python(root: Path) -> Path:
    """A venv at ``root`` (no pip of its own) that sees this interpreter's site-packages; returns
    its python. Skips the test when pip or setuptools (for ``--no-build-isolation``) is missing."""
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed in this environment: cannot pip-install a "
                        f"plugin package here")
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a virtual environment: {exc}")
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        parents.append(site.getusersitepackages())
    Path(purelib.stdout.strip(), "_selfflow_parent_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n")
    return python


def pip_install_editable(python: Path, package: Path) -> None:
    proc = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-input", "--disable-pip-version-check", "-e", str(package)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"pip install -e {package} failed:\n{proc.stdout}{proc.stderr}"


def entry_point_in(python: Path, name: str) -> str:
    """``module`` of entry point ``name`` in group ``selfflow``, as the overlay's python sees it."""
    code = (f"import importlib.metadata as md; print(next((e.value for e in md.entry_points("
            f"group='selfflow') if e.name == {name!r}), ''))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def child_env(only: str) -> dict[str, str]:
    """One thread; every other installed selfflow plugin blocked (faster, and immune to another
    plugin that is broken right now)."""
    others = sorted({ep.name for ep in md.entry_points(group="selfflow")} - {only})
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "SELFFLOW_BLOCK_PLUGINS": ",".join(others),
            "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": ""}


def run_plugin_tests(python: Path, kind: str, tests: Path, tmp: Path) -> str:
    """In one child process: ``Components()`` finds modality ``kind`` through its entry point,
    then pytest runs ``tests``; returns the output (the test fails with it on failure)."""
    script = textwrap.dedent(f"""
        import sys, pytest
        from selfflow_core import Components
        c = Components()
        assert {kind!r} in c.modalities, sorted(c.modalities)
        print("discovered", {kind!r}, "from", c.modalities.provider({kind!r}), flush=True)
        sys.exit(pytest.main([{str(tests)!r}, "-q", "-p", "no:cacheprovider",
                              "--basetemp", {str(tmp / "basetemp")!r}]))
    """)
    proc = subprocess.run([python, "-c", script], cwd=tmp, env=child_env(kind),
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"tests of the {kind} plugin failed:\n{out[-6000:]}"
    return out


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
        f"{stale} differ from selfflow_core/templates/modality; edit the template, then "
        f"regenerate: rm -r {EXAMPLE.relative_to(ROOT)} && python -c \"from selfflow_core.scaffold "
        f"import render; render('timeseries', '{EXAMPLE.relative_to(ROOT)}')\"")


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
