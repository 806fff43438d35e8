"""Time distributions, the dual-timestep plan, the time shift and the flow path's convention."""

import numpy as np
import pytest
import torch
from scipy import stats

from selfflow_core.flow import interpolate, shift_time, velocity_target
from selfflow_core.timesteps import DualTimestep, LogitNormal, SingleTimestep, Uniform
from selfflow_core.types import TokenBatch

DISTRIBUTIONS = {
    "uniform": Uniform.Config(),
    "logit_normal": LogitNormal.Config(),
    "logit_normal_shift3": LogitNormal.Config(mean=0.2, std=0.8, shift=3.0),
    "logit_normal_shift0.75": LogitNormal.Config(shift=0.75),
    "logit_normal_video": LogitNormal.Config(shift=2.95, tail_fraction=0.05),
    "logit_normal_big_tail": LogitNormal.Config(shift=1.5, tail_fraction=0.3),
}


def batch(b, n, condition=None):
    return TokenBatch.single(torch.zeros(b, n, 2), torch.zeros(b, n, 1), condition=condition)


def cdf_of(dist):
    return lambda x: dist.cdf(torch.as_tensor(x, dtype=torch.float64)).numpy()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_distribution_samples_follow_its_cdf(name):
    dist = DISTRIBUTIONS[name].build()
    x = dist.sample(20000, generator=gen()).double().numpy()
    assert ((x >= 0) & (x <= 1)).all()
    assert stats.kstest(x, cdf_of(dist)).pvalue > 1e-3


def test_ks_check_has_power():
    """The KS checks above would notice a wrong shift or a missing tail."""
    x = LogitNormal.Config(shift=3.0).build().sample(20000, generator=gen()).double().numpy()
    assert stats.kstest(x, cdf_of(LogitNormal.Config(shift=2.5).build())).pvalue < 1e-6
    assert stats.kstest(x, cdf_of(LogitNormal.Config(shift=1 / 3).build())).pvalue < 1e-6
    x = LogitNormal.Config(tail_fraction=0.05).build().sample(20000, generator=gen()).numpy()
    assert stats.kstest(x, cdf_of(LogitNormal.Config().build())).pvalue < 1e-6


def test_tail_fraction_puts_that_mass_in_the_last_five_percent():
    cfg = LogitNormal.Config(mean=-2.0, std=0.5, tail_fraction=0.05)   # base mass above .95 ~ 0
    x = cfg.build().sample(40000, generator=gen()).numpy()
    frac = (x >= 0.95).mean()
    assert abs(frac - 0.05) < 4 * np.sqrt(0.05 * 0.95 / 40000)


@pytest.mark.parametrize("scheduler", ["dual", "single"])
@pytest.mark.parametrize("name", ["uniform", "logit_normal_shift3", "logit_normal_video"])
def test_per_token_marginal_is_p_t(scheduler, name):
    """Every token's student time is distributed as p(t) (t, s i.i.d. and the mask independent of
    them), so training sees the same marginal as homogeneous inference."""
    cfg = DISTRIBUTIONS[name]
    sched = (DualTimestep.Config(distribution=cfg, mask_ratio=0.25) if scheduler == "dual"
             else SingleTimestep.Config(distribution=cfg)).build()
    plan = sched.plan(batch(12000, 4), generator=gen(1))
    dist = cfg.build()
    for token in (0, 3):        # one token per sample: independent draws
        x = plan.student_t[:, token].double().numpy()
        assert stats.kstest(x, cdf_of(dist)).pvalue > 1e-3
    if scheduler == "dual":
        # the teacher's time is the min of two i.i.d. draws: CDF 1 - (1 - F)^2
        x = plan.teacher_t[:, 0].double().numpy()
        assert stats.kstest(x, lambda v: 1 - (1 - cdf_of(dist)(v)) ** 2).pvalue > 1e-3
        assert stats.kstest(x, cdf_of(dist)).pvalue < 1e-6


def test_sorted_times_would_fail_the_marginal_check():
    """Power check: a plan that always gives masked tokens the noisier time is not p(t) (with a
    mask ratio below one half)."""
    plan = DualTimestep.Config(mask_ratio=0.25).build().plan(batch(12000, 4), generator=gen(1))
    t = plan.student_t
    hi = t.max(dim=1).values
    lo = t.min(dim=1).values
    sorted_t = torch.where(plan.masked, hi[:, None], lo[:, None])
    both = plan.masked.any(1) & (~plan.masked).any(1)
    x = sorted_t[both][:, 0].double().numpy()
    assert stats.kstest(x, cdf_of(Uniform())).pvalue < 1e-6


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_mask_fraction_is_mask_ratio(ratio):
    plan = DualTimestep.Config(mask_ratio=ratio).build().plan(batch(200, 64), generator=gen(2))
    n = plan.masked.numel()
    frac = plan.masked.float().mean().item()
    assert abs(frac - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / n)
    # i.i.d. per token: the count per sample varies (it is not a fixed number of tokens)
    per_sample = plan.masked.sum(1).float()
    assert per_sample.std() > 0.5 * np.sqrt(64 * ratio * (1 - ratio))


def test_mask_ratio_zero_is_vanilla():
    plan = DualTimestep.Config(mask_ratio=0.0).build().plan(batch(50, 16), generator=gen())
    assert not plan.masked.any()
    assert (plan.student_t == plan.student_t[:, :1]).all()


def dual_plan(b=400, n=32, ratio=0.25, seed=3, **kw):
    sched = DualTimestep.Config(mask_ratio=ratio, **kw).build()
    return sched.plan(batch(b, n), generator=gen(seed))


def test_two_times_per_sample_and_teacher_takes_the_cleaner():
    plan = dual_plan()
    st, tt, m = plan.student_t, plan.teacher_t, plan.masked
    both = m.any(1) & (~m).any(1)
    assert both.float().mean() > 0.9
    for i in torch.nonzero(both).flatten().tolist():
        s_vals, t_vals = st[i][m[i]].unique(), st[i][~m[i]].unique()
        assert len(s_vals) == 1 and len(t_vals) == 1, "masked tokens share s, the others share t"
        assert (tt[i] == torch.minimum(s_vals, t_vals)).all()
    # teacher time: constant per sample and never noisier than the student's, token by token
    assert (tt == tt[:, :1]).all()
    assert (tt <= st).all()
    assert torch.equal(tt, torch.minimum(st, st.min(dim=1, keepdim=True).values))


def test_t_and_s_are_unsorted():
    """Masked tokens get the noisier time in about half the samples and the cleaner in the rest."""
    plan = dual_plan(b=2000, n=32)
    m = plan.masked
    both = m.any(1) & (~m).any(1)
    s = plan.student_t.masked_fill(~m, -1).max(1).values[both]
    t = plan.student_t.masked_fill(m, -1).max(1).values[both]
    frac = (s > t).float().mean().item()
    k = int(both.sum())
    assert 0 < frac < 1
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / k)


def test_same_seed_same_plan_and_different_seed_different_plan():
    a, b, c = dual_plan(seed=7), dual_plan(seed=7), dual_plan(seed=8)
    for f in ("student_t", "teacher_t", "masked"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.student_t, c.student_t)
    assert not torch.equal(a.masked, c.masked)


@pytest.mark.parametrize("kind", ["dual", "single"])
def test_conditioning_tokens_are_held_clean(kind):
    b, n = 64, 16
    cond = torch.zeros(b, n, dtype=torch.bool)
    cond[:, :3] = True
    cfg = (DualTimestep.Config(mask_ratio=0.5) if kind == "dual" else SingleTimestep.Config())
    plan = cfg.build().plan(batch(b, n, condition=cond), generator=gen(4))
    assert (plan.student_t[cond] == 0).all() and (plan.teacher_t[cond] == 0).all()
    assert not plan.masked[cond].any()
    assert (plan.student_t[~cond] > 0).all()
    if kind == "dual":
        assert plan.masked[~cond].any()


def test_single_timestep_is_constant_per_sample():
    plan = SingleTimestep.Config().build().plan(batch(100, 8), generator=gen(5))
    assert (plan.student_t == plan.student_t[:, :1]).all()
    assert torch.equal(plan.student_t, plan.teacher_t)
    assert not plan.masked.any()
    assert plan.student_t[:, 0].unique().numel() == 100


def test_shift_time_is_the_paper_formula():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for alpha in (0.75, 1.0, 1.78, 3.0, 10.0):
        want = alpha * t / (1 + (alpha - 1) * t)
        torch.testing.assert_close(shift_time(t, alpha), want, rtol=0, atol=1e-15)
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert torch.equal(shift_time(t, 1.0), t)
    assert (shift_time(t, 3.0) >= t).all(), "alpha > 1 moves mass to the noisy end (t -> 1)"
    assert shift_time(torch.tensor([0.0, 1.0]), 4.63).tolist() == [0.0, 1.0]


def test_flow_path_time_convention():
    """The one time-convention test: t = 0 is data, t = 1 is noise, v = x1 - x0 = dx_t/dt."""
    g = gen(6)
    x0 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    zeros, ones = torch.zeros(2, 5), torch.ones(2, 5)
    assert torch.equal(interpolate(x0, x1, zeros), x0)
    assert torch.equal(interpolate(x0, x1, ones), x1)
    assert torch.equal(interpolate(x0, x1, torch.zeros(2)), x0)      # a [B] time broadcasts
    assert torch.equal(velocity_target(x0, x1), x1 - x0)
    t = torch.rand(2, 5, generator=g, dtype=torch.float64) * 0.9
    h = 1e-6
    deriv = (interpolate(x0, x1, t + h) - interpolate(x0, x1, t)) / h
    torch.testing.assert_close(deriv, velocity_target(x0, x1), rtol=0, atol=1e-6)
    torch.testing.assert_close(interpolate(x0, x1, t), (1 - t[..., None]) * x0 + t[..., None] * x1)
    # per-token: each token sits at its own time
    mixed = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]).expand(2, 5)
    out = interpolate(x0, x1, mixed)
    assert torch.equal(out[:, 1], x1[:, 1]) and torch.equal(out[:, 0], x0[:, 0])
