"""The prompt-task harness (benchmarks/prompt_tasks.py) on the tiny presets: every method end to
end on both tasks, the summary against a reference computation over the runs, resuming, the
configs each method gets from the preset, and the aggregation against hand-computed values."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import prompt_tasks  # noqa: E402

from selfflow_core.testing.fixtures import selfflow_cache as selfflow_cache  # noqa: E402

pytest.importorskip("selfflow_repa")
pytest.importorskip("selfflow_image")
pytest.importorskip("selfflow_audio")

METHODS = ["vanilla", "dts", "selfflow", "repa"]


def tiny_argv(task: str, out: Path, *extra: str) -> list[str]:
    """A run of a few steps on the task's tiny preset, with the tiny evaluator and assets."""
    return ["--task", task, "--preset", f"{task}_debug_tiny", "--evaluator", "tiny",
            "--steps", "4", "--evals", "2", "--samples", "8", "--sample-steps", "2",
            "--reference", "32", "--probe-samples", "64", "--loss-samples", "16",
            "--asset-steps", "10", "--grid", "4", "--repa-hidden", "64", "--jobs", "2",
            "--out", str(out), "--work", str(out / "work"), "--assets", str(out / "assets"),
            *extra]


@pytest.fixture(scope="module")
def t2i(tmp_path_factory, selfflow_cache):
    out = tmp_path_factory.mktemp("prompt-t2i")
    argv = tiny_argv("t2i_words", out, "--seeds", "2", "--sweeps", "size,length",
                     "--sweep-seeds", "2", "--sizes", "1+3x32,1+1x16", "--long-steps", "8",
                     "--length-evals", "4")
    return out, argv, prompt_tasks.main(argv)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_runs(payload, metrics, methods, evals):
    for r in (r for r in payload["runs"] if "main" in r["groups"]):
        assert r["method"] in methods
        assert [c["step"] for c in r["curve"]] == evals
        for row in r["curve"]:
            for k in (*metrics, "fd", "probe_chance", "step_loss"):
                assert finite(row[k]), (r["method"], k, row.get(k))
            probes = [k for k in row if k.startswith("probe_acc/layer")]
            assert len(probes) == 4 and all(finite(row[k]) for k in probes)  # 1 + 3 blocks
        last = r["curve"][-1]
        flow = [k for k in last if k.startswith("flow_t/")]
        assert len(flow) == 6 and all(finite(last[k]) for k in flow)
        if len(r["curve"]) > 1:
            assert all(k not in r["curve"][0] for k in flow)  # only at the last step
        assert finite(r["train_s_per_step"]) and r["params"] > 0


def test_t2i_every_method_end_to_end(t2i):
    out, _, payload = t2i
    runs = payload["runs"]
    assert len({r["key"] for r in runs}) == len(runs)
    # main 4 x 2; size: 1+3x32 is the tiny preset's (the main runs), 1+1x16 adds 2 x 2;
    # length 2 x 2
    assert len(runs) == 8 + 4 + 4 and payload["runs_trained_now"] == 16
    check_runs(payload, ["exact_match", "char_accuracy"], METHODS, [2, 4])
    summary = payload["summary"]
    assert list(summary["methods"]) == METHODS
    assert summary["metrics"] == ["exact_match", "char_accuracy", "fd"]
    for m, s in summary["methods"].items():
        assert s["seeds"] == 2
        for k in summary["metrics"]:
            assert [c[0] for c in s["curves"][k]] == [2, 4]
            assert all(finite(v) for c in s["curves"][k] for v in c[1:])
            if m != "vanilla":
                assert s["gap_vs_vanilla"][k][2] == 2
                assert [g[0] for g in s["gap_curves_vs_vanilla"][k]] == [2, 4]
    sweeps = summary["sweeps"]
    assert {(r["variant"], r["method"]) for r in sweeps["size"]} == {
        (v, m) for v in ("1+1x16", "1+3x32") for m in ("selfflow", "vanilla")}
    assert all(r["paired_seeds"] == 2 for r in sweeps["size"] if r["method"] == "selfflow")
    assert [r["steps"] for r in sweeps["length"]] == [8, 8]
    assert all(len(r["char_accuracy_curve"]) == 4 for r in sweeps["length"])

    saved = json.loads((out / "prompt_tasks_t2i_words.json").read_text())
    assert saved["summary"]["vanilla_final"] == payload["summary"]["vanilla_final"]
    protocol = saved["protocol"]
    assert "evaluation EMA of every run" in protocol["evaluated_weights"]
    pm = protocol["prompt_metrics"]
    assert pm["evaluator"]["sha256"] == payload["evaluator"]["sha256"]
    assert set(pm["ceiling"]) == set(pm["chance"]) == {"exact_match", "char_accuracy"}
    assert protocol["fd"]["extractor_sha256"] == payload["assets"]["fd_extractor"]["sha256"]
    # text rendering: both assets are the 2-D conv networks over the image, their quality kept
    assert protocol["fd"]["extractor_architecture"] == "image_conv"
    assert protocol["repa"]["encoder_architecture"] == "image_conv"
    for k in ("extractor_heldout_acc", "extractor_train_acc"):
        assert 0 <= protocol["fd"][k] <= 1
    assert saved["assets"]["repa_encoder"]["architecture"] == "image_conv"
    assert saved["assets"]["repa_encoder"]["seconds"] > 0
    assert protocol["sampling"]["count"] == 8 and protocol["sampling"]["steps"] == 2
    # the sample grid: the same held-out prompts for every method, at the same step
    listings = {m: json.loads((out / "prompt_tasks_t2i_words_samples" / m / "prompts.json")
                              .read_text()) for m in METHODS}
    assert len({json.dumps(v) for v in listings.values()}) == 1
    assert list(listings["vanilla"].values()) == protocol["prompts"]["first"][:4]
    assert set(saved["sample_grid"]) == set(METHODS)
    pytest.importorskip("matplotlib")
    import matplotlib.image

    for name in ("prompt_tasks_t2i_words.png", "prompt_tasks_t2i_words_sweeps.png",
                 "prompt_tasks_t2i_words_samples.png"):
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01


def test_summary_equals_a_reference_computation(t2i):
    _, _, payload = t2i
    runs, summary = payload["runs"], payload["summary"]
    main = [r for r in runs if "main" in r["groups"]]
    base = {r["seed"]: r for r in main if r["method"] == "vanilla"}
    for method, s in summary["methods"].items():
        mine = sorted([r for r in main if r["method"] == method], key=lambda r: r["seed"])
        for k in summary["metrics"]:
            for i, (step, mean, std) in enumerate(s["curves"][k]):
                assert all(r["curve"][i]["step"] == step for r in mine)
                vals = [r["curve"][i][k] for r in mine]
                assert mean == pytest.approx(np.mean(vals))
                assert std == pytest.approx(np.std(vals, ddof=1))
            if method != "vanilla":
                gaps = [r["curve"][-1][k] - base[r["seed"]]["curve"][-1][k] for r in mine]
                mean, std, n = s["gap_vs_vanilla"][k]
                assert (mean, std, n) == (pytest.approx(statistics.fmean(gaps)),
                                          pytest.approx(statistics.stdev(gaps)), 2)
            target = summary["vanilla_final"][k]
            assert target == pytest.approx(np.mean([b["curve"][-1][k] for b in base.values()]))
            reach = common.steps_to_reach(s["curves"][k], target, higher_is_better=k != "fd")
            assert s["steps_to_vanilla_final"][k] == reach
            assert s["fewer_steps_vs_vanilla"][k] == (4 / reach if reach else None)


def test_resume_skips_finished_runs(t2i):
    out, argv, payload = t2i
    again = prompt_tasks.main([*argv, "--resume"])
    assert again["runs_trained_now"] == 0  # every run was done: no training
    assert sorted(json.dumps(r["curve"]) for r in again["runs"]) == sorted(
        json.dumps(r["curve"]) for r in payload["runs"])
    assert json.dumps(again["summary"]) == json.dumps(payload["summary"])
    # a run missing from the partial file is the only one trained again
    (partial,) = (out / "work").glob("partial-*.jsonl")
    lines = partial.read_text().splitlines()
    dropped = json.loads(lines[-1])
    partial.write_text("\n".join(lines[:-1]) + "\n")
    third = prompt_tasks.main([*argv, "--resume", "--jobs", "1"])  # (in this process)
    assert third["runs_trained_now"] == 1
    redone = next(r for r in third["runs"] if r["key"] == dropped["key"])
    assert redone["curve"][-1]["fd"] == pytest.approx(dropped["curve"][-1]["fd"], rel=1e-4)
    # other evaluation settings: another partial file, nothing reused
    assert len(list((out / "work").glob("partial-*.jsonl"))) == 1


def test_t2a_every_method_end_to_end(tmp_path, selfflow_cache):
    argv = tiny_argv("t2a_words", tmp_path, "--seeds", "1", "--steps", "3", "--evals", "1",
                     "--sweeps", "none", "--grid", "2", "--jobs", "1",
                     "--methods", "vanilla,dts,selfflow,repa,repa_label_free")
    payload = prompt_tasks.main(argv)
    metrics = ["word_acc", "pitch_acc", "speed_acc"]
    check_runs(payload, metrics, [*METHODS, "repa_label_free"], [3])
    summary = payload["summary"]
    assert list(summary["methods"]) == [*METHODS, "repa_label_free"]
    assert summary["primary"] == "word_acc" and summary["sweeps"] == {}
    pm = payload["protocol"]["prompt_metrics"]
    assert set(pm["ceiling"]) == set(metrics)
    assert pm["chance"]["pitch_acc"] == pm["chance"]["speed_acc"] == 0.5
    assert "label_free_encoder_sha256" in payload["protocol"]["repa"]
    assert (tmp_path / "prompt_tasks_t2a_words_samples" / "selfflow" / "spectrograms.png").is_file()


# ---- configs -------------------------------------------------------------------------------------

def job(method: str, **changes) -> dict:
    return {"task": "t2i_words", "preset": "", "method": method, "seed": 3, "steps": 10,
            "size": (3, 2, 128), "store": "words.zarr", "batch": 0, "lr": 0.0,
            "repa_hidden": 0, "run_dir": "r", "encoder": str(BENCH / "prompt_tasks.py"),
            "encoder_sha256": "", "encoder_label_free": "", "encoder_label_free_sha256": "",
            **changes}


def test_each_method_is_the_preset_with_its_scheduler_and_teacher(monkeypatch):
    from selfflow_image import presets

    preset = presets.t2i_words()
    cfgs = {m: prompt_tasks.make_config(job(m)) for m in METHODS}
    assert [c.modalities["image"].scheduler.kind for c in cfgs.values()] == [
        "single", "dual", "dual", "single"]
    assert [c.teacher.kind for c in cfgs.values()] == ["none", "none", "ema", "repa"]
    assert cfgs["selfflow"].teacher == preset.teacher
    assert cfgs["selfflow"].modalities["image"].scheduler == preset.modalities["image"].scheduler
    assert cfgs["dts"].modalities["image"].scheduler == preset.modalities["image"].scheduler
    assert cfgs["vanilla"].modalities["image"].scheduler.distribution == \
        preset.modalities["image"].scheduler.distribution
    assert [c.objective.gamma for c in cfgs.values()] == [0.8, 0.8, 0.8, 0.5]
    for c in cfgs.values():  # the same evaluation EMA (the preset's) for every method
        assert (c.eval_ema_decay, c.eval_ema_warmup) == (preset.eval_ema_decay,
                                                         preset.eval_ema_warmup)
        assert c.optim == preset.optim and c.text_encoder == preset.text_encoder
        assert c.backbone == preset.backbone and c.caption_dropout == preset.caption_dropout
        assert (c.seed, c.steps, c.threads, c.modalities["image"].store) == (3, 10, 1,
                                                                               "words.zarr")
        assert c.modalities["image"].batch_size == 32
    small = prompt_tasks.make_config(job("vanilla", size=(1, 1, 48), batch=8, lr=3e-4))
    assert (small.backbone.double_blocks, small.backbone.single_blocks, small.backbone.width,
            small.backbone.axes_dim) == (1, 1, 48, (6, 6))
    assert (small.objective.student_layer, small.objective.teacher_layer) == (1, 2)
    assert small.modalities["image"].batch_size == 8 and small.optim.lr == 3e-4
    # a change of the preset's recipe reaches every run
    import attrs

    changed = attrs.evolve(preset, caption_dropout=0.3, eval_ema_decay=0.99)
    monkeypatch.setattr(presets, "t2i_words", lambda: changed)
    again = prompt_tasks.make_config(job("dts"))
    assert (again.caption_dropout, again.eval_ema_decay) == (0.3, 0.99)


def test_sizes_keep_heads_and_rope_axes():
    from selfflow_audio.presets import t2a_words
    from selfflow_image.presets import t2i_words

    assert prompt_tasks.parse_size("2+6x96") == (2, 6, 96)
    assert prompt_tasks.size_text((2, 6, 96)) == "2+6x96"
    image, audio = t2i_words().backbone, t2a_words().backbone
    assert prompt_tasks.mmdit_of(image, (2, 6, 96)).axes_dim == (12, 12)
    assert prompt_tasks.mmdit_of(audio, (1, 1, 48)).axes_dim == (12,)
    for task in prompt_tasks.TASKS.values():  # every default sweep size is buildable
        base = prompt_tasks.preset_config(task).backbone
        sizes = [prompt_tasks.parse_size(s) for s in task.sizes.split(",")]
        assert len(set(sizes)) >= 4
        assert prompt_tasks.preset_size(prompt_tasks.preset_config(task)) in sizes
        for s in sizes:
            prompt_tasks.mmdit_of(base, s)
    with pytest.raises(SystemExit, match="even RoPE axes"):
        prompt_tasks.mmdit_of(image, (1, 1, 40))  # head dim 10: 5 + 5, odd


# ---- aggregation by hand -------------------------------------------------------------------------

def test_steps_to_reach_in_both_directions():
    rising = [(100, 0.10, 0.0), (200, 0.30, 0.0), (300, 0.50, 0.0)]
    assert common.steps_to_reach(rising, 0.20, higher_is_better=True) == pytest.approx(150.0)
    assert common.steps_to_reach(rising, 0.45, higher_is_better=True) == pytest.approx(275.0)
    assert common.steps_to_reach(rising, 0.05, higher_is_better=True) == 100.0  # at once
    assert common.steps_to_reach(rising, 0.60, higher_is_better=True) is None
    # lower is better (FD): the old behaviour, the default
    falling = [(10, 100.0, 1.0), (20, 60.0, 1.0), (30, 40.0, 1.0)]
    assert common.steps_to_reach(falling, 80.0) == pytest.approx(15.0)
    assert common.steps_to_reach(falling, 39.0) is None
    # a rising curve never "reaches" a lower-is-better target below its start
    assert common.steps_to_reach(rising, 0.05) is None
    # pairs (step, value) work as well as (step, mean, std)
    assert common.steps_to_reach([(1, 0.0), (3, 1.0)], 0.5, higher_is_better=True) == 2.0


def test_mean_spread_and_paired_gaps_by_hand():
    assert common.mean_spread([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3),
                                                   pytest.approx(math.sqrt(7 / 3)))
    assert common.mean_spread([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in common.mean_spread([None, float("nan")]))
    runs = [{"seed": 0, "v": 0.5}, {"seed": 1, "v": 0.7}, {"seed": 2, "v": 0.4}]
    base = [{"seed": 0, "v": 0.2}, {"seed": 1, "v": 0.6}, {"seed": 5, "v": 0.0}]
    # pairs: seed 0 (+0.3) and seed 1 (+0.1); seeds 2 and 5 have no partner
    m, sd, n = common.paired_gaps(runs, base, lambda r: r["v"])
    assert (m, sd, n) == (pytest.approx(0.2), pytest.approx(math.sqrt(0.02)), 2)


def fake(method: str, seed: int, values: list[float], fd: list[float]) -> dict:
    return {"key": f"{method}-{seed}", "method": method, "seed": seed, "groups": {"main": ""},
            "steps": 300, "size": [1, 4, 64], "params": 10, "train_s_per_step": 0.1,
            "curve": [{"step": s, "acc": v, "fd": f, "probe_acc/layer1": 0.1 * seed,
                       "probe_chance": 0.05} for s, v, f in zip((100, 200, 300), values, fd)]}


def test_summarize_by_hand():
    import argparse

    runs = [fake("vanilla", 0, [0.1, 0.2, 0.3], [90, 80, 70]),
            fake("vanilla", 1, [0.1, 0.3, 0.5], [90, 70, 50]),
            fake("selfflow", 0, [0.2, 0.5, 0.6], [80, 60, 40]),
            fake("selfflow", 1, [0.4, 0.5, 0.7], [70, 50, 30])]
    args = argparse.Namespace(methods=["vanilla", "selfflow"], primary="acc")
    s = prompt_tasks.summarize(runs, args, ["acc", "fd"])
    assert s["vanilla_final"] == {"acc": pytest.approx(0.4), "fd": pytest.approx(60.0)}
    sf = s["methods"]["selfflow"]
    # mean curve 0.3, 0.5, 0.65: reaches 0.4 half-way between steps 100 and 200
    assert sf["curves"]["acc"][0][1:] == (pytest.approx(0.3), pytest.approx(math.sqrt(0.02)))
    assert sf["steps_to_vanilla_final"]["acc"] == pytest.approx(150.0)
    assert sf["fewer_steps_vs_vanilla"]["acc"] == pytest.approx(2.0)
    assert sf["reached_at_first_eval"]["acc"] is False
    # FD mean curve 75, 55, 35: reaches 60 at 100 + 100 * 15 / 20 = 175
    assert sf["steps_to_vanilla_final"]["fd"] == pytest.approx(175.0)
    assert sf["fewer_steps_vs_vanilla"]["fd"] == pytest.approx(300 / 175)
    # paired gaps at the last step: +0.3, +0.2 (acc); -30, -20 (fd)
    assert sf["gap_vs_vanilla"]["acc"] == (pytest.approx(0.25), pytest.approx(math.sqrt(0.005)),
                                           2)
    assert sf["gap_vs_vanilla"]["fd"][:2] == (pytest.approx(-25.0),
                                              pytest.approx(math.sqrt(50.0)))
    assert sf["gap_curves_vs_vanilla"]["acc"][0][:2] == (100, pytest.approx(0.2))
    # per seed, against that seed's vanilla: seed 0 reaches 0.3 at 100 + 100 * 0.1 / 0.3
    # (ratio 300 / 133.3 = 2.25); seed 1 reaches 0.5 at 200 (ratio 1.5)
    per = sf["fewer_steps_per_seed"]["acc"]
    assert per["reached"] == per["seeds"] == 2
    assert per["ratio"][0] == pytest.approx((2.25 + 1.5) / 2)
    # vanilla reaches its own final value at its last step: 1x
    assert s["methods"]["vanilla"]["fewer_steps_vs_vanilla"]["acc"] == pytest.approx(1.0)
    assert s["methods"]["vanilla"]["gap_vs_vanilla"] == {}
    assert s["methods"]["selfflow"]["probe_curves"]["layer1"][-1][1] == pytest.approx(0.05)


def test_text_rendering_assets_learn_the_words_letters():
    import torch
    from evaluators import jaccard
    from prompt_tasks import TASKS, asset_targets, letters_of, probe_targets
    from selfflow_image.words import VOCABULARY

    cat, moon = VOCABULARY.index("cat"), VOCABULARY.index("moon")
    got = letters_of(np.array([cat, moon]))
    assert got.shape == (2, 26) and got[0].sum() == 3 and got[1].sum() == 3  # m, o, n
    assert got[0, [2, 0, 19]].tolist() == [1, 1, 1] and got[1, ord("o") - 97] == 1
    task = TASKS["t2i_words"]
    assert asset_targets(task, np.array([cat])).dtype == torch.float32
    assert probe_targets(task, np.array([cat, moon])).tolist() == [2, 12]   # c, m
    assert asset_targets(TASKS["t2a_words"], np.array([3])).tolist() == [3]
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    true = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    assert jaccard(pred, true) == pytest.approx((1 / 3 + 1 + 1) / 3)


def test_assets_train_on_multi_hot_targets(tmp_path):
    import torch
    from evaluators import build_assets

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, 6, generator=g) < 0.3).float()
    x = torch.randn(400, 4, 6, generator=g) * 0.1 + y[:, None, :]   # the targets, in plain sight
    meta = build_assets(tmp_path, {"task": "test"}, x, y, extractor="conv", steps=300)
    assert meta["fd_extractor"]["heldout_acc"] > 0.8 and meta["repa_encoder"]["heldout_acc"] > 0.8


# ---- the image networks of the text-rendering assets ---------------------------------------------

def words_adapter(patch=4):
    """The preset's image adapter, with 4x4 patches by default (64 tokens: room to check the
    receptive field); the preset's own 8x8 patches are checked too."""
    import attrs
    from selfflow_image.presets import t2i_words

    return attrs.evolve(t2i_words().modalities["image"].modality, patch=patch).build()


def test_image_networks_read_the_adapters_image():
    import torch
    from evaluators import FD_FEATURES, REPA_FEATURES, ImageConvEncoder, ImageConvExtractor

    adapter = words_adapter()
    n, c = adapter.num_tokens, adapter.token_dim
    assert (n, c) == (64, 48)
    tokens = torch.randn(3, n, c, generator=torch.Generator().manual_seed(0))
    fd = ImageConvExtractor(n, c, 26, adapter.unpatchify).eval()
    enc = ImageConvEncoder(n, c, 26, adapter.unpatchify).eval()
    for net in (fd, enc):  # the un-patchify round trip: the adapter's very image
        assert torch.equal(net.conv.image(tokens), adapter.unpatchify(tokens))
        assert torch.equal(net.conv.image(adapter.patchify(adapter.unpatchify(tokens))),
                           adapter.unpatchify(tokens))
    assert fd(tokens).shape == (3, FD_FEATURES)
    assert enc(tokens).shape == (3, n, REPA_FEATURES)
    assert enc.pooled(tokens).shape == (3, REPA_FEATURES)
    big = words_adapter(patch=8)  # the preset's: 8x8 patches need a third pool
    tokens = torch.randn(2, big.num_tokens, big.token_dim)
    for net in (ImageConvExtractor(big.num_tokens, big.token_dim, 26, big.unpatchify),
                ImageConvEncoder(big.num_tokens, big.token_dim, 26, big.unpatchify)):
        assert torch.equal(net.conv.image(tokens), big.unpatchify(tokens))
    assert ImageConvEncoder(big.num_tokens, big.token_dim, 26, big.unpatchify).eval()(
        tokens).shape == (2, big.num_tokens, REPA_FEATURES)


def test_image_encoder_feature_of_a_token_comes_from_its_patch():
    """Changing the pixels of one patch of the image (cut into tokens by the adapter) changes
    the encoder's feature of that patch's token and of no token further than its receptive
    field (two patches) away, wherever the patch is: the features are in the tokens' order."""
    import torch
    from evaluators import ImageConvEncoder

    adapter = words_adapter()
    torch.manual_seed(0)
    enc = ImageConvEncoder(adapter.num_tokens, adapter.token_dim, None, adapter.unpatchify)
    enc.eval()
    pos = adapter.positions(1)[0]  # (row, col) of every token on the grid
    p = adapter.config.patch
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    base = enc(adapter.patchify(image))
    for r, col in [(0, 7), (7, 0), (3, 5), (0, 0), (7, 7)]:
        changed = image.clone()
        changed[..., r * p:(r + 1) * p, col * p:(col + 1) * p] = torch.rand(
            1, 3, p, p, generator=g) * 2 - 1
        moved = (enc(adapter.patchify(changed)) - base).abs().amax(-1) > 1e-6  # [1, N]
        dist = (pos - torch.tensor([r, col], dtype=pos.dtype)).abs().amax(-1)
        own = int(torch.nonzero(dist == 0))
        assert moved[0, own], (r, col)
        assert not moved[0, dist > 2].any(), (r, col)
        assert moved[0].sum() > 1  # its neighbours see it too


def test_image_networks_refuse_a_layout_that_is_not_patches():
    import torch
    from evaluators import ImageConvEncoder, make_net

    with pytest.raises(ValueError, match="square patches"):  # tokens as chunks of the raw array
        ImageConvEncoder(64, 48, None, lambda t: t.reshape(len(t), 3, 32, 32))
    with pytest.raises(ValueError, match="unpatchify"):
        make_net(ImageConvEncoder, 64, 48, None)
    assert make_net(ImageConvEncoder, 64, 48, None, words_adapter().unpatchify)(
        torch.zeros(1, 64, 48)).shape == (1, 64, 32)


def test_image_assets_learn_multi_hot_targets_in_plain_sight(tmp_path):
    import torch
    from evaluators import build_assets

    from selfflow_core.tokens import patchify, unpatchify

    def unpatch(t):
        return unpatchify(t, (2, 2), (3, 8, 8))

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, 6, generator=g) < 0.3).float()
    marks = torch.randn(6, 3, 8, 8, generator=g)
    images = torch.einsum("bk,kchw->bchw", y, marks) + 0.1 * torch.randn(400, 3, 8, 8,
                                                                         generator=g)
    x = patchify(images, (2, 2))
    meta = build_assets(tmp_path, {"task": "test"}, x, y, extractor="image_conv",
                        encoder="image_conv", steps=200, unpatchify=unpatch, label_free=True)
    for k in ("fd_extractor", "repa_encoder"):
        assert meta[k]["heldout_acc"] > 0.8 and meta[k]["train_acc"] > 0.8, meta[k]
        assert meta[k]["architecture"] == "image_conv" and meta[k]["seconds"] > 0
    assert meta["spec"]["encoder"] == "image_conv"
    # the label-free encoder: the same architecture, trained without the labels
    assert meta["repa_encoder_label_free"]["architecture"] == "ImageConvEncoder"
    # the same folder with the token encoder: other assets, refused rather than reused
    with pytest.raises(SystemExit, match="do not match"):
        build_assets(tmp_path, {"task": "test"}, x, y, extractor="image_conv", steps=200,
                     unpatchify=unpatch)
