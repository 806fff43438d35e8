"""The SDE sampler (``method="sde"``, Euler–Maruyama with the "sigma" diffusion and a final mean
step, paper App. A.4), conditioning held at ``condition_t`` (App. E/F), their settings'
validation and their plumbing into ``generate`` and ``sample_info.json``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import attrs
import pytest
import torch

from selfflow_core import ConfigError, sample_checkpoint, shrink
from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.cli import main as cli
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.eval.samples import generate, sample_info, write_info
from selfflow_core.flow import shift_time
from selfflow_core.interfaces import Backbone
from selfflow_core.plugins.manager import Components
from selfflow_core.sampling import SamplingConfig, sample, sde_time_grid, time_grid
from selfflow_core.testing import randomize_parameters, torch_threads
from selfflow_core.types import BackboneOutput, TokenBatch

B, N, C, CLASSES = 3, 5, 4, 3
pytestmark = pytest.mark.usefixtures("one_thread")


class Field(Backbone):
    """A stub backbone ``model(x, t, batch)`` returning ``fn(x, t, batch)`` as the velocity and
    recording every call."""

    depth, width = 1, 1

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
        self.calls.append((x.clone(), t.clone(), batch))
        return BackboneOutput(velocity=self.fn(x, t, batch), features={})


def prompt(labels=None, condition=None, tokens=None, b: int = B, n: int = N,
           c: int = C) -> TokenBatch:
    tokens = torch.zeros(b, n, c) if tokens is None else tokens
    positions = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    return TokenBatch.single(tokens, positions, labels=labels, condition=condition)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TABLE = torch.randn(CLASSES + 1, C, generator=gen(3))  # row CLASSES: the null class


def labelled_field(x, t, batch):
    """A field that depends on x, t and the labels."""
    return -x * t[..., None] + TABLE[batch.labels][:, None, :]


def coupled_field(x, t, batch):
    """A field through which every token sees the others (as attention does)."""
    return x * (1 - t[..., None]) + x.mean(dim=1, keepdim=True) - 0.3


# -- (a) the right distribution, for a Gaussian known in closed form ----------------------------

MU, S = 2.0, 0.5


def gaussian_field(x, t, batch):
    """The exact velocity for data x0 ~ N(MU, S^2), x1 ~ N(0, 1): x_t = (1-t) x0 + t x1 is
    Gaussian with mean (1-t) MU and variance var_t = (1-t)^2 S^2 + t^2, and jointly Gaussian with
    x1 - x0 (mean -MU, Cov(x1 - x0, x_t) = t - (1-t) S^2), so
    v(x, t) = E[x1 - x0 | x_t = x] = -MU + (t - (1-t) S^2) / var_t * (x - (1-t) MU), linear in x."""
    t = t[..., None].double()
    var = (1 - t) ** 2 * S**2 + t**2
    return (-MU + (t - (1 - t) * S**2) / var * (x.double() - (1 - t) * MU)).to(x.dtype)


@pytest.mark.parametrize("method, extra", [
    ("sde", {}), ("sde", {"sde_diffusion_norm": 3.0}), ("sde", {"sde_last_step": 0.01}),
    ("euler", {})])
def test_samples_have_the_data_distribution(method, extra):
    """20k samples in 250 steps: the sample mean and std are the data's (their standard errors
    are about 0.004 and 0.003). A wrong diffusion (no score term, half or constant noise) or a
    missing final step fails by 0.08 to 0.4."""
    n = 20_000
    out = sample(Field(gaussian_field), prompt(b=n, n=1, c=1), steps=250, method=method,
                 generator=gen(1), **extra).double()
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.02, out.mean().item()
    assert abs(out.std().item() - S) < 0.015, out.std().item()


def test_sde_is_stochastic_where_the_ode_is_a_map():
    """The SDE's samples are not the ODE's image of the same starting noise: the noise it adds
    along the way matters (the ODE's map of noise z is MU + S z, exactly)."""
    n = 4000
    p = prompt(b=n, n=1, c=1)
    z = torch.randn(n, 1, 1, generator=gen(2))
    ode = sample(Field(gaussian_field), p, steps=250, method="euler", generator=gen(2))
    torch.testing.assert_close(ode, MU + S * z, atol=2e-2, rtol=0)
    sde = sample(Field(gaussian_field), p, steps=250, method="sde", generator=gen(2))
    corr = torch.corrcoef(torch.stack([sde.flatten(), z.flatten()]))[0, 1].item()
    assert corr < 0.5, corr


# -- (b) the grid, the steps, and norm = 0 as Euler ----------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 10, 250])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_time_grid(steps, shift):
    grid = sde_time_grid(steps, 0.04, shift)
    base = torch.linspace(1.0, 0.04, steps, dtype=torch.float64)
    assert grid.shape == (steps,) and grid.dtype == torch.float32
    torch.testing.assert_close(grid, shift_time(base, shift).float())
    assert grid[0].item() == 1.0
    if steps > 1:
        assert grid[-1].item() == pytest.approx(float(shift_time(torch.tensor(0.04), shift)))
        assert bool((grid[1:] < grid[:-1]).all())


def euler_over(model, x, grid, labels=None, cfg_scale=1.0):
    """A hand-written Euler integration over ``grid`` and then from its last time to 0, with
    guidance as in the ODE samplers."""
    b, n = x.shape[:2]
    p = prompt(labels)
    for t, t_next in [*zip(grid[:-1], grid[1:]), (grid[-1], torch.tensor(0.0))]:
        tt = t.expand(b, n)
        vel = model(x, tt, p).velocity
        if cfg_scale != 1.0:
            null = attrs.evolve(p, labels=torch.full_like(labels, CLASSES))
            uncond = model(x, tt, null).velocity
            vel = uncond + cfg_scale * (vel - uncond)
        x = x + (t_next - t) * vel
    return x


@pytest.mark.parametrize("steps, shift, last, cfg_scale", [
    (1, 1.0, 0.04, 1.0), (6, 1.0, 0.04, 1.0), (6, 3.0, 0.2, 1.0), (9, 2.0, 0.04, 2.5)])
def test_sde_without_diffusion_is_euler_on_its_grid(steps, shift, last, cfg_scale):
    labels = torch.tensor([0, 2, 1])
    model = Field(labelled_field)
    out = sample(model, prompt(labels), steps=steps, method="sde", shift=shift,
                 cfg_scale=cfg_scale, null_label=CLASSES, generator=gen(4), sde_last_step=last,
                 sde_diffusion_norm=0.0)
    assert len(model.calls) == steps  # one evaluation per time of the grid
    expected = euler_over(Field(labelled_field), torch.randn(B, N, C, generator=gen(4)),
                          sde_time_grid(steps, last, shift), labels, cfg_scale)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_one_step_is_the_mean_step_from_t_one():
    """steps = 1: no Euler–Maruyama step, only the mean step x + drift * 1 from t = 1, with
    drift = -v - norm (x + (1 - t) v) = -v - norm x there."""
    c, norm = torch.tensor([1.0, -2.0, 0.5, 3.0]), 0.7
    model = Field(lambda x, t, batch: c.expand_as(x))
    out = sample(model, prompt(), steps=1, method="sde", generator=gen(), sde_diffusion_norm=norm)
    x = torch.randn(B, N, C, generator=gen())
    torch.testing.assert_close(out, x - c - norm * x)
    assert len(model.calls) == 1 and bool((model.calls[0][1] == 1).all())


def test_one_euler_maruyama_step_then_the_mean_step_by_hand():
    """steps = 2 with a constant field: x' = x + drift(x, 1) dr + sqrt(2 norm 1 dr) z with
    dr = 1 - last and z the generator's second draw, then x' + drift(x', last) last."""
    c, norm, last = torch.tensor([1.0, -2.0, 0.5, 3.0]), 0.6, 0.3
    out = sample(Field(lambda x, t, batch: c.expand_as(x)), prompt(), steps=2, method="sde",
                 generator=gen(), sde_last_step=last, sde_diffusion_norm=norm)
    g = gen()
    x = torch.randn(B, N, C, generator=g)
    z = torch.randn(B, N, C, generator=g)

    def drift(x, t):
        return -c - norm * (x + (1 - t) * c)

    dr = 1 - last
    x = x + drift(x, 1.0) * dr + math.sqrt(2 * norm * 1.0 * dr) * z
    torch.testing.assert_close(out, x + drift(x, last) * last, atol=1e-5, rtol=1e-5)


# -- (c) the generator --------------------------------------------------------------------------

def test_sde_draws_from_the_generator_once_per_stochastic_step():
    model, steps = Field(labelled_field), 7
    labels = torch.tensor([0, 1, 2])
    runs = {s: sample(model, prompt(labels), steps=steps, method="sde", generator=gen(s))
            for s in (11, 12)}
    again = sample(model, prompt(labels), steps=steps, method="sde", generator=gen(11))
    assert torch.equal(runs[11], again)
    assert not torch.allclose(runs[11], runs[12], atol=1e-3)
    # the starting noise and one draw per Euler–Maruyama step: steps draws in all
    g = gen(5)
    sample(model, prompt(labels), steps=steps, method="sde", generator=g)
    ref = gen(5)
    for _ in range(steps):
        torch.randn(B, N, C, generator=ref)
    assert torch.equal(torch.randn(8, generator=g), torch.randn(8, generator=ref))
    # and those draws matter: the same starting noise, without the diffusion, differs
    ode = sample(model, prompt(labels), steps=steps, method="sde", generator=gen(11),
                 sde_diffusion_norm=0.0)
    assert not torch.allclose(runs[11], ode, atol=1e-3)


def test_sde_with_a_real_network_and_guidance_is_finite_and_seeded():
    with torch_threads(1):
        dit = randomize_parameters(DiT.Config(depth=2, width=32, heads=4).build(
            token_dims=(C,), num_classes=CLASSES), seed=0, std=0.2).eval()
    labels = torch.tensor([0, 1, 2])
    kw = dict(steps=5, method="sde", cfg_scale=2.0, null_label=CLASSES)
    a = sample(dit, prompt(labels), generator=gen(1), **kw)
    assert torch.isfinite(a).all() and torch.equal(a, sample(dit, prompt(labels),
                                                             generator=gen(1), **kw))


# -- (d) held tokens ----------------------------------------------------------------------------

def held_prompt(labels=None):
    condition = torch.zeros(B, N, dtype=torch.bool)
    condition[:, :2] = True
    condition[1, 4] = True
    tokens = torch.randn(B, N, C, generator=gen(5))
    return prompt(labels, condition=condition, tokens=tokens), condition, tokens


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("condition_t", [0.0, 0.15])
def test_held_tokens_are_returned_as_given_and_seen_at_condition_t(method, cfg_scale,
                                                                   condition_t):
    p, condition, x0 = held_prompt(torch.tensor([0, 1, 2]))
    model = Field(labelled_field)
    out = sample(model, p, steps=5, method=method, cfg_scale=cfg_scale, null_label=CLASSES,
                 generator=gen(), condition_t=condition_t)
    assert torch.equal(out[condition], x0[condition])  # returned clean
    assert not torch.allclose(out[~condition], x0[~condition])
    start = torch.randn(B, N, C, generator=gen())  # the starting noise
    c = condition_t
    fed = x0 if c == 0 else (1 - c) * x0 + c * start  # one noise draw: the starting noise
    for x, t, _ in model.calls:
        reps = x.shape[0] // B
        cond = condition.repeat(reps, 1)
        assert torch.equal(x[cond], fed.repeat(reps, 1, 1)[cond])  # the same in every call
        assert bool((t[cond] == c).all())  # at time c
        assert bool((t[~cond] > 0).all()) and bool((t[~cond] == t[~cond][0]).all())
    if c > 0:
        assert not torch.allclose(fed[condition], x0[condition], atol=1e-2)  # noised


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_the_generated_tokens_see_the_noised_conditioning(method):
    p, condition, _ = held_prompt()
    out = {c: sample(Field(coupled_field), p, steps=4, method=method, generator=gen(),
                     condition_t=c) for c in (0.0, 0.2)}
    assert torch.equal(out[0.0][condition], out[0.2][condition])
    assert not torch.allclose(out[0.0][~condition], out[0.2][~condition], atol=1e-4)


def reference_ode_sample(model, prompt, *, steps, method, shift=1.0, cfg_scale=1.0,
                         null_label=None, generator=None):
    """The ODE sampler as it was before ``condition_t`` (held tokens clean at t = 0)."""
    def velocity(x, t):
        tt = torch.where(prompt.condition, torch.zeros_like(t), t)
        if cfg_scale == 1.0 or prompt.labels is None or null_label is None:
            return model(x, tt, prompt).velocity
        unconditional = attrs.evolve(prompt, labels=torch.full_like(prompt.labels, null_label))
        both = TokenBatch.cat([prompt, unconditional])
        cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), both).velocity.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    held = prompt.condition[..., None]
    noise = torch.randn(prompt.tokens.shape, generator=generator)
    x = torch.where(held, prompt.tokens, noise)
    grid = time_grid(steps, shift)
    b, n = prompt.valid.shape
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        vel = velocity(x, t.expand(b, n))
        x_next = torch.where(held, prompt.tokens, x + (t_next - t) * vel)
        if method == "heun" and float(t_next) > 0:
            x_next = x + (t_next - t) * 0.5 * (vel + velocity(x_next, t_next.expand(b, n)))
        x = torch.where(held, prompt.tokens, x_next)
    return x


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_condition_t_zero_is_the_sampler_as_before_bit_for_bit(method, cfg_scale):
    with torch_threads(1):
        dit = randomize_parameters(DiT.Config(depth=2, width=32, heads=4).build(
            token_dims=(C,), num_classes=CLASSES), seed=0, std=0.2).eval()
        p, _, _ = held_prompt(torch.tensor([0, 1, 2]))
        kw = dict(steps=4, method=method, shift=2.0, cfg_scale=cfg_scale, null_label=CLASSES)
        expected = reference_ode_sample(dit, p, generator=gen(9), **kw)
        assert torch.equal(sample(dit, p, generator=gen(9), **kw), expected)
        assert torch.equal(sample(dit, p, generator=gen(9), condition_t=0.0, **kw), expected)


# -- (e) validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("sde_last_step", 0.0), ("sde_last_step", 1.0), ("sde_last_step", -0.1),
    ("sde_last_step", 1.5), ("sde_last_step", math.nan),
    ("condition_t", 1.0), ("condition_t", -0.1), ("condition_t", math.nan),
    ("sde_diffusion_norm", -1.0), ("sde_diffusion_norm", math.inf),
    ("sde_diffusion_norm", math.nan)])
def test_config_refuses_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"\$\.{field}"):
        structure(make_converter(), {field: value}, SamplingConfig, source="test")


def test_config_defaults_and_edges():
    cfg = SamplingConfig()
    assert (cfg.condition_t, cfg.sde_last_step, cfg.sde_diffusion_norm) == (0.0, 0.04, 1.0)
    SamplingConfig(method="sde", condition_t=0.0, sde_last_step=0.999, sde_diffusion_norm=0.0)
    assert structure(make_converter(), {"method": "sde"}, SamplingConfig).method == "sde"
    with pytest.raises(ConfigError, match="'sde'"):
        structure(make_converter(), {"method": "sdee"}, SamplingConfig, source="test")


@pytest.mark.parametrize("kw, message", [
    ({"method": "ddim"}, "method must be one of"), ({"condition_t": 1.0}, "condition_t"),
    ({"condition_t": -0.5}, "condition_t"), ({"method": "sde", "sde_last_step": 0.0},
                                              "sde_last_step"),
    ({"method": "sde", "sde_diffusion_norm": -1.0}, "sde_diffusion_norm"),
    ({"steps": 0}, "steps")])
def test_sample_refuses_bad_arguments(kw, message):
    model = Field(labelled_field)
    with pytest.raises(ValueError, match=message):
        sample(model, prompt(), generator=gen(), **{"steps": 2, **kw})
    assert model.calls == []


def test_sample_checkpoint_refuses_bad_settings_before_loading(tmp_path):
    for options, path in [({"condition_t": 1.0}, "$.condition_t"),
                          ({"sde_last_step": 0.0}, "$.sde_last_step"),
                          ({"sde_diffusion_norm": -1.0}, "$.sde_diffusion_norm")]:
        with pytest.raises(ConfigError, match="sampling options") as e:
            sample_checkpoint(tmp_path / "missing.pt", Components(), **options)
        assert path in str(e.value)


@pytest.mark.parametrize("option, value, message", [
    ("--condition-t", "1", "argument --condition-t: must be in [0, 1), got 1"),
    ("--sde-last-step", "0", "argument --sde-last-step: must be in (0, 1), got 0"),
    ("--sde-diffusion-norm", "-1", "argument --sde-diffusion-norm: must be >= 0.0, got -1"),
    ("--method", "ddim", "argument --method: invalid choice: 'ddim' (choose from "),
])
def test_cli_sample_options_out_of_range_are_one_error_line(capsys, tmp_path, option, value,
                                                            message):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(tmp_path / "run"), option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and message in err


# -- plumbing: generate, sample_info.json, shrink -----------------------------------------------

def test_generate_passes_every_setting_to_the_sampler():
    p, condition, x0 = held_prompt()
    m = SimpleNamespace(adapter=SimpleNamespace(prompt=lambda n: p.rows(slice(0, n)),
                                                num_classes=0), id_offset=0)
    cfg = SamplingConfig(method="sde", steps=6, shift=2.0, count=B, seed=3, condition_t=0.1,
                         sde_last_step=0.2, sde_diffusion_norm=0.5)
    model = Field(coupled_field)
    tokens, labels = generate(model, m, cfg, null_label=CLASSES, device=torch.device("cpu"))
    assert labels is None and len(model.calls) == 6
    assert all(bool((t[condition] == 0.1).all()) for _, t, _ in model.calls)
    expected = sample(Field(coupled_field), p, steps=6, method="sde", shift=2.0,
                      generator=gen(3), condition_t=0.1, sde_last_step=0.2,
                      sde_diffusion_norm=0.5)
    assert torch.equal(tokens, expected)


def test_sample_info_records_the_sampler_settings(tmp_path):
    config = toy()
    sampling = SamplingConfig(method="sde", steps=250, shift=1.5, cfg_scale=2.0,
                              condition_t=0.1, sde_last_step=0.05, sde_diffusion_norm=0.5)
    info = sample_info(config, config.teacher.build(), "student", step=7, updates=None,
                       sampling=sampling)
    recorded = json.loads(write_info(tmp_path, info).read_text())["sampling"]
    assert {k: recorded[k] for k in ("method", "steps", "shift", "cfg_scale", "condition_t",
                                     "sde_last_step", "sde_diffusion_norm")} == {
        "method": "sde", "steps": 250, "shift": 1.5, "cfg_scale": 2.0, "condition_t": 0.1,
        "sde_last_step": 0.05, "sde_diffusion_norm": 0.5}
    assert structure(make_converter(), recorded, SamplingConfig) == sampling
    assert recorded == to_data(make_converter(), sampling)


def test_shrink_keeps_condition_t():
    base = attrs.evolve(toy(), sampling=SamplingConfig(condition_t=0.1, shift=2.0))
    tiny = shrink(base, run_dir="r", stores={})
    assert (tiny.sampling.condition_t, tiny.sampling.shift) == (0.1, 2.0)
