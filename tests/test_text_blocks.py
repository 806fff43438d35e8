"""The MMDiT's text blocks (``text_blocks``): a context refiner over the text tokens alone, with
1-D RoPE over the token index, before the joint blocks."""

from __future__ import annotations

import attrs
import torch

from selfflow_core import MMDiT, TextSpec, make_converter, to_data
from selfflow_core.builtin.mmdit_blocks import TextBlock, sequence_rope
from selfflow_core.testing import BackboneContract, randomize_parameters
from selfflow_core.types import TokenBatch

REFINED = MMDiT.Config(double_blocks=1, single_blocks=1, width=32, heads=2, axes_dim=(8, 4, 4),
                       text_blocks=2)
IDS = TextSpec(max_length=8, vocab_size=20)


class TestMMDiTTextBlocksContract(BackboneContract):
    config = REFINED
    text = IDS
    num_classes = 0
    entry_points = False


def make(config=REFINED, seed=0):
    torch.manual_seed(seed)
    model = config.build(token_dims=(6,), num_classes=0, text=IDS)
    return randomize_parameters(model, seed=seed, std=0.1).eval()


def batch(b=3, n=10, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, pos = torch.randn(b, n, 6, generator=g), torch.rand(b, n, 2, generator=g) * 8
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[:, 8 - pad:] = False
    ids = torch.randint(1, 20, (b, 8), generator=g) * mask
    return attrs.evolve(TokenBatch.single(x, pos), text_ids=ids, text_mask=mask)


def test_the_default_has_none_and_is_left_out_of_config_data():
    plain = MMDiT.Config(double_blocks=1, single_blocks=1, width=32, heads=2, axes_dim=(16,))
    assert len(plain.build(token_dims=(6,), text=IDS).text_blocks) == 0
    conv = make_converter()
    assert "text_blocks" not in to_data(conv, plain)
    assert to_data(conv, attrs.evolve(plain, text_blocks=2))["text_blocks"] == 2
    assert len(make().text_blocks) == 2
    assert REFINED.depth == 2                   # Self-Flow's layers count the joint blocks only


@torch.no_grad()
def test_a_text_block_sees_relative_positions_only():
    """The same tokens after 3 masked padding tokens give the same outputs: the block reads
    no absolute position (1-D RoPE), and padding is not attended."""
    torch.manual_seed(0)
    block = randomize_parameters(TextBlock(32, 2, 64, qkv_bias=True), seed=0, std=0.1).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ref = block(x, sequence_rope(5, 16, 10000.0, "cpu"), mask[:, None, None, :])
    shifted = torch.cat([torch.randn(2, 3, 32), x], dim=1)
    keys = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], dim=1)
    out = block(shifted, sequence_rope(8, 16, 10000.0, "cpu"), keys[:, None, None, :])
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-5, atol=1e-5)
    # and it mixes tokens: changing one changes the others
    moved = x.clone()
    moved[:, 0] = torch.randn(2, 32)
    other = block(moved, sequence_rope(5, 16, 10000.0, "cpu"), mask[:, None, None, :])
    assert not torch.allclose(other[:, 1:], ref[:, 1:], atol=1e-4)


@torch.no_grad()
def test_text_blocks_change_the_output_padding_does_not_and_the_empty_prompt_is_finite():
    model, b = make(), batch()
    t = torch.rand(3, generator=torch.Generator().manual_seed(1))
    ref = model(b.tokens, t, b).velocity
    # the same weights without the refiner give another output
    plain = make(attrs.evolve(REFINED, text_blocks=0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("text_blocks.")})
    assert not torch.allclose(plain(b.tokens, t, b).velocity, ref, atol=1e-4)
    ids = b.text_ids.clone()
    ids[:, -1] = 7                               # a padded position
    torch.testing.assert_close(model(b.tokens, t, attrs.evolve(b, text_ids=ids)).velocity, ref,
                               rtol=0, atol=1e-6)
    empty = attrs.evolve(b, text_mask=torch.zeros_like(b.text_mask))
    v_empty = model(b.tokens, t, empty).velocity
    assert torch.isfinite(v_empty).all()
    junk = attrs.evolve(empty, text_ids=torch.randint(1, 20, b.text_ids.shape))
    torch.testing.assert_close(model(b.tokens, t, junk).velocity, v_empty, rtol=0, atol=1e-6)


def test_gradient_reaches_the_text_blocks():
    model, b = make().train(), batch()
    model(b.tokens, torch.rand(3), b).velocity.square().mean().backward()
    for name, p in model.text_blocks.named_parameters():
        assert p.grad is not None and p.grad.ne(0).any(), name
