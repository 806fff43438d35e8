"""The FLUX-style MMDiT: the backbone contract with and without a text stream, text conditioning
and masking, joint attention, per-token time against the text stream's mean rule, RoPE axes,
block numbering, the paper's size, activation checkpointing, compile and FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

from selfflow_core import DiT, MMDiT, TextSpec
from selfflow_core.builtin.dit import sincos
from selfflow_core.testing import BackboneContract, randomize_parameters
from selfflow_core.types import TokenBatch

SMALL = MMDiT.Config(double_blocks=2, single_blocks=2, width=32, heads=2, axes_dim=(8, 4, 4))
IDS = TextSpec(max_length=8, vocab_size=20)
EMB = TextSpec(max_length=6, dim=7, pooled_dim=5)


class TestMMDiTContract(BackboneContract):
    """No text stream: two modalities of different widths, class-conditional."""

    config = SMALL
    token_dims = (6, 3)
    num_classes = 3
    entry_points = False


class TestMMDiTContractTextIds(BackboneContract):
    """A trainable encoder's ids, 3 position axes, per-block modulation offsets, no classes."""

    config = attrs.evolve(SMALL, block_offsets=True, double_blocks=1)
    text = IDS
    num_classes = 0
    position_axes = 3
    entry_points = False


class TestMMDiTContractTextEmbeddings(BackboneContract):
    """A frozen encoder's embeddings with a pooled vector, plus classes and mixed widths."""

    config = attrs.evolve(SMALL, qkv_bias=False)
    text = EMB
    token_dims = (6, 3)
    num_classes = 3
    position_axes = 1
    entry_points = False


def make(text=IDS, num_classes=4, config=SMALL, token_dims=(6,), seed=0):
    torch.manual_seed(seed)                             # the initialisation, then the noise
    model = config.build(token_dims=token_dims, num_classes=num_classes, text=text)
    return randomize_parameters(model, seed=seed, std=0.1).eval()


def batch_with_text(b=3, n=10, length=8, vocab=20, seed=0, pad=3, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 6, generator=g)
    pos = torch.rand(b, n, 2, generator=g) * 8
    batch = TokenBatch.single(x, pos, labels=torch.arange(b) % 4 if labels else None)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, length - pad:] = False
    ids = torch.randint(1, vocab, (b, length), generator=g) * mask
    return attrs.evolve(batch, text_ids=ids, text_mask=mask)


def velocity(model, batch, t):
    return model(batch.tokens, t, batch).velocity


# ---- text conditioning ------------------------------------------------------------------------

@torch.no_grad()
def test_text_ids_condition_the_output_and_padding_does_not():
    model, batch = make(), batch_with_text()
    t = torch.rand(3, generator=torch.Generator().manual_seed(1))
    ref = velocity(model, batch, t)
    ids = batch.text_ids.clone()
    ids[1, 2] = ids[1, 2] % 19 + 1                      # a real token of sample 1
    moved = velocity(model, attrs.evolve(batch, text_ids=ids), t)
    assert not torch.allclose(moved[1], ref[1], atol=1e-4)
    torch.testing.assert_close(moved[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-6)  # per sample
    ids = batch.text_ids.clone()
    ids[:, -1] = 7                                      # a padded position (text_mask False)
    torch.testing.assert_close(velocity(model, attrs.evolve(batch, text_ids=ids), t), ref,
                               rtol=0, atol=1e-6)


@torch.no_grad()
def test_empty_prompt_and_no_prompt():
    model, batch = make(), batch_with_text()
    t = torch.rand(3)
    empty = attrs.evolve(batch, text_mask=torch.zeros_like(batch.text_mask))
    v_empty = velocity(model, empty, t)
    assert torch.isfinite(v_empty).all()
    assert not torch.allclose(v_empty, velocity(model, batch, t), atol=1e-4)
    # whatever the masked ids are, the empty prompt is one prompt
    junk = attrs.evolve(empty, text_ids=torch.randint(1, 20, empty.text_ids.shape))
    assert torch.allclose(velocity(model, junk, t), v_empty, atol=1e-6)
    # a text model also runs without any text (class-conditional use)
    none = attrs.evolve(batch, text_ids=None, text_mask=None)
    assert torch.isfinite(velocity(model, none, t)).all()


def test_a_model_without_text_refuses_a_prompt_and_dit_refuses_text():
    model, batch = make(text=None), batch_with_text()
    with pytest.raises(ValueError, match="without a text stream"):
        model(batch.tokens, torch.rand(3), batch)
    with pytest.raises(ValueError, match="DiT has no text stream; use the mmdit backbone"):
        DiT.Config(depth=2, width=16, heads=2).build(token_dims=(4,), text=IDS)
    emb = make(text=EMB, num_classes=0)
    with pytest.raises(ValueError, match="built for text embeddings"):
        emb(batch.tokens, torch.rand(3), batch)
    with pytest.raises(ValueError, match="max_length"):
        long = attrs.evolve(batch, text_ids=torch.ones(3, 9, dtype=torch.long),
                            text_mask=torch.ones(3, 9, dtype=torch.bool))
        make()(batch.tokens, torch.rand(3), long)


@torch.no_grad()
def test_joint_attention_lets_latent_tokens_read_the_text():
    """After the first block (double, and single-only), a latent token's feature depends on the
    text: the two streams attend jointly."""
    batch = batch_with_text(pad=0)
    other = attrs.evolve(batch, text_ids=batch.text_ids % 19 + 1)
    t = torch.rand(3)
    for cfg in (SMALL, attrs.evolve(SMALL, double_blocks=0)):
        model = make(config=cfg)
        a = model(batch.tokens, t, batch, feature_layers=(1,), stop_after=1).features[1]
        b = model(other.tokens, t, other, feature_layers=(1,), stop_after=1).features[1]
        assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4), cfg


@torch.no_grad()
def test_embeddings_and_pooled_vector_condition_the_output():
    model = make(text=EMB, num_classes=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g)
    base = TokenBatch.single(x, torch.rand(2, 9, 2, generator=g))
    batch = attrs.evolve(base, text=torch.randn(2, 6, 7, generator=g),
                         text_mask=torch.ones(2, 6, dtype=torch.bool),
                         text_pooled=torch.randn(2, 5, generator=g))
    t = torch.rand(2)
    ref = velocity(model, batch, t)
    pooled = attrs.evolve(batch, text_pooled=batch.text_pooled + 1)
    assert not torch.allclose(velocity(model, pooled, t), ref, atol=1e-4)
    emb = attrs.evolve(batch, text=batch.text.flip(1))   # the same vectors, other order
    assert torch.isfinite(velocity(model, emb, t)).all()
    assert model.text_embed is None and model.text_in.in_features == 7
    with pytest.raises(ValueError, match="pooled"):
        make(text=IDS)(x, t, attrs.evolve(batch, text=None, text_ids=torch.ones(2, 6).long()))


def test_gradient_reaches_the_text_embedding():
    model, batch = make().train(), batch_with_text()
    model(batch.tokens, torch.rand(3), batch).velocity.square().mean().backward()
    grad = model.text_embed.weight.grad
    used = batch.text_ids[batch.text_mask].unique()
    assert (grad[used].abs().sum(-1) > 0).all()
    assert (grad[0] == 0).all()                         # the padding id
    unused = sorted(set(range(20)) - set(used.tolist()) - {0})
    assert all((grad[i] == 0).all() for i in unused)
    assert model.text_pos.grad[:5].ne(0).any()
    emb = make(text=EMB, num_classes=0).train()
    x = torch.randn(2, 9, 6)
    b2 = attrs.evolve(TokenBatch.single(x, torch.rand(2, 9, 2)), text=torch.randn(2, 6, 7),
                      text_mask=torch.ones(2, 6, dtype=torch.bool), text_pooled=torch.randn(2, 5))
    emb(x, torch.rand(2), b2).velocity.square().mean().backward()
    assert emb.text_in.weight.grad.ne(0).any() and emb.pooled_mlp[0].weight.grad.ne(0).any()


# ---- per-token time and the text stream's mean rule --------------------------------------------

def per_token_vectors(model, t, labels):
    """Each latent token's conditioning vector, computed token by token."""
    c = model.time_mlp(sincos(t * 1000.0, 256))
    return c + model.label_embed(labels)[:, None] if labels is not None else c


def captured_text_vector(model, batch, t):
    seen = []
    handle = model.txt_mod.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    single = []
    h2 = model.single_mod.register_forward_pre_hook(lambda m, args: single.append(args[0]))
    model(batch.tokens, t, batch)
    handle.remove()
    h2.remove()
    assert len(seen) == 1 and len(single) == 2
    assert torch.equal(single[1], seen[0])            # the single blocks' text slice: the same
    return seen[0]


@torch.no_grad()
def test_text_stream_is_modulated_with_the_mean_over_generated_tokens():
    model = make()
    batch = batch_with_text()
    b, n = batch.valid.shape
    g = torch.Generator().manual_seed(5)
    t = torch.where(torch.rand(b, n, generator=g) < 0.3, 0.9, 0.2)
    t[1] = torch.linspace(0.05, 0.95, n)                # all distinct times in one sample
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, -3:] = False
    condition = torch.zeros(b, n, dtype=torch.bool)
    condition[:, :2] = True                             # held clean (t = 0)
    t = torch.where(condition, 0.0, t)
    batch = attrs.evolve(batch, valid=valid, condition=condition)
    got = captured_text_vector(model, batch, t)
    c = per_token_vectors(model, t, batch.labels)
    m = batch.target_mask[..., None].float()
    torch.testing.assert_close(got, (c * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)
    # a sample with nothing to generate falls back to its valid tokens
    held = attrs.evolve(batch, condition=torch.ones(b, n, dtype=torch.bool).index_fill(
        0, torch.tensor([1, 2]), False))
    got = captured_text_vector(model, held, t)
    mv = valid[0, :, None].float()
    torch.testing.assert_close(got[0], (c[0] * mv).sum(0) / mv.sum(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_homogeneous_time_gives_the_text_stream_the_sample_time_exactly():
    model, batch = make(), batch_with_text()
    t = torch.rand(3, generator=torch.Generator().manual_seed(6))
    got = captured_text_vector(model, batch, t)
    want = model.time_mlp(sincos(t * 1000.0, 256)) + model.label_embed(batch.labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    cond = model.conditioning(t[:, None].expand(3, 10), batch, torch.float32)
    assert cond.rows.shape[0] == 3                      # one row per (sample, time)
    assert torch.equal(cond.text, cond.rows[cond.index[:, 0]])


@torch.no_grad()
def test_latent_tokens_use_their_own_time_not_the_sample_mean():
    model, batch = make(), batch_with_text()
    b, n = batch.valid.shape
    t = torch.where(torch.arange(n) % 2 == 0, 0.8, 0.1)[None].expand(b, n).contiguous()
    per_token = velocity(model, batch, t)
    mean_t = velocity(model, batch, t.mean(1))
    for j in range(n):
        assert not torch.allclose(per_token[:, j], mean_t[:, j], atol=1e-4), j


# ---- positions and shape ----------------------------------------------------------------------

@torch.no_grad()
def test_missing_position_axes_are_zero_and_text_is_unrotated():
    model, batch = make(), batch_with_text()
    t = torch.rand(3)
    three = attrs.evolve(batch, positions=torch.nn.functional.pad(batch.positions, (0, 1)))
    assert torch.equal(velocity(model, batch, t), velocity(model, three, t))
    cos, sin = model._rope(batch.positions, 8)
    assert cos.shape == (3, 1, 18, 8)
    assert (cos[:, :, :8] == 1).all() and (sin[:, :, :8] == 0).all()
    assert not (cos[:, :, 8:] == 1).all()
    with pytest.raises(ValueError, match="3 position axes"):
        four = attrs.evolve(batch, positions=torch.rand(3, 10, 4))
        model(four.tokens, t, four)


@torch.no_grad()
def test_absolute_positions_tell_a_token_where_it_is():
    """RoPE alone gives relative positions: without text (nothing at position 0), moving every
    latent token by the same offset leaves the output as it was. ``absolute_positions`` adds
    the DiT's sinusoidal embedding to the inputs, so the same move changes the output; it is
    left out of the config data at its default (old configs still match)."""
    from selfflow_core import make_converter, to_data
    from selfflow_core.builtin.dit import position_embedding

    batch = batch_with_text()
    batch = attrs.evolve(batch, text_ids=None, text_mask=None)
    moved = attrs.evolve(batch, positions=batch.positions + torch.tensor([3.0, -2.0]))
    t = torch.rand(3)
    rope_only = make(text=None)
    torch.testing.assert_close(velocity(rope_only, batch, t), velocity(rope_only, moved, t),
                               rtol=1e-4, atol=1e-5)
    absolute = make(text=None, config=attrs.evolve(SMALL, absolute_positions=True))
    assert (velocity(absolute, batch, t) - velocity(absolute, moved, t)).abs().max() > 1e-2
    # the embedding is the DiT's: the same function of the positions, added to the input
    emb = position_embedding(batch.positions, 32, "MMDiT")
    assert emb.shape == (3, 10, 32) and torch.equal(emb[..., 30:], torch.zeros(3, 10, 2))
    torch.testing.assert_close(emb[..., :10], sincos(batch.positions[..., 0], 10))
    conv = make_converter()
    assert "absolute_positions" not in to_data(conv, SMALL)
    assert to_data(conv, attrs.evolve(SMALL, absolute_positions=True))["absolute_positions"]


class TestMMDiTContractAbsolutePositions(BackboneContract):
    """Absolute position embeddings with a text stream."""

    config = attrs.evolve(SMALL, absolute_positions=True, double_blocks=1)
    text = IDS
    num_classes = 0
    entry_points = False


def test_config_checks():
    with pytest.raises(ValueError, match=r"32 // 2 = 16; got \(4, 4, 4\) \(sum 12\)"):
        MMDiT.Config(width=32, heads=2, axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match="even"):
        MMDiT.Config(width=32, heads=2, axes_dim=(5, 5, 6))
    with pytest.raises(ValueError, match="divisible"):
        MMDiT.Config(width=30, heads=4)
    with pytest.raises(ValueError, match="single_blocks"):
        MMDiT.Config(single_blocks=0)
    with pytest.raises(ValueError, match="dim.*vocab_size"):
        SMALL.build(token_dims=(4,), text=TextSpec(max_length=4))
    from selfflow_core import ConfigError, make_converter, structure

    with pytest.raises(ConfigError, match=r"\$\.axes_dim: 'axes_dim' must sum to the head dim"):
        structure(make_converter(), {"kind": "mmdit", "axes_dim": [8, 4]}, MMDiT.Config)
    cfg = MMDiT.Config(double_blocks=3, single_blocks=5, axes_dim=[6, 6, 4])
    assert cfg.depth == 8 and cfg.axes_dim == (6, 6, 4)
    assert MMDiT.Config().depth == 4 and MMDiT.Config().width // MMDiT.Config().heads == 16


def test_paper_shape_is_about_625m_parameters():
    cfg = MMDiT.Config.paper()
    assert (cfg.width, cfg.heads, cfg.double_blocks, cfg.single_blocks, cfg.axes_dim,
            cfg.mlp_ratio, cfg.qkv_bias) == (1152, 16, 7, 14, (24, 24, 24), 4.0, True)
    assert cfg.depth == 21
    with torch.device("meta"):                          # shapes only, nothing allocated
        model = cfg.build(token_dims=(16,), num_classes=0,
                          text=TextSpec(max_length=512, dim=4096))
    count = sum(p.numel() for p in model.parameters())
    assert 600e6 < count < 650e6, count
    assert len(model.repeated_blocks()) == 21


# ---- blocks: numbering, checkpointing, compile ------------------------------------------------

@torch.no_grad()
def test_features_are_the_latent_stream_after_each_block():
    model, batch = make(), batch_with_text()
    seen = {}
    for i, blk in enumerate(model.repeated_blocks(), start=1):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    out = model(batch.tokens, torch.rand(3), batch, feature_layers=(1, 2, 3, 4))
    assert torch.equal(out.features[1], seen[1][0]) and torch.equal(out.features[2], seen[2][0])
    assert torch.equal(out.features[3], seen[3][:, 8:]) and torch.equal(out.features[4],
                                                                         seen[4][:, 8:])
    assert list(model.repeated_blocks()) == [*model.double_blocks, *model.single_blocks]


def count_forwards(model):
    calls = [0] * len(model.repeated_blocks())
    for i, block in enumerate(model.repeated_blocks()):
        inner = block._forward

        def counted(*args, _i=i, _inner=inner):
            calls[_i] += 1
            return _inner(*args)

        block._forward = counted
    return calls


def loss_and_grads(model, batch, t):
    model.zero_grad()
    loss = model(batch.tokens, t, batch).velocity.square().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads():
    batch, t = batch_with_text(), torch.rand(3)
    plain, ac = make().train(), make().train()
    for block in ac.repeated_blocks():
        block.activation_checkpointing = True
    calls_plain, calls_ac = count_forwards(plain), count_forwards(ac)
    loss_p, grads_p = loss_and_grads(plain, batch, t)
    loss_a, grads_a = loss_and_grads(ac, batch, t)
    assert calls_plain == [1] * 4 and calls_ac == [2] * 4      # recomputed in the backward
    assert loss_a == loss_p
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_a[name], g, rtol=1e-5, atol=1e-7, msg=name)
    ac.eval()
    calls_ac[:] = [0] * 4
    with torch.no_grad():
        velocity(ac, batch, t)
    assert calls_ac == [1] * 4


def test_per_block_compile_same_outputs_and_names():
    import torch._dynamo

    batch, t = batch_with_text(), torch.rand(3)
    eager, compiled = make().train(), make().train()
    names = list(eager.state_dict())
    torch._dynamo.reset()
    for block in compiled.repeated_blocks():
        block.compile(backend="eager", dynamic=False)   # dynamo's graphs; no C compiler needed
    assert list(compiled.state_dict()) == names
    loss_e, grads_e = loss_and_grads(eager, batch, t)
    loss_c, grads_c = loss_and_grads(compiled, batch, t)
    assert loss_c == pytest.approx(loss_e, rel=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


class PaddedTextLeaks(MMDiT):
    """Ignores text_mask: padded text tokens are attended to."""

    def forward(self, x, t, batch, **kw):
        if batch.text_mask is not None:
            batch = attrs.evolve(batch, text_mask=torch.ones_like(batch.text_mask))
        return super().forward(x, t, batch, **kw)


def test_the_contract_catches_a_backbone_that_reads_padded_text():
    contract = TestMMDiTContractTextIds()
    batch, t = contract.make_batch(), torch.rand(contract.batch_size)
    for cls, ok in ((MMDiT, True), (PaddedTextLeaks, False)):
        model = randomize_parameters(cls(contract.config, token_dims=contract.token_dims,
                                         text=contract.text))
        if ok:
            contract.test_text_conditions_and_padding_is_ignored(model, batch, t)
        else:
            with pytest.raises(AssertionError, match="padded text token"):
                contract.test_text_conditions_and_padding_is_ignored(model, batch, t)


# ---- the trainer: a Self-Flow step, activation checkpointing; FSDP2 over 2 processes -----------

def trainer_config(run_dir, store, **changes):
    from selfflow_core.builtin.presets import toy
    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.config.run import CheckpointConfig
    from selfflow_core.testing import TINY_TOY

    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TINY_TOY, store=store, source="",
                        batch_size=8)
    cfg = attrs.evolve(
        base, modalities={"toy": spec}, backbone=attrs.evolve(SMALL, double_blocks=1),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        sampling=attrs.evolve(base.sampling, count=4, steps=2),
        tracker=NullTracker.Config(), steps=2, run_dir=str(run_dir), log_every=1)
    return attrs.evolve(cfg, **changes)


@pytest.mark.usefixtures("one_thread")
def test_self_flow_step_in_the_trainer_with_activation_checkpointing(tmp_path, toy_store,
                                                                     core_components):
    from selfflow_core.trainer import Trainer

    plain = Trainer(trainer_config(tmp_path / "a", toy_store), components=core_components,
                    progress=False)
    ac = Trainer(trainer_config(tmp_path / "b", toy_store, activation_checkpointing=True),
                 components=core_components, progress=False)
    assert isinstance(plain.backbone, MMDiT) and plain.backbone.depth == 3
    assert all(b.activation_checkpointing for b in ac.backbone.repeated_blocks())
    assert not any(b.activation_checkpointing for b in ac.teacher.model.repeated_blocks())
    terms_p, terms_a = plain.train_step(), ac.train_step()
    assert float(terms_p.rep.detach()) != 0.0            # the representation loss is on
    assert float(terms_a.total.detach()) == pytest.approx(float(terms_p.total.detach()),
                                                          rel=1e-6)
    grads = {n: p.grad for n, p in ac.model.named_parameters() if p.grad is not None}
    for name, p in plain.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


FSDP_DRIVER = textwrap.dedent("""
    import json, os, sys
    import attrs, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from selfflow_core import MMDiT, TextSpec, TokenBatch
    from selfflow_core.runtime.parallel import shard
    from selfflow_core.testing import randomize_parameters

    class Velocity(nn.Module):  # a root whose output FSDP2 can hook (a tensor)
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x, t, batch):
            return self.backbone(x, t, batch).velocity

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = MMDiT.Config(double_blocks=1, single_blocks=2, width=32, heads=2, axes_dim=(8, 4, 4))
    model = randomize_parameters(cfg.build(token_dims=(6,), num_classes=3,
                                           text=TextSpec(max_length=4, vocab_size=11)))
    for block in model.repeated_blocks():
        block.activation_checkpointing = True
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 6, generator=g)
    batch = TokenBatch.single(x, torch.rand(4, 7, 2, generator=g), labels=torch.arange(4) % 3)
    batch = attrs.evolve(batch, text_ids=torch.randint(1, 11, (4, 4), generator=g),
                         text_mask=torch.ones(4, 4, dtype=torch.bool))
    t = torch.rand(4, 7, generator=g)
    rows = slice(2 * rank, 2 * rank + 2)  # each rank: half of the batch
    root = Velocity(model).train()
    shard(root, init_device_mesh("cpu", (2,)), model.repeated_blocks())
    part = batch.rows(rows)
    root(part.tokens, t[rows], part).square().mean().backward()  # FSDP2 averages over ranks
    grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()}
    share = sum(p.to_local().numel() for p in model.parameters()) / sum(
        p.numel() for p in model.parameters())
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"grads": grads, "share": share}, f)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tmp_path):
    """Every block its own FSDP2 unit (with activation checkpointing), the shared modulation in
    the root: the gradients of a batch split over 2 gloo ranks equal one process's."""
    driver = tmp_path / "driver.py"
    driver.write_text(FSDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(driver), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(0.4 < r["share"] < 0.6 for r in ranks)

    torch.manual_seed(0)
    model = randomize_parameters(attrs.evolve(SMALL, double_blocks=1).build(
        token_dims=(6,), num_classes=3, text=TextSpec(max_length=4, vocab_size=11))).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 6, generator=g)
    batch = TokenBatch.single(x, torch.rand(4, 7, 2, generator=g), labels=torch.arange(4) % 3)
    ids = torch.randint(1, 11, (4, 4), generator=g)
    batch = attrs.evolve(batch, text_ids=ids, text_mask=torch.ones(4, 4, dtype=torch.bool))
    t = torch.rand(4, 7, generator=g)
    model(x, t, batch).velocity.square().mean().backward()
    for name, p in model.named_parameters():
        got = torch.tensor(ranks[0]["grads"][name])
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4, msg=name)
        assert ranks[0]["grads"][name] == ranks[1]["grads"][name]
