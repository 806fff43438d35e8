"""Representation diagnostics: effective rank, spread, linear probes, loss by timestep, and the
training hook. Each property can fail (wrong formula, leaked labels, buckets that overlap)."""

import itertools
import math

import attrs
import pytest
import torch
from torch import nn

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.eval.diagnostics import (
    DiagnosticsHook,
    bucket_means,
    effective_rank,
    feature_spread,
    hidden_features,
    linear_probe,
    loss_by_timestep,
    objective_metrics,
    pool,
    probe_layers,
)
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.testing import TINY_TOY, randomize_parameters
from selfflow_core.timesteps import SingleTimestep
from selfflow_core.types import BackboneOutput, TokenBatch

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(tokens, labels=None):
    b, n = tokens.shape[:2]
    pos = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    return TokenBatch.single(tokens, pos, labels=labels)


# ---- effective rank and spread ----------------------------------------------------------------

def test_effective_rank_isotropic_is_about_the_dimension():
    g = torch.Generator().manual_seed(0)
    d = 16
    r = effective_rank(torch.randn(20000, d, generator=g))
    assert 0.97 * d < r <= d


def test_effective_rank_of_low_rank_features():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(500, 1, generator=g) @ torch.randn(1, 32, generator=g)  # rank 1
    assert effective_rank(x1) == pytest.approx(1.0, abs=1e-4)
    x3 = torch.randn(5000, 3, generator=g) @ torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T
    assert effective_rank(x3) == pytest.approx(3.0, rel=0.03)
    assert effective_rank(torch.ones(10, 4)) == 0.0  # constant features: fully collapsed


def test_feature_spread_flags_collapse():
    g = torch.Generator().manual_seed(2)
    spread = feature_spread(torch.randn(4000, 8, generator=g))
    assert spread["std"] == pytest.approx(1.0, rel=0.05)
    assert spread["std_normalized"] == pytest.approx(1.0, rel=0.1)
    one_direction = torch.rand(100, 1, generator=g) * torch.randn(1, 8, generator=g).abs()
    assert feature_spread(one_direction)["std_normalized"] < 1e-6


# ---- linear probe ------------------------------------------------------------------------------

def test_probe_is_perfect_on_linearly_separable_features():
    g = torch.Generator().manual_seed(3)
    k, d = 5, 12
    centers = torch.randn(k, d, generator=g) * 4
    y = torch.randint(0, k, (600,), generator=g)
    x = centers[y] + 0.5 * torch.randn(600, d, generator=g)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert res["acc"] > 0.98 and res["train_acc"] > 0.98


def test_probe_is_chance_on_random_labels():
    g = torch.Generator().manual_seed(4)
    k = 4
    x = torch.randn(4000, 16, generator=g)
    y = torch.randint(0, k, (4000,), generator=g)
    res = linear_probe(x[:3000], y[:3000], x[3000:], y[3000:])
    assert abs(res["acc"] - 1 / k) < 0.05
    assert res["majority"] < 0.3


def test_pool_ignores_masked_tokens():
    f = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[True, False, True, False]])
    assert torch.equal(pool(f, mask), (f[0, 0] + f[0, 2])[None] / 2)


# ---- probes on a backbone ---------------------------------------------------------------------

def test_probe_layers_reads_the_data_not_the_given_label():
    """Tokens that carry no class information: a probe of the label-conditioned features would
    read the label back (~1), the null-class features it may not (~chance)."""
    torch.manual_seed(0)
    net = randomize_parameters(DiT.Config(depth=2, width=32, heads=4).build(
        token_dims=[4], num_classes=4), seed=0, std=0.3)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (400,), generator=g)
    b = batch_of(torch.randn(400, 6, 4, generator=g), labels)
    out = probe_layers(net, b, layers=[1, 2])
    assert set(out) >= {"probe_acc/layer1", "probe_acc/layer2", "erank/layer2",
                        "feat_std/layer1", "feat_std_norm/layer2", "probe_chance"}
    assert out["probe_acc/layer2"] < 0.45
    cond = hidden_features(net, b, layers=[2], unconditional=False)[2]
    leaked = linear_probe(pool(cond, b.target_mask)[:280], labels[:280],
                          pool(cond, b.target_mask)[280:], labels[280:])
    assert leaked["acc"] > 0.9


def test_probe_layers_finds_class_information_in_the_tokens():
    torch.manual_seed(0)
    net = randomize_parameters(DiT.Config(depth=2, width=32, heads=4).build(
        token_dims=[4], num_classes=0), seed=1, std=0.3)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (300,), generator=g)
    means = torch.randn(3, 4, generator=g) * 2
    tokens = means[labels][:, None, :] + 0.3 * torch.randn(300, 6, 4, generator=g)
    out = probe_layers(net, batch_of(tokens), labels, layers=[1, 2])
    assert out["probe_acc/layer1"] > 0.9
    assert "probe_acc/layer1" not in probe_layers(net, batch_of(tokens), layers=[1])  # no labels


def test_hidden_features_leave_the_backbone_as_it_was():
    net = DiT.Config(depth=2, width=32, heads=4).build(token_dims=[4], num_classes=0).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hidden_features(net, batch_of(torch.randn(5, 3, 4)), layers=[1], t=0.5)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---- loss by timestep -------------------------------------------------------------------------

def test_buckets_partition_the_values():
    g = torch.Generator().manual_seed(7)
    t = torch.rand(1000, generator=g)
    t[:3] = torch.tensor([0.0, 1.0, 0.4])  # edges: 0 -> first bucket, 1 -> last, 0.4 -> third
    values = torch.randn(1000, generator=g)
    means, counts = bucket_means(values, t, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert counts.sum() == 1000
    assert (float((means * counts).sum() / counts.sum())
            == pytest.approx(float(values.double().mean())))
    for j, (lo, hi) in enumerate(zip([0, 0.2, 0.4, 0.6, 0.8], [0.2, 0.4, 0.6, 0.8, 1.01])):
        inside = (t >= lo) & (t < hi)
        assert counts[j] == inside.sum()
        assert float(means[j]) == pytest.approx(float(values[inside].double().mean()))


class ScaledInput(nn.Module):
    """Velocity = x_t. With clean tokens 0: x_t = t * noise, target = noise, so the per-token
    error is (1 - t)^2 * noise^2 and the loss in bucket [a, b] is the mean of (1 - t)^2."""

    depth, width, num_classes = 1, 4, 0

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
        return BackboneOutput(velocity=x + 0 * self.p, features={})


def test_loss_by_timestep_matches_the_closed_form():
    b = batch_of(torch.zeros(2000, 8, 4))
    out = loss_by_timestep(ScaledInput(), b, buckets=5)
    edges = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    expect = [((1 - a) ** 3 - (1 - c) ** 3) / (3 * (c - a)) for a, c in itertools.pairwise(edges)]
    got = [out[f"flow_t/{a:.1f}-{c:.1f}"] for a, c in itertools.pairwise(edges)]
    assert got == pytest.approx(expect, rel=0.08, abs=2e-3)
    assert got == sorted(got, reverse=True)
    assert out["flow_t/all"] == pytest.approx(sum(got) / 5, rel=1e-6)  # equal-size buckets
    assert out["flow_t/all"] == pytest.approx(1 / 3, rel=0.05)


# ---- during training --------------------------------------------------------------------------

def toy_config(tmp_path, store, **changes):
    """A tiny toy run on ``store`` (the kit's ``toy_store``, read-only: no source)."""
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], batch_size=8, modality=TINY_TOY, store=store,
                        source="")
    return attrs.evolve(base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32,
                        heads=4), tracker=NullTracker.Config(), steps=4, log_every=2,
                        sampling=attrs.evolve(base.sampling, count=2, steps=1),
                        run_dir=str(tmp_path / "run"), **changes)


def test_hook_logs_reports_and_does_not_change_training(tmp_path, toy_store, core_components):
    from selfflow_core.trainer import Trainer

    adapter = TINY_TOY.build()
    arrays = adapter.encode(adapter.open_source("waves").read(0, 40))
    probe_batch = adapter.tokenize({k: torch.from_numpy(v) for k, v in arrays.items()})
    hook = DiagnosticsHook(probe_batch, every=2, layers=[1, 2, 3])
    plain = Trainer(toy_config(tmp_path / "a", toy_store), progress=False,
                    components=core_components)
    plain.fit()
    watched = Trainer(toy_config(tmp_path / "b", toy_store), progress=False,
                      components=Components(make_plugin_manager([hook], entry_points=False)))
    watched.fit()
    assert plain.losses == watched.losses
    assert [s for s, _ in hook.results] == [2, 4]
    report = hook.results[-1][1]
    assert 0 <= report["probe_acc/layer2"] <= 1 and report["erank/layer1"] >= 1
    assert all(math.isfinite(v) for v in report.values())
    metrics = objective_metrics(watched.model, watched.teacher, probe_batch,
                                SingleTimestep.Config().build())
    assert set(metrics) >= {"flow", "rep", "feature_cos", "loss"}
    assert -1 <= metrics["feature_cos"] <= 1
