"""The documentation site builds offline and without warnings (``mkdocs build --strict``): every
nav page exists, every link resolves, and every ``::: module`` of the API reference renders.
Skipped when the ``docs`` extra (mkdocs, mkdocs-material, mkdocstrings[python]) is not installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if not _installed(m)]
    if missing:
        pytest.skip(f"docs tools not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}"
    for page in ("index", "writing-a-modality", "reference", "plugins"):
        assert (site / f"{page}.html").is_file()
    reference = (site / "reference.html").read_text()
    for name in ("ModalityAdapter", "ModalityContract", "TrainerConfig", "make_plugin_manager",
                 "new_modality"):
        assert name in reference, f"{name} is missing from the API reference"
    assert not (site / "examples").exists()  # the example package is not part of the site
