"""Tests of the robotics world model (``robotics_world``, paper App. E): the frames drawn from the
simulator state, the joint frame + action token sequence, its conditioning and positions, the
presets, a tiny training run, and the evaluation (frame errors and the closed loop)."""

from __future__ import annotations

import json
import math

import attrs
import numpy as np
import pytest
import torch
from selfflow_robotics import ReacherTask, collect
from selfflow_robotics.evaluate import (
    evaluate,
    perfect_predictor,
    psnr,
    still_predictor,
    world_model_errors,
)
from selfflow_robotics.evaluate import main as eval_main
from selfflow_robotics.presets import world, world_debug_tiny
from selfflow_robotics.render import EXTENT, arm_points, pixel_of, render_reacher
from selfflow_robotics.sim import execute_chunks
from selfflow_robotics.world import RoboticsWorldModality

from selfflow_core import Components, LogitNormal, ModalitySpec
from selfflow_core.config.converter import ConfigError, make_converter, structure
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.testing import ModalityContract, ModalityPluginContract
from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.timesteps import DualTimestep
from selfflow_core.tokens import patchify

SMALL = RoboticsWorldModality.Config(episodes=2, horizon=4, future_frames=2)
ODD = RoboticsWorldModality.Config(episodes=2, horizon=3, future_frames=1, frame_size=12,
                                   patch=3)


def _state(q1: float, q2: float, target=(0.1, -0.1), dq=(0.0, 0.0)) -> np.ndarray:
    """A Reacher observation of joint angles ``q1, q2`` (the tip - target dims are not drawn)."""
    return np.array([np.cos(q1), np.cos(q2), np.sin(q1), np.sin(q2), *target, *dq, 0.0, 0.0])


# ---- frames -----------------------------------------------------------------------------------

def test_render_is_deterministic_smooth_and_in_range():
    demos = collect("reacher", 2, seed=0, horizon=4)
    states = demos.trajectory.reshape(-1, 10)
    a, b = render_reacher(states, 16), render_reacher(states.copy(), 16)
    assert a.shape == (len(states), 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b)                                   # deterministic
    assert a.min() == -1.0 and a.max() <= 1.0 and a.max() > 0.9
    # antialiased: intermediate grey levels, not a binary mask
    grey = ((a > -0.9) & (a < 0.9)).sum() / (a > -0.9).sum()
    assert grey > 0.3
    # the batch shape is kept, and a batch is the frames of its states one by one
    assert np.array_equal(render_reacher(states.reshape(2, -1, 10), 16).reshape(a.shape), a)
    assert np.array_equal(render_reacher(states[5], 16), a[5])


def test_moving_the_arm_changes_pixels_where_expected():
    size = 24
    before, after = _state(0.0, 0.0), _state(np.pi / 2, 0.0)    # arm along +x, then along +y
    f0, f1 = render_reacher(before, size), render_reacher(after, size)
    (_, tip0, target), (_, tip1, _) = arm_points(before), arm_points(after)
    (r0, c0), (r1, c1), (rt, ct) = pixel_of(np.concatenate([tip0, tip1, target]), size)
    assert f0[r0, c0] > 0.0 and f1[r0, c0] == -1.0                # the tip left its old pixel
    assert f1[r1, c1] > 0.0 and f0[r1, c1] == -1.0                # ... and lit the new one
    assert f0[rt, ct] == f1[rt, ct] > -0.5                        # the target did not move
    changed = np.argwhere(f0 != f1)
    assert len(changed) > 0
    # only pixels near the old or the new arm changed: within 2 px of either line
    px = 2 * EXTENT / size
    centre = np.stack([-EXTENT + (changed[:, 1] + 0.5) * px,
                       EXTENT - (changed[:, 0] + 0.5) * px], -1)
    near_old = (np.abs(centre[:, 1]) < 2 * px) & (centre[:, 0] > -2 * px)
    near_new = (np.abs(centre[:, 0]) < 2 * px) & (centre[:, 1] > -2 * px)
    assert np.all(near_old | near_new)
    # the image is upright: the arm along +y lights the upper half, row 0 being the top
    column = f1[:, c1]
    assert (column[: size // 2] > 0).sum() >= 8 and (column[size // 2 + 1:] == -1).all()


def test_moving_the_target_moves_its_blob_only():
    size = 16
    f0 = render_reacher(_state(np.pi, 0.5, target=(0.1, -0.1)), size)
    f1 = render_reacher(_state(np.pi, 0.5, target=(0.1, 0.1)), size)
    (r0, c0), (r1, c1) = pixel_of(np.array([[0.1, -0.1], [0.1, 0.1]]), size)
    assert f0[r0, c0] > f1[r0, c0] and f1[r1, c1] > f0[r1, c1]
    assert np.allclose(f0[r0, c0], f1[r1, c1], atol=0.05)         # the same blob, moved
    assert f0.max() > f0[r0, c0]                                  # dimmer than the arm


def test_restored_states_replay_the_recorded_trajectory():
    demos = collect("reacher", 2, seed=0, horizon=4, action_noise=0.05)
    t = np.array([0, 17, 49])
    for e in range(2):
        chunks = np.stack([demos.executed[e, s:s + 4] for s in t])
        reached = execute_chunks(ReacherTask(), demos.trajectory[e, t], chunks)
        want = np.stack([demos.trajectory[e, s:s + 5] for s in t])
        np.testing.assert_allclose(reached, want, atol=1e-9)


def test_episodes_store_frames_of_their_states():
    demos = collect("reacher", 2, seed=0, horizon=4, action_noise=0.05, frame_size=16)
    assert demos.frames.shape == (2, 54, 16, 16) and demos.trajectory.shape == (2, 54, 10)
    assert np.array_equal(demos.frames, render_reacher(demos.trajectory, 16))
    np.testing.assert_array_equal(demos.trajectory[:, :50].astype(np.float32), demos.states)
    plain = collect("reacher", 2, seed=0, horizon=4, action_noise=0.05)
    assert plain.frames is None and np.array_equal(plain.states, demos.states)
    # labels are the clean expert's; the executed actions add the recording noise
    assert 0 < np.abs(demos.executed - demos.labels).mean() < 0.1


# ---- the adapter ------------------------------------------------------------------------------

class _WorldContract(ModalityContract):
    def test_detokenize_inverts_tokenize(self, adapter, fields, batch):
        """Both generated fields come back exactly: ``split(detokenize(tokens))``."""
        packed = adapter.detokenize(batch.tokens)
        assert isinstance(packed, torch.Tensor)
        frames, actions = adapter.split(packed)
        assert torch.equal(frames, fields["frames"]) and torch.equal(actions, fields["actions"])


class TestWorldContract(_WorldContract):
    config = SMALL


class TestWorldContractOddSizes(_WorldContract):
    config = ODD


@pytest.fixture(scope="module")
def small():
    adapter = SMALL.build()
    src = adapter.open_source("expert")
    raw = src.read(0, 60)
    fields = {k: torch.from_numpy(v) for k, v in adapter.encode(raw).items()}
    return adapter, src, raw, fields, adapter.tokenize(fields)


def test_layout(small):
    adapter, _, _, fields, batch = small
    assert (adapter.patch_tokens, adapter.frame_tokens, adapter.num_tokens) == (16, 48, 52)
    assert adapter.token_dims == (16, 2) and adapter.token_dim == 16
    assert batch.tokens.shape == (60, 52, 16)
    assert batch.modality_ids[0].tolist() == [0] * 48 + [1] * 4
    cv = batch.channel_valid[0]
    assert cv[:48].all() and cv[48:, :2].all() and not cv[48:, 2:].any()
    assert bool((batch.tokens[~batch.channel_valid] == 0).all())
    # the frames' patches, in order: the current frame's first
    torch.testing.assert_close(batch.tokens[:, :16], patchify(fields["frames"][:, :1], (1, 4, 4)))
    torch.testing.assert_close(batch.tokens[:, 48:, :2], fields["actions"])


def test_condition_mask_covers_exactly_the_current_frame(small):
    adapter, _, _, fields, batch = small
    cond = batch.condition
    assert cond[:, :16].all() and not cond[:, 16:].any()
    assert torch.equal(cond, adapter.condition_mask(60))
    assert not batch.target_mask[:, :16].any() and batch.target_mask[:, 16:].all()
    # the default plan: the current frame at one t ~ U[0, 0.2] per sample (student = teacher),
    # never masked; every generated token at the sample's t or s, frames and actions alike
    scheduler = SMALL.default_scheduler().build()
    plan = scheduler.plan(batch, generator=torch.Generator().manual_seed(0))
    held = plan.student_t[:, :16]
    assert torch.equal(held, plan.teacher_t[:, :16])
    assert bool((held == held[:, :1]).all()) and 0 < float(held.max()) <= 0.2
    assert float(held.std()) > 0.02 and not plan.masked[:, :16].any()
    for i in range(60):
        gen = plan.student_t[i, 16:].unique()
        teacher = plan.teacher_t[i, 16:]
        assert len(gen) <= 2 and bool((teacher == teacher[0]).all()) and teacher[0] <= gen.min()
        if len(gen) == 2:
            assert teacher[0] == gen.min()


def test_positions_share_the_time_axis(small):
    adapter, _, _, _, batch = small
    pos = batch.positions[0]
    assert pos.shape == (52, 3) and adapter.frame_steps == [0, 2, 4]
    for k, step in enumerate(adapter.frame_steps):               # frames at their step index
        frame = pos[16 * k:16 * (k + 1)]
        assert bool((frame[:, 0] == step).all())
        assert frame[:, 1:].tolist() == [[r, c] for r in range(4) for c in range(4)]
    assert pos[48:].tolist() == [[j, -1, -1] for j in range(4)]    # action j executed at step j
    assert len({tuple(p) for p in pos.tolist()}) == 52           # no two tokens share a place
    assert torch.equal(adapter.prompt(3).positions, batch.positions[:3])


def test_actions_are_the_executed_ones_quantile_normalised(small):
    adapter, src, raw, fields, _ = small
    demos = adapter.training_demonstrations()
    rec = adapter.normalization()
    executed = demos.executed.reshape(-1, 2)
    np.testing.assert_allclose(rec["actions"]["low"], np.quantile(executed, 0.01, axis=0))
    np.testing.assert_allclose(rec["actions"]["high"], np.quantile(executed, 0.99, axis=0))
    assert rec["frames"] == {"method": "identity", "range": [-1.0, 1.0]}
    back = adapter.actions_to_env(fields["actions"])
    np.testing.assert_allclose(back, raw["actions"], rtol=1e-5, atol=1e-6)
    # each future frame is what the simulator draws after the sample's own actions
    reached = execute_chunks(adapter.task, raw["state"], raw["actions"])
    np.testing.assert_allclose(adapter.task.render(reached[:, [2, 4]], 16),
                               fields["frames"][:, 1:].numpy(), atol=1e-5)
    np.testing.assert_array_equal(adapter.task.render(raw["state"], 16), fields["frames"][:, 0])


def test_prompt_conditions_on_the_given_or_heldout_frame(small):
    adapter, _, raw, fields, batch = small
    p = adapter.prompt(4, fields)
    assert torch.equal(p.tokens[:, :16], batch.tokens[:4, :16])
    assert not p.tokens[:, 16:].any()
    assert torch.equal(adapter.prompt_from_states(raw["state"][:4]).tokens, p.tokens)
    default = adapter.prompt(2)
    first = torch.from_numpy(adapter.heldout_initial_frames(2))
    torch.testing.assert_close(default.tokens[:, :16], patchify(first[:, None], (1, 4, 4)))
    with pytest.raises(ValueError, match="conditioning frames"):
        adapter.prompt(2, {"frame": torch.zeros(2, 8, 8)})


def test_config_checks_and_converter():
    with pytest.raises(ValueError, match="must divide 'horizon'"):
        RoboticsWorldModality.Config(horizon=8, future_frames=3)
    with pytest.raises(ValueError, match="must divide 'frame_size'"):
        RoboticsWorldModality.Config(frame_size=16, patch=5)
    conv = make_converter(Components())
    cfg = structure(conv, {"kind": "robotics_world", "horizon": 6, "future_frames": 3},
                    ModalityConfig)
    assert cfg == RoboticsWorldModality.Config(horizon=6, future_frames=3)
    with pytest.raises(ConfigError):
        structure(conv, {"kind": "robotics_world", "future_frames": 5}, ModalityConfig)


# ---- presets ----------------------------------------------------------------------------------

def test_world_presets_schedule_like_video_with_noise_augmentation():
    want = DualTimestep.Config(distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                               mask_ratio=0.1, condition_noise=0.2)
    assert RoboticsWorldModality.Config().default_scheduler() == want
    assert ModalitySpec(modality=SMALL, store="x.zarr").scheduler == want
    full, tiny = world(), world_debug_tiny()
    for preset in (full, tiny):
        spec = preset.modalities["robotics_world"]
        assert spec.scheduler == spec.modality.default_scheduler() == want
        assert preset.sampling.condition_t == full.sampling.condition_t
        assert preset.sampling.shift == full.sampling.shift
    assert full.modalities["robotics_world"].store != tiny.modalities["robotics_world"].store
    m = tiny.modalities["robotics_world"].modality
    assert (m.episodes, m.horizon, m.future_frames) == (6, 4, 1)
    # both token widths fit the backbone
    assert full.backbone.width > max(full.modalities["robotics_world"].modality.build().token_dims)


# ---- evaluation on hand-made predictors -------------------------------------------------------

@pytest.fixture(scope="module")
def heldout():
    adapter = SMALL.build()
    return adapter, adapter.heldout_demonstrations(2)


def test_a_perfect_predictor_has_zero_frame_error(heldout):
    adapter, demos = heldout
    norm = adapter.stats.normalize_actions
    res = world_model_errors(adapter.task, perfect_predictor(demos, 2), demos, future_frames=2,
                             normalize_actions=norm)
    assert res["action_mse"] == res["first_action_mse"] == 0.0
    assert res["frame_mse_gt"] == 0.0 and res["psnr_gt"] == 100.0
    assert res["frame_mse_sim"] < 1e-12 and res["psnr_sim"] > 99
    assert res["frame_mse_sim_per_frame"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_a_wrong_predictor_has_a_positive_frame_error(heldout):
    adapter, demos = heldout
    norm = adapter.stats.normalize_actions
    still = world_model_errors(adapter.task, still_predictor(demos, 2), demos, future_frames=2,
                               normalize_actions=norm)
    assert still["frame_mse_gt"] > 1e-3 and still["frame_mse_sim"] > 1e-3
    assert still["action_mse"] == 0.0
    # the frame error grows with how far ahead the frame is
    assert still["frame_mse_gt_per_frame"][1] > still["frame_mse_gt_per_frame"][0]
    perfect = perfect_predictor(demos, 2)

    def wrong_actions(frames):  # the true future frames, but actions that do not lead there
        f, a = perfect(frames)
        return f, -a
    bad = world_model_errors(adapter.task, wrong_actions, demos, future_frames=2,
                             normalize_actions=norm)
    assert bad["frame_mse_gt"] == 0.0 and bad["frame_mse_sim"] > 1e-3 and bad["action_mse"] > 0.1
    assert psnr(bad["frame_mse_sim"]) < 40
    with pytest.raises(ValueError, match="expected"):
        world_model_errors(adapter.task, lambda f: perfect(f)[::-1], demos, future_frames=2,
                           normalize_actions=norm)


# ---- training and the end-to-end evaluation ---------------------------------------------------

class TestRoboticsWorldPlugin(ModalityPluginContract):
    """The kit's checks for the world model's kind and its ``robotics_world_debug_tiny``
    preset (trains a few steps, lowers the loss), and what that run writes and evaluates."""

    modality, distribution = "robotics_world", "selfflow-robotics"
    config_class = RoboticsWorldModality.Config
    presets = ("robotics_world", "robotics", "robotics_debug_tiny")
    loss_window, loss_ratio = 8, 0.8

    def test_debug_tiny_writes_frames_and_actions(self, debug_tiny_run):
        cfg = debug_tiny_run.config
        out = debug_tiny_run.run_dir / "samples" / f"step-{cfg.steps:08d}" / "robotics_world"
        frames = np.load(out / "frames.npy")
        assert frames.shape == (cfg.sampling.count, 2, 16, 16)
        assert np.load(out / "actions.npy").shape == (cfg.sampling.count, 4, 2)
        assert (out / "frames.png").stat().st_size > 0
        # the conditioning frames are the held-out episodes' reset frames, returned as given
        adapter = cfg.modalities["robotics_world"].modality.build()
        np.testing.assert_array_equal(frames[:, 0],
                                      adapter.heldout_initial_frames(cfg.sampling.count))
        assert np.isfinite(frames).all() and not np.array_equal(frames[:, 1], frames[:, 0])

    def test_evaluation_end_to_end(self, debug_tiny_run, one_thread, capsys):
        root = debug_tiny_run.root
        out = root / "eval.json"
        assert eval_main([str(root / "run"), "--episodes", "3", "--mse-episodes", "1",
                          "--steps", "3", "--json", str(out)]) == 0
        printed = capsys.readouterr().out
        for row in ("world model", "expert", "still frame", "random", "frame MSE sim"):
            assert row in printed
        res = json.loads(out.read_text())
        s = res["settings"]
        assert s["kind"] == "robotics_world" and s["execute"] == 2
        assert s["heldout_states"] == 50 and s["normalization"].startswith("store")
        for key in ("action_mse", "frame_mse_sim", "frame_mse_gt", "psnr_sim", "psnr_gt",
                    "success_rate", "mean_return", "mean_final_distance"):
            assert math.isfinite(res["policy"][key]), key
        assert res["policy"]["frame_mse_sim"] > 0 and res["policy"]["frame_mse_gt"] > 0
        assert res["expert"]["frame_mse_gt"] == 0 and res["expert"]["frame_mse_sim"] < 1e-12
        assert res["still"]["frame_mse_gt"] > 0 and res["still"]["success_rate"] is None
        assert res["expert"]["success_rate"] > res["random"]["success_rate"]
        assert res["policy"]["action_mse"] < res["random"]["action_mse"]

    def test_evaluation_takes_condition_t_and_the_modality_name(self, debug_tiny_run,
                                                                one_thread):
        run = debug_tiny_run.root / "run"
        res = evaluate(run, episodes=2, mse_episodes=1, steps=2, condition_t=0.1,
                       modality="robotics_world", verbose=False)
        assert res["settings"]["condition_t"] == 0.1
        with pytest.raises(ValueError, match="no robotics modality named 'nope'"):
            evaluate(run, episodes=1, mse_episodes=1, modality="nope", verbose=False)


def test_tiny_config_has_the_layout_of_the_preset():
    spec = world_debug_tiny().modalities["robotics_world"]
    adapter = spec.modality.build()
    assert adapter.frame_steps == [0, 4] and adapter.num_tokens == 2 * 16 + 4
    assert attrs.evolve(spec, scheduler=None).scheduler == spec.scheduler
