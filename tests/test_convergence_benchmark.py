"""The ablation harness (benchmarks/convergence.py) on a tiny grid: every planned run once, the
summary equal to a reference computation over the runs, the training-length property, fixed
evaluators and the PNG figures."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import convergence  # noqa: E402
import evaluators  # noqa: E402

pytest.importorskip("selfflow_repa")
pytest.importorskip("selfflow_image")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    argv = ["--steps", "6", "--evals", "2", "--seeds", "2", "--sweep-seeds", "2",
            "--sweeps", "size,length,ema,mask", "--size", "2x16", "--sizes", "2x16,3x16",
            "--long-steps", "12", "--ema-decays", "0.9,0.99", "--ema-decays-no-warmup", "0.999",
            "--mask-ratios", "0.1,0.25", "--samples", "40", "--sample-steps", "2", "--jobs", "2",
            "--out", str(out), "--work", str(out / "work"),
            # the committed evaluators, read only: their hashes must still match
            "--assets", str(BENCH / "results" / "convergence_assets")]
    payload = convergence.main(argv)
    return out, payload


def test_every_planned_run_once_and_sweep_points_reuse_main_runs(grid):
    _, payload = grid
    runs = payload["runs"]
    keys = [r["key"] for r in runs]
    assert len(keys) == len(set(keys))
    # main 4 methods x 2 seeds; size 3x16 adds 2 methods x 2 seeds (2x16 is the main size);
    # length 2 x 2; ema: 0.9 warm-up and 0.999 no warm-up (0.99 warm-up is the main run) x 2;
    # mask 0.1 x 2 (0.25 is the image default)
    assert len(runs) == 8 + 4 + 4 + 4 + 2
    main_sf = [r for r in runs if "main" in r["groups"] and r["method"] == "selfflow"]
    assert all({"size", "ema", "mask"} <= set(r["groups"]) for r in main_sf)
    assert all(len(r["curve"]) == (4 if "length" in r["groups"] else
                                   2 if "main" in r["groups"] else 1) for r in runs)


def test_summary_equals_a_reference_computation(grid):
    _, payload = grid
    runs, summary = payload["runs"], payload["summary"]
    for method, s in summary["methods"].items():
        mine = [r for r in runs if "main" in r["groups"] and r["method"] == method]
        for i, (step, mean, std) in enumerate(s["fd_curve"]):
            fds = [r["curve"][i]["fd"] for r in mine]
            assert all(r["curve"][i]["step"] == step for r in mine)
            assert mean == pytest.approx(np.mean(fds))
            assert std == pytest.approx(np.std(fds, ddof=1))
    size = {(r["variant"], r["method"]): r for r in summary["sweeps"]["size"]}
    for variant in ("2x16", "3x16"):
        by_seed = {m: {r["seed"]: r["curve"][-1]["fd"] for r in runs
                       if r["groups"].get("size") == variant and r["method"] == m}
                   for m in ("vanilla", "selfflow")}
        gaps = [by_seed["selfflow"][s] - by_seed["vanilla"][s] for s in (0, 1)]
        row = size[(variant, "selfflow")]
        assert row["fd_gap_vs_vanilla"][0] == pytest.approx(statistics.fmean(gaps))
        assert row["fd_gap_vs_vanilla"][1] == pytest.approx(statistics.stdev(gaps))
        assert row["paired_seeds"] == 2
    assert [r["variant"] for r in summary["sweeps"]["ema"]] == [
        "decay 0.9, warm-up", "decay 0.99, warm-up", "decay 0.999, no warm-up"]


def test_a_long_run_passes_through_the_short_run(grid):
    """With a constant LR after warm-up the model at step s of a long run is the model of an
    s-step run, so the length sweep's curve must go through the main runs' final FD exactly."""
    _, payload = grid
    runs = payload["runs"]
    for r in (r for r in runs if "length" in r["groups"]):
        short = next(x for x in runs if "main" in x["groups"] and x["method"] == r["method"]
                     and x["seed"] == r["seed"])
        at = {c["step"]: c["fd"] for c in r["curve"]}
        assert at[6] == short["curve"][-1]["fd"]
        assert at[12] != at[6]  # and it goes on training


def test_results_and_figures_are_written(grid):
    out, payload = grid
    saved = json.loads((out / "convergence.json").read_text())
    assert saved["summary"]["vanilla_final_fd"] == payload["summary"]["vanilla_final_fd"]
    assert saved["protocol"]["fd"]["samples"] == 40
    assert saved["protocol"]["fd"]["extractor_sha256"] == payload["assets"]["fd_extractor"][
        "sha256"]
    pytest.importorskip("matplotlib")
    import matplotlib.image

    for name in ("convergence.png", "convergence_sweeps.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not a blank canvas


def test_steps_to_reach_interpolates_the_mean_curve():
    curve = [(10, 100.0, 1.0), (20, 60.0, 1.0), (30, 40.0, 1.0)]
    assert convergence.steps_to_reach(curve, 80.0) == pytest.approx(15.0)
    assert convergence.steps_to_reach(curve, 100.0) == 10.0
    assert convergence.steps_to_reach(curve, 39.0) is None


def test_evaluators_are_trained_once_and_guarded(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 8, 3, generator=g)
    tokens = centres[labels] + 0.3 * torch.randn(200, 8, 3, generator=g)
    folder = tmp_path / "toy"
    meta = evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels,
                                   extractor="conv", steps=60)
    assert meta["fd_extractor"]["heldout_acc"] > 0.9  # separable classes: far above 1/4
    assert meta["repa_encoder"]["heldout_acc"] > 0.9
    assert evaluators.sha256(folder / "fd_extractor.pt") == meta["fd_extractor"]["sha256"]
    mtime = (folder / "fd_extractor.pt").stat().st_mtime_ns
    again = evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels,
                                    extractor="conv", steps=60)
    assert again == meta and (folder / "fd_extractor.pt").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit, match="do not match"):
        evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, extractor="mlp",
                                steps=60)
    (folder / "repa_encoder.pt").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="do not match"):
        evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, extractor="conv",
                                steps=60)


def test_the_conv_extractor_is_translation_robust():
    torch.manual_seed(0)
    net = evaluators.ConvExtractor(32, 4, 3).eval()
    x = torch.zeros(1, 32, 4)
    x[0, 5:9] = torch.randn(4, 4)
    shifted = torch.roll(x, 12, dims=1)  # the same event, later in the sequence
    with torch.no_grad():
        a, b = net(x), net(shifted)
    assert torch.allclose(a, b, atol=1e-6)
    mlp = evaluators.FDExtractor(32, 4, 3).eval()
    with torch.no_grad():
        assert not torch.allclose(mlp(x), mlp(shifted), atol=1e-3)


@pytest.mark.parametrize("eval_ema", [0.0, 0.98])
def test_every_method_is_evaluated_on_the_same_kind_of_weights(eval_ema):
    setup = convergence.modality_setup("image", 0)
    cfgs = [convergence.make_config({
        "method": m, "setup": setup, "mask_ratio": 0.25 if m != "vanilla" else None,
        "ema_decay": 0.99 if m == "selfflow" else None, "ema_warmup": True, "size": (4, 64),
        "store": "x.zarr", "batch": 8, "lr": 1e-3, "steps": 10, "seed": 0, "run_dir": "r",
        "args": {"eval_ema": eval_ema}}) for m in ("vanilla", "dts", "selfflow")]
    assert {c.eval_ema_decay for c in cfgs} == {eval_ema or None}
    assert [c.teacher.kind for c in cfgs] == ["none", "none", "ema"]
    assert [c.modalities["data"].scheduler.kind for c in cfgs] == ["single", "dual", "dual"]
