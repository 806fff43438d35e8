"""The EMA self-teacher and the Self-Flow objective: closed forms, gradients, masks, numerics."""

import io

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfflow_core.builtin.dit import DiT
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.teachers import EMA, EMATeacher, NoTeacher, unwrap
from selfflow_core.testing import randomize_parameters
from selfflow_core.timesteps import DualTimestep
from selfflow_core.types import TokenBatch

CFG = DiT.Config(depth=4, width=32, heads=4)
B, N, C = 3, 10, 6


def setup(student_layer=2, teacher_layer=3, gamma=0.8, num_classes=3, seed=0, token_dims=(C,)):
    student = randomize_parameters(CFG.build(token_dims=token_dims, num_classes=num_classes), seed)
    teacher = EMATeacher(EMATeacher.Config())
    teacher.attach(student)
    randomize_parameters(teacher.model, seed + 1)        # a teacher that differs from the student
    objective = SelfFlowObjective(
        ObjectiveConfig(gamma=gamma, student_layer=student_layer, teacher_layer=teacher_layer),
        depth=CFG.depth, width=CFG.width)
    randomize_parameters(objective, seed + 2)
    return student, teacher, objective


def make_batch(seed=0, valid=None, condition=None, channel_valid=None):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(N, dtype=torch.float32)[None, :, None].expand(B, N, 1)
    b = TokenBatch.single(torch.randn(B, N, C, generator=g), pos, labels=torch.tensor([0, 2, 3]),
                          valid=valid, condition=condition)
    plan = DualTimestep.Config(mask_ratio=0.5).build().plan(b, generator=g)
    noise = torch.randn(B, N, C, generator=g)
    return attrs.evolve(b, channel_valid=channel_valid), plan, noise


# ---- EMA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [False, True])
def test_ema_update_is_the_closed_form(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9, warmup=warmup)
    expect = [p.detach().clone() for p in model.parameters()]
    decays = []
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))                                 # moves the BN running stats
        d = (min(0.9, (1 + step) / (10 + step)) if warmup else 0.9)
        decays.append(ema.current_decay())
        ema.update(model)
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, model.parameters())]
        for e, q in zip(expect, ema.model.parameters()):
            torch.testing.assert_close(q, e, rtol=1e-6, atol=1e-6)
        for b_ema, b in zip(ema.model.buffers(), model.buffers()):
            assert torch.equal(b_ema, b)
    want = [min(0.9, (1 + n) / (10 + n)) for n in range(6)] if warmup else [0.9] * 6
    assert decays == pytest.approx(want)
    assert ema.updates == 6
    if warmup:
        assert decays[0] == pytest.approx(0.1) and decays[-1] < 0.9


def test_ema_teacher_is_frozen_copy_in_eval_mode():
    student, teacher, _ = setup()
    assert teacher.model is not student
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    assert all(p.requires_grad for p in student.parameters())
    fresh = EMATeacher(EMATeacher.Config())
    fresh.attach(student)
    for a, b in zip(fresh.model.parameters(), student.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


# ---- gradients --------------------------------------------------------------------------------

def test_teacher_never_receives_gradients():
    student, teacher, objective = setup()
    batch, plan, noise = make_batch()
    terms = objective(student, teacher, batch, plan, noise)
    assert terms.rep > 0
    terms.total.backward()
    for p in teacher.model.parameters():
        assert not p.requires_grad and p.grad is None
    assert all(p.grad is not None for p in objective.head.parameters())


def test_representation_gradient_reaches_student_up_to_layer_l_and_head_only():
    l, k = 2, 3
    student, teacher, objective = setup(student_layer=l, teacher_layer=k)
    batch, plan, noise = make_batch()
    terms = objective(student, teacher, batch, plan, noise)
    named = dict(student.named_parameters())
    head = list(objective.head.parameters())
    grads = torch.autograd.grad(terms.rep, list(named.values()) + head, allow_unused=True,
                                retain_graph=True)
    student_grads = dict(zip(named, grads[: len(named)]))

    def nonzero(g):
        return g is not None and bool(g.ne(0).any())

    assert all(nonzero(g) for g in grads[len(named):]), "the head must get a rep gradient"
    for name, g in student_grads.items():
        if name.startswith("blocks."):
            depth = int(name.split(".")[1]) + 1
            want = depth <= l
            assert nonzero(g) == want, f"{name}: rep gradient {'missing' if want else 'leaked'}"
        elif name.startswith(("final_ada", "outputs")):
            assert not nonzero(g), f"{name} got a rep gradient"
        else:                     # input projection, embeddings, time MLP feed block 1
            assert nonzero(g), f"{name} got no rep gradient"
    # and the flow loss alone reaches everything in the student but not the head
    grads = torch.autograd.grad(terms.flow, list(named.values()) + head, allow_unused=True)
    assert all(g is not None for g in grads[: len(named)])
    assert all(g is None for g in grads[len(named):])


# ---- masks ------------------------------------------------------------------------------------

def test_invalid_tokens_change_neither_loss():
    student, teacher, objective = setup()
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, -4:] = False
    valid[1, :2] = False
    batch, plan, noise = make_batch(valid=valid)
    with torch.no_grad():
        ref = objective(student, teacher, batch, plan, noise)
        pad = ~valid[..., None]
        junk = torch.randn(B, N, C) * 100
        changed = attrs.evolve(batch, tokens=torch.where(pad, junk, batch.tokens))
        t2 = torch.where(valid, plan.student_t, 1 - plan.student_t)
        plan2 = attrs.evolve(plan, student_t=t2, teacher_t=torch.where(valid, plan.teacher_t, 0.5))
        got = objective(student, teacher, changed, plan2, torch.where(pad, -junk, noise))
    torch.testing.assert_close(got.flow, ref.flow, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.rep, ref.rep, rtol=1e-6, atol=1e-7)
    # the same perturbation on valid tokens does change both (so the check above has power)
    with torch.no_grad():
        everywhere = objective(student, teacher, attrs.evolve(batch, tokens=junk), plan, noise)
    assert not torch.isclose(everywhere.flow, ref.flow)
    assert not torch.isclose(everywhere.rep, ref.rep)


def test_conditioning_tokens_and_padded_channels_are_not_in_the_losses():
    # tokens 5.. are a second modality, 4 channels wide (channels 4, 5 are padding)
    student, teacher, objective = setup(token_dims=(C, 4))
    cond = torch.zeros(B, N, dtype=torch.bool)
    cond[:, :3] = True
    cv = torch.ones(B, N, C, dtype=torch.bool)
    cv[:, 5:, 4:] = False
    batch, plan, noise = make_batch(condition=cond, channel_valid=cv)
    ids = torch.zeros(B, N, dtype=torch.long)
    ids[:, 5:] = 1
    batch = attrs.evolve(batch, modality_ids=ids, tokens=batch.tokens * cv)
    assert (plan.student_t[cond] == 0).all()
    with torch.no_grad():
        ref = objective(student, teacher, batch, plan, noise)
        # conditioning tokens sit at t = 0 for both views: their noise is never seen by the
        # networks, and their velocity error must not count
        moved = torch.where(cond[..., None], noise + 10, noise)
        got = objective(student, teacher, batch, plan, moved)
        # the target on padded channels (noise there, never read by the backbone) must not
        # count either
        moved_ch = torch.where(cv, noise, noise - 7)
        got_ch = objective(student, teacher, batch, plan, moved_ch)
    torch.testing.assert_close(got.flow, ref.flow, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.rep, ref.rep, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_ch.flow, ref.flow, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_ch.rep, ref.rep, rtol=1e-6, atol=1e-7)
    # power: the same changes on generated tokens / real channels do change the flow loss
    with torch.no_grad():
        assert not torch.isclose(objective(student, teacher, batch, plan, noise + 10).flow,
                                 ref.flow)
        no_cv = attrs.evolve(batch, channel_valid=None)
        assert not torch.isclose(objective(student, teacher, no_cv, plan, moved_ch).flow,
                                 ref.flow)


# ---- values -----------------------------------------------------------------------------------

def test_flow_and_rep_equal_a_hand_written_reference():
    l, k = 1, 4
    student, teacher, objective = setup(student_layer=l, teacher_layer=k)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[2, -3:] = False
    cond = torch.zeros(B, N, dtype=torch.bool)
    cond[0, :2] = True
    batch, plan, noise = make_batch(valid=valid, condition=cond)
    gen = valid & ~cond                      # padding and conditioning count in neither loss
    with torch.no_grad():
        terms = objective(student, teacher, batch, plan, noise)
        x0, x1 = batch.tokens, noise
        tau, tmin = plan.student_t[..., None], plan.teacher_t[..., None]
        out = student((1 - tau) * x0 + tau * x1, plan.student_t, batch, feature_layers=(l,))
        err = ((out.velocity - (x1 - x0)) ** 2)[gen]                     # [n_gen, C]
        flow = err.mean()
        h_t = teacher.model((1 - tmin) * x0 + tmin * x1, plan.teacher_t, batch,
                            feature_layers=(k,)).features[k]               # full forward
        cos = F.cosine_similarity(objective.head(out.features[l]), h_t, dim=-1)
        rep = (1 - cos)[gen].mean()
    torch.testing.assert_close(terms.flow, flow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.rep, rep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total, flow + 0.8 * rep, rtol=1e-5, atol=1e-6)
    assert terms.metrics["loss"] == terms.total.detach()


class ExplodingTeacher(NoTeacher):
    provides_targets = True

    def features(self, *a, **kw):
        raise AssertionError("the teacher must not be asked for features")


@pytest.mark.parametrize("case", ["gamma0", "no_teacher"])
def test_without_representation_loss_the_loss_is_the_flow_loss(case):
    student, teacher, objective = setup(gamma=0.0 if case == "gamma0" else 0.8)
    teacher = ExplodingTeacher() if case == "gamma0" else NoTeacher()
    batch, plan, noise = make_batch()
    terms = objective(student, teacher, batch, plan, noise)
    assert terms.rep.item() == 0.0
    assert torch.equal(terms.total, terms.flow)
    terms.total.backward()
    if case == "gamma0":  # no head is built: a head outside the graph would stall DDP
        assert objective.head is None and objective.state_dict() == {}
    else:
        assert all(p.grad is None for p in objective.head.parameters())


class ZeroTeacher(NoTeacher):
    provides_targets = True

    def features(self, x_t, t, batch, *, layer):
        return torch.zeros(*x_t.shape[:2], CFG.width, dtype=torch.bfloat16)


def test_zero_features_under_bf16_autocast_give_no_nan():
    student, _, objective = setup()
    with torch.no_grad():
        objective.head[-1].weight.zero_()
        objective.head[-1].bias.zero_()                   # the head's output is exactly zero too
    batch, plan, noise = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = objective(student, ZeroTeacher(), batch, plan, noise)
    assert torch.isfinite(terms.total) and terms.rep.dtype == torch.float32
    assert terms.rep.item() == pytest.approx(1.0)          # cos(0, 0) = 0
    terms.total.backward()
    for p in list(student.parameters()) + list(objective.head.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()


# ---- EMA state under torch.compile -------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch._dynamo's own imports
def test_ema_state_dict_keys_match_plain_student_under_compile():
    plain = CFG.build(token_dims=(C,), num_classes=3)
    compiled = torch.compile(plain, backend="eager")      # the same wrapper; never run
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap(compiled) is plain
    teacher = EMATeacher(EMATeacher.Config(decay=0.5))
    teacher.attach(compiled)
    keys = list(teacher.state_dict()["model"])
    assert keys == list(plain.state_dict())
    assert not any(k.startswith("_orig_mod.") or "._orig_mod." in k for k in keys)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    teacher.update(compiled, step=1)                      # through the wrapper
    for q, p in zip(teacher.model.parameters(), plain.parameters()):
        torch.testing.assert_close(q, p - 0.5)
    # save / load through the safe loader
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = EMATeacher(EMATeacher.Config(decay=0.5))
    other.attach(CFG.build(token_dims=(C,), num_classes=3))
    other.load_state_dict(state)
    assert other.ema.updates == 1
    for (ka, a), (kb, b) in zip(other.state_dict()["model"].items(),
                                teacher.state_dict()["model"].items()):
        assert ka == kb and torch.equal(a, b)
