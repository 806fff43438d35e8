"""The reference DiT: per-token time, truncation, padding, labels, mixed token widths, layers."""

import attrs
import pytest
import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.objective import ObjectiveConfig, resolve_layer
from selfflow_core.testing import BackboneContract, randomize_parameters
from selfflow_core.types import TokenBatch

CFG = DiT.Config(depth=4, width=32, heads=4)


class TestDiTContract(BackboneContract):
    """Two modalities of different widths in one sequence, class-conditional."""

    config = CFG
    token_dims = (6, 3)
    num_classes = 3
    entry_points = False        # a built-in: independent of whatever else is installed


class TestDiTContractUnconditional(BackboneContract):
    config = DiT.Config(depth=2, width=24, heads=2)
    token_dims = (5,)
    num_classes = 0
    position_axes = 3
    entry_points = False


def make(token_dims=(8,), num_classes=4, seed=0):
    return randomize_parameters(CFG.build(token_dims=token_dims, num_classes=num_classes), seed)


def toy_batch(b=3, n=10, c=8, labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    return TokenBatch.single(torch.randn(b, n, c, generator=g), pos, labels=labels)


@torch.no_grad()
def test_truncated_forward_equals_full_forward():
    model, batch = make(), toy_batch()
    t = torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    full = model(batch.tokens, t, batch, feature_layers=(1, 2, 3, 4))
    for k in range(1, 5):
        out = model(batch.tokens, t, batch, feature_layers=(k,), stop_after=k)
        assert set(out.features) == {k}
        assert torch.equal(out.features[k], full.features[k])
    assert model(batch.tokens, t, batch, stop_after=2).velocity is None


@torch.no_grad()
def test_features_are_one_indexed_block_outputs():
    model, batch = make(), toy_batch()
    seen = {}
    for i, blk in enumerate(model.blocks, start=1):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    out = model(batch.tokens, torch.rand(3), batch, feature_layers=(1, 3))
    assert torch.equal(out.features[1], seen[1]) and torch.equal(out.features[3], seen[3])
    assert not torch.equal(seen[1], seen[3])


@torch.no_grad()
def test_homogeneous_per_token_time_equals_scalar_time():
    model, batch = make(), toy_batch(labels=torch.tensor([0, 1, 4]))
    t = torch.rand(3, generator=torch.Generator().manual_seed(2))
    a = model(batch.tokens, t, batch, feature_layers=(2,))
    b = model(batch.tokens, t[:, None].expand(3, 10), batch, feature_layers=(2,))
    assert torch.equal(a.velocity, b.velocity)
    assert torch.equal(a.features[2], b.features[2])
    # and per-token time is really per token: a different time on some tokens changes things
    tt = t[:, None].repeat(1, 10)
    tt[:, :4] = 0.9
    c = model(batch.tokens, tt, batch)
    assert not torch.allclose(a.velocity, c.velocity, atol=1e-4)


@torch.no_grad()
def test_padding_tokens_do_not_affect_valid_tokens():
    model = make()
    base = toy_batch()
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[0, 7:] = False
    valid[2, :3] = False
    batch = attrs.evolve(base, valid=valid)
    t = torch.rand(3, 10, generator=torch.Generator().manual_seed(3))
    ref = model(batch.tokens, t, batch, feature_layers=(1, 4))
    junk = torch.randn(3, 10, 8) * 100
    x = torch.where(valid[..., None], batch.tokens, junk)
    t2 = torch.where(valid, t, 1 - t)
    out = model(x, t2, batch, feature_layers=(1, 4))
    torch.testing.assert_close(out.velocity[valid], ref.velocity[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.features[4][valid], ref.features[4][valid], rtol=0, atol=1e-5)
    # the mask is what protects them: without it, the junk leaks into valid tokens
    leaky = model(x, t2, base).velocity
    assert not torch.allclose(leaky[valid], ref.velocity[valid], atol=1e-3)


@torch.no_grad()
def test_labels_with_null_class():
    model = make(num_classes=4)
    t = torch.rand(3, generator=torch.Generator().manual_seed(4))
    null = toy_batch(labels=torch.full((3,), 4))          # label num_classes = the null class
    cond = toy_batch(labels=torch.tensor([0, 1, 3]))
    v_null = model(null.tokens, t, null).velocity
    v_cond = model(cond.tokens, t, cond).velocity
    assert torch.isfinite(v_null).all()
    assert not torch.allclose(v_null, v_cond, atol=1e-4)
    with pytest.raises(IndexError):
        bad = toy_batch(labels=torch.full((3,), 5))
        model(bad.tokens, t, bad)


@torch.no_grad()
def test_two_modalities_of_different_widths_in_one_sequence():
    model = make(token_dims=(8, 3), num_classes=0)
    b, n = 2, 12
    ids = (torch.arange(n) >= 8).long()[None].expand(b, n).contiguous()     # 8 tokens, then 4
    cv = torch.arange(8)[None, None] < torch.tensor([8, 3])[ids][..., None]
    x = torch.randn(b, n, 8) * cv
    batch = TokenBatch(tokens=x, positions=torch.rand(b, n, 2), modality_ids=ids,
                       valid=torch.ones(b, n, dtype=torch.bool),
                       condition=torch.zeros(b, n, dtype=torch.bool), channel_valid=cv)
    t = torch.rand(b)
    v = model(x, t, batch).velocity
    assert v.shape == (b, n, 8) and torch.isfinite(v).all()
    assert (v[:, 8:, 3:] == 0).all(), "the narrow modality's padded channels must be zero"
    assert (v[:, 8:, :3] != 0).any() and (v[:, :8] != 0).any()
    # each modality goes through its own input projection
    before = v.clone()
    model.inputs[1].weight.add_(torch.randn(model.inputs[1].weight.shape))
    after = model(x, t, batch).velocity
    assert not torch.allclose(before[:, 8:], after[:, 8:])
    # padded channels of the narrow modality are never read
    junk = torch.where(cv, x, torch.randn(b, n, 8) * 100)
    assert torch.equal(model(junk, t, batch).velocity, after)
    # a batch holding only one of the two modalities works too
    only0 = attrs.evolve(batch, modality_ids=torch.zeros_like(ids), channel_valid=None)
    assert model(x, t, only0).velocity.shape == (b, n, 8)


def test_resolve_layer():
    assert (resolve_layer(0.3, 28), resolve_layer(0.7, 28)) == (8, 20)
    assert (resolve_layer(0.3, 12), resolve_layer(0.7, 12)) == (4, 8)
    assert resolve_layer(1.0, 28) == 28 and resolve_layer(0.01, 28) == 1
    assert resolve_layer(5, 28) == 5 and isinstance(resolve_layer(5, 28), int)
    assert ObjectiveConfig().layers(28) == (8, 20)
    assert ObjectiveConfig(student_layer=3, teacher_layer=0.5).layers(12) == (3, 6)


@pytest.mark.parametrize("student, teacher, depth, match", [
    (20, 8, 28, "shallower"),            # student deeper than teacher
    (8, 8, 28, "shallower"),             # equal
    (0.7, 0.3, 28, "shallower"),
    (4, 30, 28, "outside 1..28"),        # out of range
    (30, 31, 28, "outside 1..28"),
])
def test_layer_resolution_errors(student, teacher, depth, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(student_layer=student, teacher_layer=teacher).layers(depth)


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-1, ValueError), (0.0, ValueError),
                                        (1.5, ValueError), (True, TypeError), ("8", TypeError)])
def test_layer_values_are_checked_at_construction(value, exc):
    with pytest.raises(exc):
        ObjectiveConfig(student_layer=value)
