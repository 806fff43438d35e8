"""benchmarks/policy.py: the three robotics policies differ only in method, and a tiny run
writes its scored results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("selfflow_robotics")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import policy  # noqa: E402

from selfflow_core.config.converter import make_converter, to_data  # noqa: E402
from selfflow_core.plugins.manager import Components  # noqa: E402


def _flat(data, prefix=""):
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_methods_differ_only_in_scheduler_and_teacher():
    args = argparse.Namespace(steps=100, episodes_train=20, eval_ema=0.995)
    conv = make_converter(Components())
    cfgs = {m: policy.make_config(m, 0, args, "runs/x", "data/x.zarr") for m in policy.METHODS}
    flat = {m: _flat(to_data(conv, c)) for m, c in cfgs.items()}
    assert cfgs["vanilla"].modalities["robotics"].scheduler.kind == "single"
    assert cfgs["dts"].modalities["robotics"].scheduler.kind == "dual"
    assert cfgs["dts"].teacher.kind == "none" and cfgs["selfflow"].teacher.kind == "ema"
    assert all(c.eval_ema_decay == 0.995 and c.steps == 100 for c in cfgs.values())

    def differing(a, b):
        return {k.split(".")[0] if k.startswith("teacher") else k
                for k in set(flat[a]) | set(flat[b]) if flat[a].get(k) != flat[b].get(k)}

    assert differing("dts", "selfflow") == {"teacher"}
    assert {k.rsplit(".", 1)[0] for k in differing("vanilla", "dts")} == {
        "modalities.robotics.scheduler"}


def test_a_tiny_run_is_scored(tmp_path):
    payload = policy.main(["--steps", "6", "--seeds", "1", "--methods", "vanilla,selfflow",
                           "--episodes-train", "4", "--episodes", "2", "--mse-episodes", "1",
                           "--jobs", "1", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    saved = json.loads((tmp_path / "policy.json").read_text())
    assert set(saved["summary"]) == {"vanilla", "selfflow"}
    for run in payload["runs"]:
        assert run["expert"]["success_rate"] == 1.0  # the scripted expert solves Reacher
        assert 0 <= run["success_rate"] <= 1 and run["action_mse"] > 0
        assert run["settings"]["rollout_episodes"] == 2
