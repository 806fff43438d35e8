"""Tests of the selfflow-robotics plugin: the core's contract kit plus robotics-specific checks
(normalisation, conditioning, channel padding, the expert's data, training and evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from selfflow_robotics import (
    Normalization,
    ReacherTask,
    RoboticsModality,
    collect,
    episode_seed,
    expert_policy,
    random_policy,
    rollout,
)
from selfflow_robotics.evaluate import evaluate
from selfflow_robotics.evaluate import main as eval_main
from selfflow_robotics.presets import MASK_RATIO, debug_tiny, default
from selfflow_robotics.sim import run_expert_episode

from selfflow_core import Components, ModalitySpec
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.data.writer import encode_store
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.teachers import EMATeacher
from selfflow_core.testing import ModalityContract, ModalityPluginContract, randomize_parameters
from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.timesteps import DualTimestep, Uniform

SMALL = RoboticsModality.Config(episodes=2, horizon=4)
CHUNKED = RoboticsModality.Config(episodes=2, horizon=3, state_chunk=4)


class TestRoboticsContract(ModalityContract):
    config = SMALL


class TestRoboticsContractChunkedState(ModalityContract):
    config = CHUNKED


@pytest.fixture(scope="module")
def chunked():
    adapter = CHUNKED.build()
    src = adapter.open_source("expert")
    enc = adapter.encode(src.read(0, 6))
    fields = {k: torch.from_numpy(v) for k, v in enc.items()}
    return adapter, src, fields, adapter.tokenize(fields)


# ---- registration and config ------------------------------------------------------------------

def test_preset_schedules():
    ours = DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25)  # paper: none
    assert RoboticsModality.Config().default_scheduler() == ours
    assert ModalitySpec(modality=SMALL, store="x.zarr").scheduler == ours
    for preset in (default(), debug_tiny()):
        spec = preset.modalities["robotics"]
        assert spec.scheduler == spec.modality.default_scheduler() == ours
    assert MASK_RATIO == 0.25


def test_config_through_the_converter():
    conv = make_converter(Components())
    cfg = structure(conv, {"kind": "robotics", "horizon": 6, "state_chunk": 3}, ModalityConfig)
    assert cfg == RoboticsModality.Config(horizon=6, state_chunk=3)
    assert structure(conv, to_data(conv, cfg), ModalityConfig) == cfg
    with pytest.raises(ConfigError):
        structure(conv, {"kind": "robotics", "task": "nope"}, ModalityConfig)


# ---- layout: tokens, conditioning, padding -----------------------------------------------------

def test_layout():
    a = SMALL.build()
    assert (a.state_tokens, a.state_width, a.token_dim, a.token_dims) == (1, 10, 10, (10, 2))
    b = CHUNKED.build()
    assert (b.state_tokens, b.state_width, b.token_dim, b.token_dims) == (3, 4, 4, (4, 2))


def test_tokens_positions_and_ids(chunked):
    adapter, _, fields, batch = chunked
    b = fields["state"].shape[0]
    assert batch.tokens.shape == (b, 3 + 3, 4)
    assert batch.positions[0, :, 0].tolist() == [-2, -1, 0, 1, 2, 3]
    assert batch.modality_ids[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.condition[0].tolist() == [True] * 3 + [False] * 3
    # the state, chunked 4 + 4 + 2, and the actions, 2 of 4 channels
    state = batch.tokens[:, :3].reshape(b, 12)[:, :10]
    torch.testing.assert_close(state, fields["state"])
    torch.testing.assert_close(batch.tokens[:, 3:, :2], fields["actions"])


def test_padded_channels_are_masked_and_zero(chunked):
    _, _, _, batch = chunked
    cv = batch.channel_valid
    assert cv[0].int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0],
                                     [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert bool((batch.tokens[~cv] == 0).all())


def _loss_parts(adapter):
    g = torch.Generator().manual_seed(0)
    model = randomize_parameters(DiT_tiny().build(token_dims=list(adapter.token_dims)), 1)
    teacher = EMATeacher(EMATeacher.Config())
    teacher.attach(model)
    randomize_parameters(teacher.model, 2)
    objective = randomize_parameters(SelfFlowObjective(
        ObjectiveConfig(student_layer=1, teacher_layer=2), depth=model.depth, width=model.width), 3)

    def loss(batch, plan, noise):
        with torch.no_grad():
            t = objective(model, teacher, batch, plan, noise)
        return t.flow.item(), t.rep.item()
    return g, loss


def DiT_tiny():
    from selfflow_core.builtin.dit import DiT
    return DiT.Config(depth=2, width=24, heads=2)


def test_padded_channels_do_not_change_the_loss(chunked):
    adapter, _, _, batch = chunked
    g, loss = _loss_parts(adapter)
    plan = DualTimestep(Uniform(), 0.5).plan(batch, generator=g)
    noise = torch.randn(batch.tokens.shape, generator=g)
    ref = loss(batch, plan, noise)
    # the padding of generated (action) tokens: neither the network nor the loss sees it.
    # (The zero padding of the last state chunk is held clean as part of the conditioning.)
    pad = ~batch.channel_valid & batch.target_mask[..., None]
    assert bool(pad.any())
    junk = torch.randn(batch.tokens.shape, generator=g) * 100
    changed = attrs.evolve(batch, tokens=torch.where(pad, junk, batch.tokens))
    assert loss(changed, plan, torch.where(pad, -junk, noise)) == pytest.approx(ref, rel=1e-5)


def test_state_tokens_are_held_clean(chunked):
    adapter, _, _, batch = chunked
    g = torch.Generator().manual_seed(1)
    plan = DualTimestep(Uniform(), 0.5).plan(batch, generator=g)
    cond = batch.condition
    assert bool((plan.student_t[cond] == 0).all()) and bool((plan.teacher_t[cond] == 0).all())
    assert not bool(plan.masked[cond].any())
    assert bool((plan.student_t[~cond] > 0).all())
    assert not bool(batch.target_mask[cond].any())
    # noise on the state tokens never reaches the loss (held at t = 0, excluded from it)
    _, loss = _loss_parts(adapter)
    noise = torch.randn(batch.tokens.shape, generator=g)
    other = torch.where(cond[..., None], torch.randn(noise.shape, generator=g) * 50, noise)
    assert loss(batch, plan, other) == pytest.approx(loss(batch, plan, noise), rel=1e-5)
    # ... while the state's values do condition the prediction of the actions
    moved = attrs.evolve(batch, tokens=torch.where(cond[..., None] & batch.channel_valid,
                                                   batch.tokens + 1.0, batch.tokens))
    assert loss(moved, plan, noise) != pytest.approx(loss(batch, plan, noise), rel=1e-5)


def test_prompt_without_fields_uses_heldout_states(chunked):
    adapter, _, _, batch = chunked
    p = adapter.prompt(3)
    raw = adapter.heldout_initial_states(3)
    state = p.tokens[:, :3].reshape(3, 12)[:, :10].double()
    torch.testing.assert_close(state, torch.from_numpy(adapter.stats.normalize_states(raw)),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.positions, batch.positions[:3])
    assert bool((p.tokens[:, 3:] == 0).all())
    torch.testing.assert_close(adapter.prompt_from_states(raw).tokens, p.tokens)


# ---- normalisation -----------------------------------------------------------------------------

def test_quantile_normalisation_round_trip():
    rng = np.random.default_rng(0)
    actions = rng.standard_t(3, size=(500, 4, 3)) * [0.1, 1.0, 5.0] + [0.0, 2.0, -1.0]
    states = rng.normal(3.0, 2.0, size=(500, 5))
    states[:, 4] = 7.0  # a constant dim must not divide by zero
    n = Normalization.from_data(states, actions, low_quantile=0.01, high_quantile=0.99)
    flat = actions.reshape(-1, 3)
    lo, hi = np.quantile(flat, [0.01, 0.99], axis=0)
    np.testing.assert_allclose(n.action_low, lo)
    np.testing.assert_allclose(n.action_high, hi)
    np.testing.assert_allclose(n.normalize_actions(np.stack([lo, hi])), [[-1] * 3, [1] * 3])
    z = n.normalize_actions(flat)
    inside = ((flat >= lo) & (flat <= hi)).mean(axis=0)
    assert np.all(inside > 0.97) and np.all(np.abs(z[(flat >= lo) & (flat <= hi)]) <= 1 + 1e-9)
    np.testing.assert_allclose(n.denormalize_actions(n.normalize_actions(actions)), actions,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(n.denormalize_states(n.normalize_states(states)), states,
                               atol=1e-12)
    assert np.all(np.isfinite(n.normalize_states(states)))
    t = torch.from_numpy(actions).float()
    torch.testing.assert_close(n.denormalize_actions(n.normalize_actions(t)), t)
    again = Normalization.from_dict(json.loads(json.dumps(n.to_dict())))
    assert again == n


def test_normalisation_is_computed_from_the_training_data():
    adapter = SMALL.build()
    demos = adapter.training_demonstrations()
    rec = adapter.normalization()
    labels = demos.labels.reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(rec["actions"]["low"], np.quantile(labels, 0.01, axis=0))
    np.testing.assert_allclose(rec["actions"]["high"], np.quantile(labels, 0.99, axis=0))
    assert rec["actions"]["quantiles"] == [0.01, 0.99]
    np.testing.assert_allclose(rec["state"]["mean"], demos.states.reshape(-1, 10).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_store_records_normalisation_and_un_normalises(tmp_path: Path):
    adapter = SMALL.build()
    conv = make_converter(Components())
    store = encode_store(adapter, "expert", tmp_path / "s.zarr", progress=False, batch_size=32,
                         adapter_config=to_data(conv, SMALL))
    assert len(store) == 2 * 50
    rec = store.schema["normalization"]
    assert rec == adapter.normalization()
    data = store.read(np.arange(len(store)))
    raw = adapter.open_source("expert").read(0, len(store))
    norm = Normalization.from_dict(rec)
    np.testing.assert_allclose(norm.denormalize_actions(data["actions"].astype(np.float64)),
                               raw["actions"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.denormalize_states(data["state"].astype(np.float64)),
                               raw["state"], rtol=1e-5, atol=1e-5)
    # episode boundaries: ids and timesteps; each chunk starts at its own step's label
    assert data["episode"].tolist() == [0] * 50 + [1] * 50
    assert data["timestep"].tolist() == list(range(50)) * 2
    np.testing.assert_array_equal(raw["actions"][1:50, 0], raw["actions"][:49, 1])
    # a fresh adapter of the same config computes the same statistics: same schema hash, the
    # complete store is accepted as is (and an interrupted encode would resume)
    again = encode_store(SMALL.build(), "expert", tmp_path / "s.zarr", progress=False,
                         adapter_config=to_data(conv, SMALL))
    assert again.schema["config_hash"] == store.schema["config_hash"]
    fresh = SMALL.build()
    fresh.set_normalization(rec)
    assert fresh.stats == adapter.stats


def test_save_samples_in_simulator_units(tmp_path: Path):
    adapter = SMALL.build()
    latents = torch.tensor([[[-1.0, 1.0]] * 4, [[0.0, 0.5]] * 4])
    paths = adapter.save_samples(latents, None, tmp_path)
    saved = np.load(paths[0])
    stats = adapter.stats
    np.testing.assert_allclose(saved[0, 0], [stats.action_low[0], stats.action_high[1]],
                               rtol=1e-6)
    assert paths[1].read_text().splitlines()[0] == "sample,step,a0,a1"
    assert len(paths[1].read_text().splitlines()) == 1 + 2 * 4


# ---- the simulator and its expert --------------------------------------------------------------

def test_episodes_are_seeded_by_index():
    demos = collect("reacher", 3, seed=0, horizon=4, action_noise=0.05)
    task = ReacherTask()
    env = task.make_env()
    one = run_expert_episode(task, env, episode_seed(0, "train", 2), steps=50, horizon=4,
                             action_noise=0.05)
    env.close()
    np.testing.assert_array_equal(one["states"].astype(np.float32), demos.states[2])
    np.testing.assert_array_equal(one["labels"].astype(np.float32), demos.labels[2])
    seeds = {episode_seed(0, s, i) for s in ("train", "heldout", "rollout") for i in range(50)}
    assert len(seeds) == 150  # the splits share no episode


def test_expert_succeeds_in_most_episodes():
    demos = collect("reacher", 12, seed=0, horizon=8, action_noise=0.05)
    assert demos.success.mean() >= 0.9, demos.final_distance
    task = ReacherTask()
    seeds = [episode_seed(0, "rollout", i) for i in range(12)]
    expert = rollout(task, expert_policy(task), seeds)
    rand = rollout(task, random_policy(task), seeds)
    assert expert.success.mean() >= 0.9 > rand.success.mean()
    assert expert.returns.mean() > rand.returns.mean() + 20


# ---- training and evaluation -------------------------------------------------------------------

class TestRoboticsPlugin(ModalityPluginContract):
    """The kit's plugin checks (entry point, round trips, valid presets, debug_tiny lowers the
    loss), and the evaluation of that run: training and sampling on one torch thread (on a
    shared 2-core machine one intra-op thread is faster and steadier than two competing ones)."""

    modality, distribution = "robotics", "selfflow-robotics"
    config_class = RoboticsModality.Config
    presets = ("robotics",)
    loss_window, loss_ratio = 8, 0.6

    def test_debug_tiny_writes_actions(self, debug_tiny_run):
        cfg = debug_tiny_run.config
        samples = debug_tiny_run.run_dir / "samples" / f"step-{cfg.steps:08d}" / "robotics"
        assert np.load(samples / "actions.npy").shape == (cfg.sampling.count, 4, 2)

    def test_evaluation_end_to_end(self, debug_tiny_run, one_thread, capsys):
        root = debug_tiny_run.root
        out = root / "eval.json"
        assert eval_main([str(root / "run"), "--episodes", "4", "--mse-episodes", "1",
                          "--steps", "3", "--json", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "policy (Self-Flow)" in printed and "expert" in printed and "random" in printed
        res = json.loads(out.read_text())
        for who in ("policy", "expert", "random"):
            for key in ("action_mse", "first_action_mse", "success_rate", "mean_return",
                        "mean_final_distance"):
                assert math.isfinite(res[who][key]), (who, key)
        assert res["expert"]["success_rate"] > res["random"]["success_rate"]
        assert res["expert"]["mean_return"] > res["random"]["mean_return"]
        assert res["policy"]["action_mse"] < res["random"]["action_mse"]
        assert res["settings"]["normalization"].startswith("store")
        assert res["settings"]["execute"] == 2 and res["settings"]["heldout_states"] == 50

    def test_evaluation_recomputes_normalisation_without_the_store(self, debug_tiny_run,
                                                                   one_thread):
        root = debug_tiny_run.root
        res = evaluate(root / "run", episodes=2, mse_episodes=1, steps=2,
                       store=str(root / "missing.zarr"), verbose=False)
        assert res["settings"]["normalization"].startswith("recomputed")
        assert all(math.isfinite(v) for v in res["policy"].values())


def test_eval_cli_reports_a_missing_checkpoint(tmp_path: Path, capsys):
    assert eval_main([str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
