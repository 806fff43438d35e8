"""Data prediction (``prediction="data"``): the output head predicts clean tokens, the backbone
returns their velocity, and everything downstream (objective, samplers) is unchanged."""

from __future__ import annotations

import attrs
import pytest
import torch

from selfflow_core import DiT, MMDiT, TextSpec, make_converter, to_data
from selfflow_core.flow import interpolate, velocity_from_data, velocity_target
from selfflow_core.testing import BackboneContract, randomize_parameters
from selfflow_core.types import TokenBatch

DIT = DiT.Config(depth=2, width=24, heads=2, prediction="data")
MMDIT = MMDiT.Config(double_blocks=1, single_blocks=1, width=32, heads=2, axes_dim=(8, 4, 4),
                     prediction="data")
IDS = TextSpec(max_length=8, vocab_size=20)


class TestDiTDataPredictionContract(BackboneContract):
    config = DIT
    token_dims = (6, 3)
    num_classes = 3
    entry_points = False


class TestMMDiTDataPredictionContract(BackboneContract):
    config = MMDIT
    text = IDS
    num_classes = 0
    entry_points = False


def test_an_exact_data_prediction_gives_the_exact_velocity():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)
    t = torch.rand(4, 5, generator=g) * 0.9 + 0.1                  # all above min_t
    xt = interpolate(x0, x1, t)
    torch.testing.assert_close(velocity_from_data(xt, x0, t, 0.05), velocity_target(x0, x1))
    # per-sample time broadcasts like per-token time
    ts = torch.full((4,), 0.5)
    torch.testing.assert_close(velocity_from_data(interpolate(x0, x1, ts), x0, ts, 0.05),
                               velocity_target(x0, x1))


def test_time_is_held_at_min_t():
    x, data = torch.ones(1, 2, 1) * 3, torch.ones(1, 2, 1)
    t = torch.tensor([[0.0, 0.5]])
    v = velocity_from_data(x, data, t, 0.25)
    assert v.flatten().tolist() == [2 / 0.25, 2 / 0.5]
    assert torch.isfinite(v).all()


def _batch(b=3, n=10, text=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, pos = torch.randn(b, n, 6, generator=g), torch.rand(b, n, 3, generator=g) * 4
    batch = TokenBatch.single(x, pos)
    if text:
        mask = torch.ones(b, 8, dtype=torch.bool)
        batch = attrs.evolve(batch, text_ids=torch.randint(1, 20, (b, 8), generator=g),
                             text_mask=mask)
    return batch


@pytest.mark.parametrize("config,text", [(DIT, None), (MMDIT, IDS)], ids=["dit", "mmdit"])
@torch.no_grad()
def test_the_velocity_is_that_of_the_same_head_read_as_data(config, text):
    """The same weights built for velocity prediction give the head's raw output ``h``; with
    data prediction the backbone must return ``(x - h) / max(t, min_t)``, token by token."""
    kw = {"token_dims": (6,), "num_classes": 0}
    if text is not None:
        kw["text"] = text
    as_data = randomize_parameters(config.build(**kw), seed=1).eval()
    raw = attrs.evolve(config, prediction="velocity").build(**kw).eval()
    raw.load_state_dict(as_data.state_dict())
    batch = _batch(text=text is not None)
    t = torch.rand(3, 10, generator=torch.Generator().manual_seed(2))
    t[0, :3] = 0.0                                                 # below min_t: held at it
    head = raw(batch.tokens, t, batch).velocity
    want = (batch.tokens - head) / t.clamp_min(config.min_t)[..., None]
    torch.testing.assert_close(as_data(batch.tokens, t, batch).velocity, want)


def test_config_checks_and_the_default_is_left_out_of_the_config_data():
    with pytest.raises(ValueError, match="prediction"):
        DiT.Config(prediction="noise")
    with pytest.raises(ValueError, match="min_t"):
        MMDiT.Config(min_t=0.0)
    # a config saved before these fields existed still matches one that leaves them alone
    conv = make_converter()
    assert not {"prediction", "min_t"} & (set(to_data(conv, DiT.Config()))
                                          | set(to_data(conv, MMDiT.Config())))
    data = to_data(conv, DIT)
    assert data["prediction"] == "data"
    assert conv.structure(data, DiT.Config) == DIT
