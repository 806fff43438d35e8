"""Paper fidelity: the defaults and behaviours that Self-Flow (arXiv 2603.06507) fixes, pinned
against the classes' own defaults (never a preset) and against the trainer's real step.

Sources (``../shared/research/paper.md``): gamma = 0.8, EMA decay 0.9999, head
Linear(d, 2d) - SiLU - Linear(2d, d), layers 0.3 / 0.7 of depth (28 -> 8, 20), AdamW lr 1e-4,
grad clip 1.0, image mask ratio 0.25, t and s i.i.d. and unsorted, an i.i.d. Bernoulli mask,
per-token adaLN, per-modality loss weights, the teacher updated after every optimizer step.

Every test can fail: a value pin fails as soon as the default changes; the statistical checks
carry a power check (the same statistic on a deliberately wrong plan); the trainer checks state
in their docstrings which change to the trainer they catch.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from selfflow_core.builtin.dit import DiT, sincos
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.config.run import CheckpointConfig, ModalitySpec, OptimConfig, TrainerConfig
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.objective import ObjectiveConfig, ProjectionHead, SelfFlowObjective
from selfflow_core.runtime.optim import build_optimizer
from selfflow_core.sampling import SamplingConfig
from selfflow_core.teachers import EMATeacher
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`
from selfflow_core.testing import randomize_parameters
from selfflow_core.timesteps import DualTimestep, LogitNormal, Uniform
from selfflow_core.trainer import Trainer
from selfflow_core.types import TimestepPlan, TokenBatch

NULL_CLASS = TOY.classes
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, 2 shared cores


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_config(run_dir, store, *, spec: dict | None = None, **changes) -> TrainerConfig:
    """A TrainerConfig built from the classes' defaults (teacher, objective, optimizer,
    scheduler all default), shrunk only in size: depth-3 width-32 DiT, batch 8 of the toy store."""
    modality = ModalitySpec(modality=TOY, store=store, source="", batch_size=8, **(spec or {}))
    cfg = TrainerConfig(
        modalities={"toy": modality}, backbone=DiT.Config(depth=3, width=32, heads=4),
        checkpoint=CheckpointConfig(every=1000), sampling=SamplingConfig(count=4, steps=2),
        tracker=NullTracker.Config(), steps=10, log_every=1000, run_dir=str(run_dir))
    return attrs.evolve(cfg, **changes)


def build(cfg: TrainerConfig, components) -> Trainer:
    return Trainer(cfg, components=components, progress=False)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


# =================================================================================================
# Paper defaults, read from the classes
# =================================================================================================

def test_objective_defaults_gamma_and_layers():
    """gamma = 0.8 (App. A.3, fixed for all experiments); l = 0.3 D, k = 0.7 D, 1-indexed
    (D = 28 -> blocks 8 and 20, the released README's "student at layer 8, teacher at 20")."""
    cfg = ObjectiveConfig()
    assert cfg.gamma == 0.8
    assert cfg.student_layer == 0.3 and cfg.teacher_layer == 0.7
    assert cfg.layers(28) == (8, 20)
    objective = SelfFlowObjective(cfg, depth=28, width=64)
    assert (objective.student_layer, objective.teacher_layer) == (8, 20)
    # the run's default objective is that default
    run = TrainerConfig(modalities={"toy": ModalitySpec(modality=TOY, store="unused")})
    assert run.objective == ObjectiveConfig()


def test_ema_teacher_default_decay_is_the_papers():
    """EMA decay 0.9999 with no warm-up (App. A.3: "The paper mentions no EMA warmup"); it is
    the run's default teacher."""
    cfg = EMATeacher.Config()
    assert cfg.decay == 0.9999 and cfg.warmup is False
    run = TrainerConfig(modalities={"toy": ModalitySpec(modality=TOY, store="unused")})
    assert run.teacher == EMATeacher.Config()
    teacher = cfg.build()
    teacher.attach(nn.Linear(2, 2))
    assert teacher.ema.current_decay() == 0.9999
    for _ in range(3):                     # constant: no warm-up ramp
        teacher.update(nn.Linear(2, 2), step=1)
        assert teacher.ema.current_decay() == 0.9999


def test_projection_head_structure_and_widths():
    """SimpleHead of the released model: Linear(d, 2d) - SiLU - Linear(2d, d); for SiT-XL
    (d = 1152) 1152 -> 2304 -> 1152, about 5.3M parameters."""
    d = 1152
    objective = SelfFlowObjective(ObjectiveConfig(), depth=28, width=d)
    for head in (ProjectionHead(d), objective.head):
        layers = list(head.children())
        assert [type(m) for m in layers] == [nn.Linear, nn.SiLU, nn.Linear]
        first, _, last = layers
        assert (first.in_features, first.out_features) == (d, 2 * d)
        assert (last.in_features, last.out_features) == (2 * d, d)
        assert first.bias is not None and last.bias is not None
        n = sum(p.numel() for p in head.parameters())
        assert n == d * 2 * d + 2 * d + 2 * d * d + d == 5_311_872
        x = torch.randn(2, 3, d)
        want = last(F.silu(first(x)))
        torch.testing.assert_close(head(x), want)


def test_optimizer_defaults_adamw_lr_and_clip():
    """AdamW, lr 1e-4 (REPA's setup), gradient clipping at max-norm 1 (released README)."""
    cfg = OptimConfig()
    assert cfg.lr == 1e-4 and cfg.grad_clip == 1.0
    run = TrainerConfig(modalities={"toy": ModalitySpec(modality=TOY, store="unused")})
    assert run.optim == OptimConfig()
    opt, schedule = build_optimizer(cfg, nn.Linear(2, 2).parameters(), 100, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 1e-4 and schedule.get_last_lr() == [1e-4]


def test_default_mask_ratio_is_the_image_ratio():
    """R_M = 0.25 for images (App. A.3); the default scheduler of a modality that declares none
    of its own (``ModalityConfig.default_scheduler()`` None) is DTS with it, and with the uniform
    p(t) of the ImageNet / single-modality T2I runs."""
    cfg = DualTimestep.Config()
    assert cfg.mask_ratio == 0.25
    assert cfg.distribution == Uniform.Config()
    assert ModalityConfig().default_scheduler() is None
    spec = ModalitySpec(modality=TOY, store="unused")
    assert spec.scheduler == DualTimestep.Config()
    plan = cfg.build().plan(TokenBatch.single(torch.zeros(400, 64, 2), torch.zeros(400, 64, 1)),
                            generator=gen(0))
    frac, n = plan.masked.float().mean().item(), plan.masked.numel()
    assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)


# =================================================================================================
# Dual-timestep scheduling: t, s i.i.d. and unsorted, the mask i.i.d. Bernoulli
# =================================================================================================

def _recover_t_s(plan: TimestepPlan):
    """Per sample with both groups present: ``t`` (unmasked tokens' time), ``s`` (masked
    tokens'), and which samples they are. Selecting on the mask alone does not bias (t, s)."""
    m, st = plan.masked, plan.student_t
    both = m.any(1) & (~m).any(1)
    s = st.masked_fill(~m, -1).max(1).values[both]
    t = st.masked_fill(m, -1).max(1).values[both]
    return t.double().numpy(), s.double().numpy(), both


def _iid_pvalue(u: np.ndarray, v: np.ndarray, bins: int = 5) -> float:
    """Chi-square p-value that (u, v) are independent U(0, 1) (a bins x bins grid of counts)."""
    h, _, _ = np.histogram2d(u, v, bins=bins, range=[[0, 1], [0, 1]])
    return stats.chisquare(h.ravel()).pvalue


@pytest.mark.parametrize("dist", [Uniform.Config(), LogitNormal.Config(shift=3.0)],
                         ids=["uniform", "logit_normal_shift3"])
def test_t_and_s_are_iid_from_p_t_and_unsorted(dist):
    """(F(t), F(s)) is uniform on the unit square: t and s are independent draws of p(t) (Eq. 4),
    and neither is ordered against the other (maintainer, issues #2/#11)."""
    plan = DualTimestep.Config(distribution=dist, mask_ratio=0.25).build().plan(
        TokenBatch.single(torch.zeros(6000, 32, 2), torch.zeros(6000, 32, 1)), generator=gen(11))
    t, s, _ = _recover_t_s(plan)
    cdf = dist.build().cdf
    u = cdf(torch.as_tensor(t)).numpy()
    v = cdf(torch.as_tensor(s)).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.kstest(v, "uniform").pvalue > 1e-3
    assert stats.spearmanr(u, v).pvalue > 1e-3
    assert _iid_pvalue(u, v) > 1e-3
    frac = float((s > t).mean())
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / len(t))
    # power: the same checks reject sorted pairs (masked = noisier) and correlated pairs
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    assert _iid_pvalue(lo, hi) < 1e-6
    assert stats.kstest(hi, "uniform").pvalue < 1e-6
    near = np.clip(u + 0.1 * (v - 0.5), 0, 1)               # s drawn close to t
    assert stats.spearmanr(u, near).pvalue < 1e-6


def test_mask_is_iid_bernoulli_per_token():
    """u_i < R_M with u_i i.i.d. per token (Eq. 5): the per-sample count is Binomial(N, R_M),
    every position is masked with probability R_M, positions are pairwise independent, and the
    mask does not depend on the values of t and s."""
    b, n, r = 6000, 16, 0.25
    plan = DualTimestep.Config(mask_ratio=r).build().plan(
        TokenBatch.single(torch.zeros(b, n, 2), torch.zeros(b, n, 1)), generator=gen(12))
    m = plan.masked.numpy()

    def binomial_pvalue(mask):
        counts = np.bincount(mask.sum(1), minlength=n + 1).astype(float)
        expect = stats.binom.pmf(np.arange(n + 1), n, r) * len(mask)
        keep = expect >= 5                                    # pool the thin tails
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expect[keep], expect[~keep].sum())
        return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue

    def max_pair_z(mask):
        c = np.corrcoef(mask.T.astype(float))
        return np.abs(c[np.triu_indices(n, 1)]).max() * np.sqrt(len(mask))

    assert binomial_pvalue(m) > 1e-3
    per_position = m.sum(0)
    z = (per_position - b * r) / np.sqrt(b * r * (1 - r))
    assert stats.chi2.sf(float((z ** 2).sum()), n) > 1e-3
    assert max_pair_z(m) < 4.5                                # 120 pairs, N(0, 1) each
    # independent of the values: masked fraction alike whether s > t or s < t, and not
    # correlated with t
    t, s, both = _recover_t_s(plan)
    frac = m[both.numpy()].mean(1)
    a, c = frac[s > t], frac[s < t]
    se = np.sqrt(a.var() / len(a) + c.var() / len(c))
    assert abs(a.mean() - c.mean()) < 4 * se
    assert stats.spearmanr(frac, t).pvalue > 1e-3
    # power: a fixed count per sample, runs of neighbours, a value-dependent mask all fail
    rng = np.random.default_rng(0)
    fixed = np.zeros_like(m)
    for row in fixed:
        row[rng.permutation(n)[: int(r * n)]] = True
    assert binomial_pvalue(fixed) < 1e-6
    runs = np.repeat(rng.random((b, n // 2)) < r, 2, axis=1)
    assert max_pair_z(runs) > 10
    dependent = m[both.numpy()] | ((s > t)[:, None] & (rng.random((len(t), n)) < 0.1))
    assert stats.spearmanr(dependent.mean(1), s > t).pvalue < 1e-6


# =================================================================================================
# Per-token adaLN in the DiT
# =================================================================================================

DIT = DiT.Config(depth=3, width=32, heads=4)
B, N, C = 3, 12, 6


def _dit(seed=0):
    return randomize_parameters(DIT.build(token_dims=(C,), num_classes=4), seed)


def _batch(seed=0):
    pos = torch.arange(N, dtype=torch.float32)[None, :, None].expand(B, N, 1)
    return TokenBatch.single(torch.randn(B, N, C, generator=gen(seed)), pos,
                             labels=torch.tensor([0, 3, 4]))       # 4: the null class


@torch.no_grad()
def test_per_token_time_is_not_the_samples_mean_time():
    """Two times in one sample condition their tokens apart: the output differs from the one
    with every token at the sample's mean time (a per-sample pooled conditioning would give the
    same); equal per-token times are exactly the scalar-time case; and one sample's times never
    reach another sample."""
    model, batch = _dit(), _batch()
    masked = torch.rand(B, N, generator=gen(1)) < 0.5
    masked[:, 0], masked[:, 1] = True, False                 # both groups in every sample
    t = torch.tensor([0.1, 0.3, 0.05])[:, None]
    s = torch.tensor([0.9, 0.7, 0.8])[:, None]
    tau = torch.where(masked, s, t)
    mixed = model(batch.tokens, tau, batch, feature_layers=(2,))
    mean = model(batch.tokens, tau.mean(1, keepdim=True).expand(B, N), batch,
                 feature_layers=(2,))
    for i in range(B):
        assert (mixed.velocity[i] - mean.velocity[i]).abs().max() > 1e-3, f"sample {i}"
        assert (mixed.features[2][i] - mean.features[2][i]).abs().max() > 1e-3, f"sample {i}"
    # all tokens at one time: per-token conditioning is the scalar case, bit for bit
    scalar = model(batch.tokens, t[:, 0], batch, feature_layers=(2,))
    per_token = model(batch.tokens, t.expand(B, N).contiguous(), batch, feature_layers=(2,))
    assert torch.equal(scalar.velocity, per_token.velocity)
    assert torch.equal(scalar.features[2], per_token.features[2])
    # sample 0's times changed alone: samples 1 and 2 are untouched
    tau2 = tau.clone()
    tau2[0] = 1 - tau2[0]
    other = model(batch.tokens, tau2, batch)
    torch.testing.assert_close(other.velocity[1:], mixed.velocity[1:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(other.velocity[0], mixed.velocity[0], atol=1e-4)


def _reference_velocity(model: DiT, h: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor):
    """The paper's SelfFlowPerTokenDiT, written out: the sinusoidal + MLP time embedding on the
    B*N flattened times, the class embedding broadcast to every token, adaLN-Zero in every block
    and in the final layer from each token's own conditioning (no sharing of rows)."""
    b, n, d = h.shape
    c = model.time_mlp(sincos(tau * 1000.0, 256)) + model.label_embed(labels)[:, None]
    for blk in model.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.ada(c).chunk(6, dim=-1)
        q, k, v = blk.qkv(blk.norm1(h) * (1 + sc1) + sh1).view(
            b, n, 3, blk.heads, d // blk.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + g1 * blk.proj(a)
        h = h + g2 * blk.mlp(blk.norm2(h) * (1 + sc2) + sh2)
    sh, sc = model.final_ada(c).chunk(2, dim=-1)
    return model.outputs[0](model.final_norm(h) * (1 + sc) + sh)


@torch.no_grad()
def test_per_token_adaln_equals_a_per_token_reference():
    """The DiT's shared-rows shortcut (conditioning computed once per distinct (sample, time))
    gives exactly what conditioning each token on its own time gives. Power: the same reference
    with the sample's mean time is far off."""
    model, batch = _dit(seed=3), _batch(seed=3)
    tau = DualTimestep.Config(mask_ratio=0.5).build().plan(batch, generator=gen(4)).student_t
    assert all(len(row.unique()) == 2 for row in tau)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    out = model(batch.tokens, tau, batch)
    ref = _reference_velocity(model, seen["h"], tau, batch.labels)
    torch.testing.assert_close(out.velocity, ref, rtol=1e-5, atol=1e-5)
    pooled = _reference_velocity(model, seen["h"], tau.mean(1, keepdim=True).expand(B, N),
                                 batch.labels)
    assert (pooled - out.velocity).abs().max() > 1e-3


# =================================================================================================
# The representation loss and conditioning tokens not at t = 0
# =================================================================================================

class PerturbedTeacher:
    """The EMA teacher's features with ``junk`` written on the ``where`` tokens."""

    provides_targets = True

    def __init__(self, inner: EMATeacher, where: torch.Tensor, junk: torch.Tensor) -> None:
        self.inner, self.where, self.junk = inner, where, junk

    def features(self, x_t, t, batch, *, layer):
        f = self.inner.features(x_t, t, batch, layer=layer)
        return torch.where(self.where[..., None], self.junk.to(f.dtype), f)


@torch.no_grad()
def test_rep_loss_excludes_conditioning_tokens_even_off_t0():
    """Conditioning tokens are held out of L_rep by the batch's mask, not by their time: given a
    plan that puts them at t > 0 (noise-augmented conditioning, App. E/F: t ~ U[0, 0.2]), any
    teacher target on them leaves ``rep`` unchanged. Power: the same junk on generated tokens
    changes it."""
    student = randomize_parameters(DIT.build(token_dims=(C,), num_classes=4), 0)
    teacher = EMATeacher(EMATeacher.Config())
    teacher.attach(student)
    randomize_parameters(teacher.model, 1)
    objective = randomize_parameters(SelfFlowObjective(
        ObjectiveConfig(student_layer=1, teacher_layer=2), depth=DIT.depth, width=DIT.width), 2)
    cond = torch.zeros(B, N, dtype=torch.bool)
    cond[:, :4] = True
    batch = attrs.evolve(_batch(seed=5), condition=cond)
    g = gen(6)
    tau = 0.05 + 0.9 * torch.rand(B, N, generator=g)
    tmin = tau.min(1, keepdim=True).values.expand(B, N).contiguous()
    plan = TimestepPlan(student_t=tau, teacher_t=tmin, masked=torch.zeros(B, N, dtype=torch.bool))
    assert (plan.student_t[cond] > 0).all() and (plan.teacher_t[cond] > 0).all()
    noise = torch.randn(B, N, C, generator=g)
    junk = 50 * torch.randn(B, N, DIT.width, generator=g)

    def rep(where):
        return objective(student, PerturbedTeacher(teacher, where, junk), batch, plan, noise).rep

    ref = objective(student, teacher, batch, plan, noise).rep
    torch.testing.assert_close(rep(torch.zeros_like(cond)), ref, rtol=0, atol=0)
    torch.testing.assert_close(rep(cond), ref, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(rep(~cond), ref)                 # power


# =================================================================================================
# The trainer's step
# =================================================================================================

def test_the_trainer_uses_the_paper_defaults(tmp_path, toy_store, core_components):
    """In a trainer of a depth-28 backbone built from the class defaults: the student's features
    are read at block 8 and the teacher's at block 20 (stopped there), the head is
    Linear(d, 2d) - SiLU - Linear(2d, d), the optimizer is AdamW at lr 1e-4 over the backbone and
    the head, and the teacher's EMA decays at 0.9999."""
    cfg = tiny_config(tmp_path, toy_store, backbone=DiT.Config(depth=28, width=32, heads=4))
    tr = build(cfg, core_components)
    student_layers, teacher_calls = [], []
    forward, features = tr.backbone.forward, tr.teacher.ema.model.forward

    def student(x, t, batch, **kw):
        student_layers.append(tuple(kw.get("feature_layers", ())))
        return forward(x, t, batch, **kw)

    def teacher(x, t, batch, **kw):
        teacher_calls.append((tuple(kw.get("feature_layers", ())), kw.get("stop_after")))
        return features(x, t, batch, **kw)

    tr.backbone.forward = student
    tr.teacher.ema.model.forward = teacher
    tr.train_step()
    assert student_layers == [(8,)]
    assert teacher_calls == [((20,), 20)]
    first, act, last = tr.model.objective.head.children()
    assert isinstance(act, nn.SiLU)
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (
        32, 64, 64, 32)
    assert type(tr.optimizer) is torch.optim.AdamW
    assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-4] * len(tr.optimizer.param_groups)
    optimized = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in tr.model.parameters()}
    assert {id(p) for p in tr.model.objective.head.parameters()} <= optimized
    assert tr.teacher.ema.decay == 0.9999 and tr.teacher.ema.current_decay() == 0.9999


def test_teacher_updates_after_each_optimizer_step_once(tmp_path, toy_store, core_components,
                                                        monkeypatch):
    """With ``grad_accum = 2`` each step runs: student forward, student forward, optimizer step,
    teacher update -- and the teacher is then exactly the EMA of the *post-step* student.

    Fails if the update is removed (no "update" event, teacher unchanged), moved before the
    optimizer step (order, and the teacher would average the pre-step weights), or made per
    micro-batch (two updates per step)."""
    decay = 0.5                                 # a visible average (0.9999 hides a wrong order)
    cfg = tiny_config(tmp_path, toy_store, grad_accum=2,
                      teacher=EMATeacher.Config(decay=decay))
    tr = build(cfg, core_components)
    events = []
    update, forward = tr.teacher.update, tr.backbone.forward
    # a post-hook of the optimizer's own step: recorded once the step has run
    tr.optimizer.register_step_post_hook(lambda *a: events.append("optimizer.step"))

    def record_update(*a, **kw):
        events.append("teacher.update")
        return update(*a, **kw)

    def record_forward(*a, **kw):
        events.append("student")
        return forward(*a, **kw)

    monkeypatch.setattr(tr.teacher, "update", record_update)
    tr.backbone.forward = record_forward
    steps = 3
    for _ in range(steps):
        teacher_before = flat(tr.teacher.model.parameters())
        student_before = flat(tr.backbone.parameters())
        tr.train_step()
        student_after = flat(tr.backbone.parameters())
        teacher_after = flat(tr.teacher.model.parameters())
        assert not torch.equal(student_after, student_before)
        want = decay * teacher_before + (1 - decay) * student_after
        torch.testing.assert_close(teacher_after, want, rtol=1e-6, atol=1e-7)
        stale = decay * teacher_before + (1 - decay) * student_before
        assert not torch.allclose(teacher_after, stale, rtol=1e-6, atol=1e-7)
    per_step = ["student", "student", "optimizer.step", "teacher.update"]
    assert events == per_step * steps
    assert tr.teacher.ema.updates == steps == tr.step


def test_gradients_are_clipped_to_norm_one(tmp_path, toy_store, core_components, monkeypatch):
    """The loss scaled by 1e6: the logged ``grad_norm`` (before clipping) is huge, while the
    gradients the optimizer steps on have a total norm of at most ``grad_clip`` = 1.0 (the
    default). Without the clip the optimizer would see the logged norm."""
    tr = build(tiny_config(tmp_path, toy_store), core_components)
    assert tr.config.optim.grad_clip == 1.0
    objective_forward = tr.model.objective.forward

    def scaled(*a, **kw):
        terms = objective_forward(*a, **kw)
        return attrs.evolve(terms, total=terms.total * 1e6)

    monkeypatch.setattr(tr.model.objective, "forward", scaled)
    seen = []

    def measure(optimizer, args, kwargs):    # a pre-hook: the gradients the step will use
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())

    tr.optimizer.register_step_pre_hook(measure)
    for _ in range(2):
        terms = tr.train_step()
        logged = terms.metrics["grad_norm"].item()
        assert logged > 1e3, logged
        assert seen[-1] <= 1.0 + 1e-5, seen[-1]
        assert seen[-1] > 0.99            # clipped *to* the norm, not zeroed


def test_modality_weight_scales_the_gradient(tmp_path, toy_store, core_components):
    """``ModalitySpec.weight`` (the paper's per-modality w_I, w_V, w_A on top of Eq. 7): weight 2
    gives exactly twice the gradients of weight 1 on the same batch, noise and initial weights
    (same seed), compared before clipping; the loss itself is reported unweighted."""
    grads, norms, losses = {}, {}, {}
    for w in (1.0, 2.0):
        tr = build(tiny_config(tmp_path / f"w{w}", toy_store, spec={"weight": w}),
                   core_components)
        clip = tr.parallel.clip_grad_norm_

        def capture(params, max_norm, w=w, clip=clip, tr=tr):
            grads[w] = [p.grad.detach().clone() if p.grad is not None else None
                        for p in tr.model.parameters()]
            return clip(params, max_norm)

        tr.parallel.clip_grad_norm_ = capture
        terms = tr.train_step()
        norms[w], losses[w] = terms.metrics["grad_norm"].item(), terms.total.item()
    assert losses[2.0] == pytest.approx(losses[1.0], rel=1e-6)
    assert norms[2.0] == pytest.approx(2 * norms[1.0], rel=1e-5)
    pairs = [(a, b) for a, b in zip(grads[1.0], grads[2.0]) if a is not None]
    assert pairs and any(bool(a.ne(0).any()) for a, _ in pairs)
    for a, b in pairs:
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-8)


def test_label_dropout_reaches_student_and_teacher_alike(tmp_path, toy_store, core_components):
    """Label dropout is drawn once per sample and step and given to both networks: the teacher's
    batch carries exactly the student's (partly null) labels. Were the teacher given the
    undropped labels, they would differ on the dropped rows (which exist: checked)."""
    tr = build(tiny_config(tmp_path, toy_store, label_dropout=0.5), core_components)
    student_labels, teacher_labels = [], []
    forward, features = tr.backbone.forward, tr.teacher.features

    def student(x, t, batch, **kw):
        student_labels.append(batch.labels.clone())
        return forward(x, t, batch, **kw)

    def teacher(x_t, t, batch, **kw):
        teacher_labels.append(batch.labels.clone())
        return features(x_t, t, batch, **kw)

    tr.backbone.forward = student
    tr.teacher.features = teacher
    for _ in range(4):
        tr.train_step()
    assert len(student_labels) == len(teacher_labels) == 4
    for a, b in zip(student_labels, teacher_labels):
        assert torch.equal(a, b)
    everything = torch.cat(student_labels)
    assert (everything == NULL_CLASS).any() and (everything != NULL_CLASS).any()
