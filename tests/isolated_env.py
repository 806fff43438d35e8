"""Installing a plugin package for a test, offline, without touching the shared environment.

A throwaway virtual environment layered over the current one (it sees this interpreter's
site-packages) gets the package editable with ``--no-deps --no-build-isolation``; a child process
then checks discovery through the entry point and runs the package's own tests.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import site
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest


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
