"""ODE samplers: the time grid, Euler and Heun on velocity fields known in closed form,
classifier-free guidance, seeds and held conditioning tokens."""

from __future__ import annotations

import pytest
import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.flow import shift_time
from selfflow_core.interfaces import Backbone
from selfflow_core.sampling import sample, time_grid
from selfflow_core.testing import randomize_parameters, torch_threads
from selfflow_core.types import BackboneOutput, TokenBatch

B, N, C, CLASSES = 3, 5, 4, 3
pytestmark = pytest.mark.usefixtures("one_thread")


class Field(Backbone):
    """A stub backbone returning ``fn(x, t, batch)`` and recording every call."""

    depth, width = 1, 1

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
        self.calls.append((x.clone(), t.clone(), batch))
        return BackboneOutput(velocity=self.fn(x, t, batch), features={})


def prompt(labels: torch.Tensor | None = None, condition: torch.Tensor | None = None,
           tokens: torch.Tensor | None = None) -> TokenBatch:
    tokens = torch.zeros(B, N, C) if tokens is None else tokens
    positions = torch.arange(N, dtype=torch.float32)[None, :, None].expand(B, N, 1)
    return TokenBatch.single(tokens, positions, labels=labels, condition=condition)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def initial_noise(seed: int = 0) -> torch.Tensor:
    """The noise ``sample`` starts from with ``gen(seed)``."""
    return torch.randn(B, N, C, generator=gen(seed))


# -- time grid ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_time_grid_runs_from_one_to_zero_monotonically(steps, shift):
    grid = time_grid(steps, shift)
    assert grid.shape == (steps + 1,) and grid.dtype == torch.float32
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())


def test_time_grid_shift_formula():
    base = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    torch.testing.assert_close(time_grid(10, 1.0), base.float())
    for alpha in (0.5, 2.0, 3.0):
        expected = alpha * base / (1 + (alpha - 1) * base)
        torch.testing.assert_close(time_grid(10, alpha), expected.float())
        torch.testing.assert_close(shift_time(base, alpha), expected)
    # alpha > 1 spends the steps at higher noise: every interior time is larger
    assert bool((time_grid(10, 3.0)[1:-1] > time_grid(10, 1.0)[1:-1]).all())
    assert bool((time_grid(10, 0.5)[1:-1] < time_grid(10, 1.0)[1:-1]).all())


# -- integrators on known fields ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps, shift", [(1, 1.0), (3, 1.0), (8, 3.0)])
def test_point_mass_is_reached(method, steps, shift):
    """Data = one point x0: the exact field of the linear path is v(x, t) = (x - x0) / t, whose
    trajectories are straight lines into x0, so both integrators land on x0 at any step count."""
    x0 = torch.randn(B, N, C, generator=gen(7)) * 2 + 1
    model = Field(lambda x, t, batch: (x - x0) / t[..., None])
    out = sample(model, prompt(), steps=steps, method=method, shift=shift, generator=gen())
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    # Heun adds a second evaluation on every step but the last (t_next = 0)
    assert len(model.calls) == (steps if method == "euler" else 2 * steps - 1)


MU, S = 2.0, 0.5


def gaussian_field(x, t, batch):
    """Exact velocity for data ~ N(MU, S^2) per coordinate: x_t = (1-t) MU + sigma_t z with
    sigma_t^2 = (1-t)^2 S^2 + t^2; its trajectories curve, so Euler is only first-order."""
    t = t[..., None].double()
    var = (1 - t) ** 2 * S**2 + t**2
    return (-MU + (t - (1 - t) * S**2) / var * (x.double() - (1 - t) * MU)).to(x.dtype)


def test_heun_beats_euler_on_a_curved_field_and_both_converge():
    exact = MU + S * initial_noise()  # where the flow maps the starting noise
    errors = {}
    for method in ("euler", "heun"):
        for steps in (4, 16, 64):
            out = sample(Field(gaussian_field), prompt(), steps=steps, method=method,
                         generator=gen())
            errors[method, steps] = (out - exact).abs().max().item()
    for steps in (4, 16, 64):
        assert errors["heun", steps] < errors["euler", steps] / 2, errors
    assert errors["heun", 64] < errors["euler", 64] / 20, errors
    assert 3 < errors["euler", 4] / errors["euler", 16] < 6, errors  # first order: ~4
    assert errors["heun", 4] / errors["heun", 16] > 10, errors  # second order: ~16
    assert errors["heun", 64] < 1e-3 and errors["euler", 64] < 5e-2


def test_constant_field_with_one_step():
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out = sample(Field(lambda x, t, batch: c.expand_as(x)), prompt(), steps=1, generator=gen())
    torch.testing.assert_close(out, initial_noise() - c)


# -- classifier-free guidance -------------------------------------------------------------------

TABLE = torch.randn(CLASSES + 1, C, generator=gen(3))  # row CLASSES: the null class


def labelled_field(x, t, batch):
    return -x * t[..., None] + TABLE[batch.labels][:, None, :]


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guidance_formula(scale, method):
    """v = v_uncond + scale * (v_cond - v_uncond), per row, in one doubled batch."""
    labels = torch.tensor([0, 2, 1])
    model = Field(labelled_field)
    out = sample(model, prompt(labels), steps=4, method=method, cfg_scale=scale,
                 null_label=CLASSES, generator=gen())
    guided = TABLE[CLASSES] + scale * (TABLE[labels] - TABLE[CLASSES])
    expected = sample(Field(lambda x, t, batch: -x * t[..., None] + guided[:, None, :]),
                      prompt(labels), steps=4, method=method, generator=gen())
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if scale != 1.0:  # one forward of 2B rows: conditional rows, then null-label rows
        x, t, batch = model.calls[0]
        assert x.shape[0] == 2 * B and torch.equal(batch.labels, torch.tensor([0, 2, 1, 3, 3, 3]))
        assert torch.equal(x[:B], x[B:]) and torch.equal(t[:B], t[B:])
    else:
        assert all(c[0].shape[0] == B for c in model.calls)


@pytest.fixture(scope="module")
def dit() -> DiT:
    with torch_threads(1):
        model = DiT.Config(depth=2, width=32, heads=4).build(token_dims=(C,), num_classes=CLASSES)
        return randomize_parameters(model, seed=0, std=0.2).eval()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(dit, method):
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, CLASSES)
    kw = dict(steps=3, method=method, generator=None)

    def run(p, **extra):
        return sample(dit, p, **{**kw, "generator": gen(), **extra})

    cond, uncond = run(prompt(labels)), run(prompt(null))
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the labels matter
    torch.testing.assert_close(run(prompt(labels), cfg_scale=1.0, null_label=CLASSES), cond)
    torch.testing.assert_close(run(prompt(labels), cfg_scale=0.0, null_label=CLASSES), uncond,
                               atol=1e-5, rtol=1e-5)
    guided = run(prompt(labels), cfg_scale=3.0, null_label=CLASSES)
    assert not torch.allclose(guided, cond, atol=1e-3)
    # no labels, or no null class: guidance does not apply
    torch.testing.assert_close(run(prompt(None), cfg_scale=3.0, null_label=CLASSES),
                               run(prompt(None)))
    torch.testing.assert_close(run(prompt(labels), cfg_scale=3.0, null_label=None), cond)


# -- seeds and held tokens ----------------------------------------------------------------------

def test_seeds_are_reproducible(dit):
    labels = torch.tensor([0, 1, 2])
    a = sample(dit, prompt(labels), steps=3, method="heun", cfg_scale=2.0, null_label=CLASSES,
               generator=gen(11))
    b = sample(dit, prompt(labels), steps=3, method="heun", cfg_scale=2.0, null_label=CLASSES,
               generator=gen(11))
    c = sample(dit, prompt(labels), steps=3, method="heun", cfg_scale=2.0, null_label=CLASSES,
               generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_conditioning_tokens_are_held_clean(method, cfg_scale):
    condition = torch.zeros(B, N, dtype=torch.bool)
    condition[:, :2] = True
    condition[1, 4] = True
    held = torch.randn(B, N, C, generator=gen(5))
    p = prompt(torch.tensor([0, 1, 2]), condition=condition, tokens=held)
    model = Field(labelled_field)
    out = sample(model, p, steps=4, method=method, cfg_scale=cfg_scale, null_label=CLASSES,
                 generator=gen())
    assert torch.equal(out[condition], held[condition])
    assert not torch.allclose(out[~condition], held[~condition])
    for x, t, _ in model.calls:
        reps = x.shape[0] // B
        cond = condition.repeat(reps, 1)
        assert torch.equal(x[cond], held.repeat(reps, 1, 1)[cond])  # seen clean ...
        assert bool((t[cond] == 0).all())  # ... at t = 0
        assert bool((t[~cond] > 0).all())
    # and the same tokens with a real network
    out = sample(DiT.Config(depth=2, width=32, heads=4).build(token_dims=(C,), num_classes=3),
                 p, steps=2, method=method, cfg_scale=cfg_scale, null_label=CLASSES,
                 generator=gen())
    assert torch.equal(out[condition], held[condition])
