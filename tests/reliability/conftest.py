"""Shared pieces of the reliability tests (issue 8: "a crash must cost minutes, never the run").

Everything runs on one CPU thread (the machine is shared); child processes get
``OMP_NUM_THREADS=1``. The crash tests run ``crash_driver.py`` in one subprocess, which forks a
child per trial (cheap: no interpreter start, no torch import) and kills it. See
``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import selfflow_core.cli.main as cli
from selfflow_core.runtime import checkpoint
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "crash_driver.py"
#: child processes: one thread each (2 shared cores), unbuffered, only the core's plugin
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}


def tiny_overrides(store: str | Path, run_dir: str | Path, steps: int) -> list[str]:
    """The toy preset shrunk to a run of seconds (depth 3, width 32, batch 8, constant lr after
    2 warm-up steps, so ``steps`` does not change the math of the steps before it)."""
    return [f"run_dir={run_dir}", f"modalities.toy.store={store}", 'modalities.toy.source=""',
            "modalities.toy.batch_size=8", "modalities.toy.modality.tokens=8",
            "modalities.toy.modality.channels=4", "modalities.toy.modality.count=64",
            "backbone.depth=3", "backbone.width=32", "optim.warmup_steps=2", f"steps={steps}",
            "sampling.count=4", "sampling.steps=2", "tracker.kind=none"]


def tree_digest(root: Path, skip: set[Path] = frozenset()) -> dict[str, str]:
    """sha256 of every file under ``root`` (but ``skip``), by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p not in skip}


def same_state(a: dict, b: dict, where: str = "$") -> list[str]:
    """Paths where two checkpoint states differ (tensors bit for bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in same_state(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_state(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def training_state(state: dict) -> dict:
    """A checkpoint without what legitimately differs between processes: the stored config
    text (checkpoint/log settings may change on resume) and the global RNGs, which training
    does not use (it draws from generators seeded by ``(seed, step)``)."""
    return {k: v for k, v in state.items() if k not in ("config", "rng")}


def run_driver(mode: str, spec: dict, out: Path, timeout: float = 300) -> dict:
    """Run ``crash_driver.py mode`` on ``spec``; returns its summary (``out/summary.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(DRIVER), mode, str(out)], env=CHILD_ENV,
                          cwd=out, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(autouse=True)
def core_only(one_thread, monkeypatch):
    """One torch thread and only the core's plugin (the runs read the kit's ``toy_store``)."""
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


@pytest.fixture(scope="session")
def rel() -> types.SimpleNamespace:
    """The helpers above, for the test modules (conftest is not importable by them)."""
    return types.SimpleNamespace(
        tiny_overrides=tiny_overrides, tree_digest=tree_digest, same_state=same_state,
        training_state=training_state, run_driver=run_driver, child_env=CHILD_ENV, toy=TOY,
        checkpoint=checkpoint, cli=cli)
