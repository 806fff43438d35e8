"""Timestep plans beyond the homogeneous case: noise-augmented conditioning (paper App. E/F), a
scheduler per kind of token (joint audio-video, App. B/C, F), and the plateau-logit-normal p(t)
(App. A.2's RAE setting).

Statistical checks carry a power check: the same statistic on a deliberately wrong draw fails.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from scipy import stats

from selfflow_core import (
    CheckpointConfig,
    ConfigError,
    DiT,
    DualTimestep,
    LogitNormal,
    ModalitySpec,
    NullTracker,
    PerKindTimestep,
    PlateauLogitNormal,
    SingleTimestep,
    Trainer,
    TrainerConfig,
    Uniform,
    validate,
)
from selfflow_core.testing.fixtures import TINY_TOY
from selfflow_core.types import TokenBatch

pytestmark = pytest.mark.usefixtures("one_thread")
B, N, C = 4096, 12, 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = B, n: int = N, *, held: int = 3, kinds: torch.Tensor | None = None
          ) -> TokenBatch:
    cond = torch.zeros(b, n, dtype=torch.bool)
    cond[:, :held] = True
    out = TokenBatch.single(torch.randn(b, n, C, generator=gen(1)), torch.zeros(b, n, 1),
                            condition=cond)
    if kinds is not None:
        out = attrs.evolve(out, modality_ids=kinds.expand(b, n).contiguous())
    return out


def ks(samples: torch.Tensor, cdf) -> float:
    """The Kolmogorov-Smirnov statistic of ``samples`` against ``cdf``."""
    x = samples.double().sort().values
    f = cdf(x)
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


# Noise-augmented conditioning
# =================================================================================================

@pytest.mark.parametrize("scheduler", [
    DualTimestep.Config(mask_ratio=0.5, condition_noise=0.2),
    SingleTimestep.Config(condition_noise=0.2)], ids=["dual", "single"])
def test_conditioning_tokens_get_one_small_time_per_sample(scheduler):
    """App. E/F: the clean conditioning (first frame) gets t ~ U[0, 0.2]: one draw per sample,
    shared by all its conditioning tokens, equal for student and teacher, never masked."""
    x = batch()
    plan = scheduler.build().plan(x, generator=gen(2))
    held_s, held_t = plan.student_t[:, :3], plan.teacher_t[:, :3]
    torch.testing.assert_close(held_s, held_t, rtol=0, atol=0)
    assert (held_s == held_s[:, :1]).all()
    assert not plan.masked[:, :3].any()
    per_sample = held_s[:, 0]
    assert ks(per_sample, lambda t: (t / 0.2).clamp(0, 1)) < 0.03
    assert ks(per_sample, lambda t: (t / 0.3).clamp(0, 1)) > 0.1  # power: U[0, 0.3] is not it
    # the generated tokens' plan is the one without augmentation (drawn first, same generator)
    plain = attrs.evolve(scheduler, condition_noise=0.0).build().plan(x, generator=gen(2))
    for name in ("student_t", "teacher_t", "masked"):
        torch.testing.assert_close(getattr(plan, name)[:, 3:], getattr(plain, name)[:, 3:],
                                   rtol=0, atol=0)
    assert (plain.student_t[:, :3] == 0).all() and (plain.teacher_t[:, :3] == 0).all()


def test_condition_noise_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="condition_noise"):
            DualTimestep.Config(condition_noise=bad)


# A scheduler per kind of token
# =================================================================================================

KINDS = torch.tensor([0] * 8 + [1] * 4)  # e.g. 8 video tokens, then 4 audio tokens


def per_kind() -> PerKindTimestep:
    return PerKindTimestep.Config(kinds=(
        DualTimestep.Config(mask_ratio=0.1, condition_noise=0.2),
        DualTimestep.Config(distribution=LogitNormal.Config(shift=3.0), mask_ratio=0.5),
    )).build()


def test_each_kind_gets_its_own_mask_ratio_and_p_t():
    x = batch(kinds=KINDS)
    plan = per_kind().plan(x, generator=gen(3))
    video, audio = KINDS == 0, KINDS == 1
    gen_video = video.clone()
    gen_video[:3] = False  # the conditioning tokens are never masked
    assert plan.masked[:, gen_video].float().mean() == pytest.approx(0.1, abs=0.01)
    assert plan.masked[:, audio].float().mean() == pytest.approx(0.5, abs=0.01)
    # the unmasked tokens of each kind carry that kind's t: its own p(t)
    t_video = plan.student_t[:, 3][~plan.masked[:, 3]]
    t_audio = plan.student_t[:, 8][~plan.masked[:, 8]]
    uniform = Uniform().cdf
    shifted = LogitNormal(LogitNormal.Config(shift=3.0)).cdf
    assert ks(t_video, uniform) < 0.04 and ks(t_audio, shifted) < 0.04
    assert ks(t_video, shifted) > 0.1 and ks(t_audio, uniform) > 0.1  # power
    # the kinds draw their own times: within a sample video's t is not audio's
    assert (plan.student_t[:, 3] != plan.student_t[:, 8]).float().mean() > 0.99
    # conditioning (video kind) is augmented by the video scheduler; audio has none held here
    assert (plan.student_t[:, :3] <= 0.2).all() and (plan.student_t[:, :3] > 0).any()


def test_a_tokens_teacher_time_is_its_own_kinds_min():
    x = batch(b=256, kinds=KINDS, held=0)
    plan = per_kind().plan(x, generator=gen(4))
    for kind in (0, 1):
        cols = KINDS == kind
        s, tt = plan.student_t[:, cols], plan.teacher_t[:, cols]
        assert (tt == tt[:, :1]).all()  # homogeneous within a kind: the cleaner view
        both = plan.masked[:, cols].any(1) & (~plan.masked[:, cols]).any(1)
        torch.testing.assert_close(tt[both, 0], s[both].min(1).values, rtol=0, atol=0)
        assert (s.unique(dim=None).numel() > 2)  # many samples, many times


def test_per_kind_equals_its_scheduler_on_a_single_kind():
    """One kind: the plan of ``kinds[0]`` itself (no extra draw, nothing reordered)."""
    x = batch(b=64)
    one = PerKindTimestep.Config(kinds=(DualTimestep.Config(mask_ratio=0.3),)).build()
    a = one.plan(x, generator=gen(5))
    b = DualTimestep.Config(mask_ratio=0.3).build().plan(x, generator=gen(5))
    for name in ("student_t", "teacher_t", "masked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_per_kind_wants_one_scheduler_per_token_kind(core_components, toy_store, tmp_path):
    spec = ModalitySpec(modality=TINY_TOY, store=toy_store, scheduler=PerKindTimestep.Config(
        kinds=(DualTimestep.Config(), DualTimestep.Config())))
    cfg = TrainerConfig(modalities={"toy": spec}, run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"modalities\.toy\.scheduler\.kinds: 2 schedulers"):
        validate(cfg, core_components)
    with pytest.raises(ValueError, match="other than per_kind"):
        PerKindTimestep.Config(kinds=(spec.scheduler,))


class Recording:
    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def plan(self, batch, *, generator):
        self.seen.append(batch.modality_ids.unique().tolist())
        return self.inner.plan(batch, generator=generator)


def test_schedulers_see_the_adapters_own_modality_ids(core_components, toy_store, tmp_path):
    """In a composite run the second modality's ids are offset into the backbone's table; its
    scheduler still sees 0 .. len(token_dims) - 1 (what ``PerKindTimestep`` keys on), and the
    backbone the offset ids."""
    cfg = TrainerConfig(
        modalities={n: ModalitySpec(modality=TINY_TOY, store=toy_store, batch_size=8,
                                    probability=0.5) for n in ("a", "b")},
        backbone=DiT.Config(depth=3, width=32), checkpoint=CheckpointConfig(every=100),
        tracker=NullTracker.Config(), steps=6, log_every=100, run_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, components=core_components, progress=False)
    by_name = {m.name: m for m in trainer.modalities}
    assert by_name["b"].id_offset == 1
    for m in by_name.values():
        m.scheduler = Recording(m.scheduler)
    seen_by_backbone = []
    original = trainer.trained.forward

    def forward(teacher, batch, plan, noise):
        seen_by_backbone.append(batch.modality_ids.unique().tolist())
        return original(teacher, batch, plan, noise)

    trainer.trained.forward = forward
    trainer.fit()
    assert by_name["a"].scheduler.seen and by_name["b"].scheduler.seen
    assert all(ids == [0] for m in by_name.values() for ids in m.scheduler.seen)
    assert [1] in seen_by_backbone and [0] in seen_by_backbone


# Plateau-logit-normal p(t)
# =================================================================================================

def test_plateau_logit_normal_without_plateau_is_the_logit_normal():
    t = torch.linspace(0.001, 0.999, 500)
    flat = PlateauLogitNormal(PlateauLogitNormal.Config(width=0.0, shift=10.0, mean=0.3))
    plain = LogitNormal(LogitNormal.Config(shift=10.0, mean=0.3))
    torch.testing.assert_close(flat.cdf(t), plain.cdf(t), rtol=0, atol=1e-12)
    draws = flat.sample(20000, generator=gen(6))
    assert ks(draws, plain.cdf) < 0.015


def test_plateau_logit_normal_samples_follow_its_cdf_and_are_flat_on_the_plateau():
    config = PlateauLogitNormal.Config()  # width 1, std 1, shift 10 (the paper's RAE shift)
    assert config.shift == 10.0
    dist = config.build()
    draws = dist.sample(40000, generator=gen(7))
    assert ks(draws, dist.cdf) < 0.01
    assert ks(draws, LogitNormal(LogitNormal.Config(shift=10.0)).cdf) > 0.03  # power
    t = torch.linspace(0, 1, 1001)
    f = dist.cdf(t)
    assert (f[1:] >= f[:-1]).all() and float(f[0]) < 1e-6 and float(f[-1]) > 1 - 1e-6
    # undo the shift and the sigmoid: z is uniform on [-1, 1] with probability 2 / (2 + sqrt(2pi))
    u = draws.double() / (10 - 9 * draws.double())
    z = torch.logit(u).numpy()
    inside = np.abs(z) <= 1
    assert inside.mean() == pytest.approx(2 / (2 + np.sqrt(2 * np.pi)), abs=0.01)
    assert stats.kstest((z[inside] + 1) / 2, "uniform").pvalue > 1e-3
    # the density is continuous at the plateau's edge: the tails start at its height
    tail = np.abs(z[~inside]) - 1
    assert stats.kstest(tail, "halfnorm").pvalue > 1e-3
