"""``TokenBatch`` operations go through its own methods, which map over every field: none can
drop ``channel_valid`` or ``labels`` (as hand-written field lists did under DDP and in CFG)."""

from __future__ import annotations

import attrs
import pytest
import torch

from selfflow_core import TokenBatch
from selfflow_core.interfaces import Backbone
from selfflow_core.sampling import sample
from selfflow_core.types import BackboneOutput


def full_batch(b=3, n=5, c=4) -> TokenBatch:
    """A batch with every optional field set, each sample's values distinct."""
    g = torch.Generator().manual_seed(0)
    return TokenBatch(
        tokens=torch.randn(b, n, c, generator=g), positions=torch.rand(b, n, 2, generator=g),
        modality_ids=torch.randint(0, 2, (b, n), generator=g),
        valid=torch.rand(b, n, generator=g) > 0.2, condition=torch.rand(b, n, generator=g) > 0.7,
        labels=torch.arange(b), channel_valid=torch.rand(b, n, c, generator=g) > 0.3,
        text=torch.randn(b, 6, 3, generator=g), text_ids=torch.randint(1, 9, (b, 6), generator=g),
        text_mask=torch.rand(b, 6, generator=g) > 0.3, text_pooled=torch.randn(b, 2, generator=g))


def fields(batch: TokenBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in attrs.fields(TokenBatch)
            if f.name != "padded"}


def test_every_field_but_the_host_hint_is_a_tensor_the_methods_cover():
    assert all(isinstance(v, torch.Tensor) for v in fields(full_batch()).values())
    hinted = full_batch().with_padding_hint()
    assert hinted.padded is True and hinted.repeat_samples(2).padded is True
    assert TokenBatch.cat([hinted, hinted]).padded
    assert TokenBatch.cat([hinted, full_batch()]).padded is None


def test_repeat_rows_and_cat_keep_every_field():
    batch = full_batch()
    rep = batch.repeat_samples(2)
    for name, value in fields(batch).items():
        assert torch.equal(getattr(rep, name), value.repeat_interleave(2, 0)), name
    rows = rep.rows(slice(1, None, 2))  # a rank's share of the global batch
    for name, value in fields(batch).items():
        assert torch.equal(getattr(rows, name), value), name
    both = TokenBatch.cat([batch, batch.rows(torch.tensor([2, 0]))])
    for name, value in fields(batch).items():
        assert torch.equal(getattr(both, name), torch.cat([value, value[[2, 0]]])), name


def test_optional_fields_stay_absent_and_mixing_is_refused():
    plain = attrs.evolve(full_batch(), labels=None, channel_valid=None)
    assert plain.repeat_samples(2).channel_valid is None
    assert TokenBatch.cat([plain, plain]).labels is None
    with pytest.raises(ValueError, match="set in some batches only"):
        TokenBatch.cat([plain, full_batch()])


class Recording(Backbone):
    """Returns zero velocity and remembers every batch it was called with."""

    depth, width, num_classes = 1, 4, 3

    def __init__(self):
        super().__init__()
        self.seen: list[TokenBatch] = []

    def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
        self.seen.append(batch)
        return BackboneOutput(velocity=torch.zeros_like(x), features={})


def test_guided_sampling_keeps_channel_valid_for_both_halves():
    prompt = full_batch()
    model = Recording()
    sample(model, prompt, steps=1, cfg_scale=2.0, null_label=3)
    (seen,) = model.seen
    assert seen.tokens.shape[0] == 6
    assert torch.equal(seen.channel_valid, torch.cat([prompt.channel_valid] * 2))
    assert torch.equal(seen.labels, torch.tensor([0, 1, 2, 3, 3, 3]))
