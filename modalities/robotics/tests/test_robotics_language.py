"""Tests of the instruction-following world model (``robotics_language``): scenes with a
distractor, instructions true to their episode and read back, frames showing both markers, the
language-following measures against hand-made rollouts, the presets, and a tiny run sampled
from instructions and evaluated by ``selfflow evaluate`` and ``selfflow-robotics-eval``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from selfflow_robotics import ReacherTask, RoboticsWorldModality
from selfflow_robotics.evaluate import main as eval_main
from selfflow_robotics.instructions import (
    DESCRIPTIONS,
    LOOK_WORDS,
    NAMINGS,
    VERBS,
    WHERE,
    captions,
    instruction,
    named_marker,
    parse_instruction,
)
from selfflow_robotics.language import (
    RoboticsLanguageModality,
    chunk_following,
    reset_states,
    scenes_of,
)
from selfflow_robotics.language_eval import (
    LearnedLanguageModel,
    distractor_expert,
    follow_scores,
)
from selfflow_robotics.presets import LANGUAGE_PROMPTS, language, language_debug_tiny
from selfflow_robotics.render import pixel_of, render_reacher, render_scene
from selfflow_robotics.scene import (
    REGION_NAMES,
    TARGET_DISC,
    Scene,
    make_scene,
    nearer_target,
    region_of,
    scene_arrays,
)
from selfflow_robotics.sim import episode_seed, execute_chunks, expert_policy, rollout

from selfflow_core import ByteTextEncoder, Components, MMDiT
from selfflow_core.eval.evaluate import evaluate_run
from selfflow_core.testing import ModalityContract, ModalityPluginContract
from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.tokens import patchify

SMALL = RoboticsLanguageModality.Config(episodes=2, horizon=4, future_frames=2, captions=3)
TASK = ReacherTask()


def _obs(target, tip, q=(0.0, 0.0)) -> np.ndarray:
    """A Reacher observation with the given target and fingertip (the angles are not checked)."""
    t, p = np.asarray(target, float), np.asarray(tip, float)
    return np.array([np.cos(q[0]), np.cos(q[1]), np.sin(q[0]), np.sin(q[1]), *t, 0, 0, *(p - t)])


@pytest.fixture(scope="module")
def episodes():
    """300 training-split episodes: reset seeds, reset states and scenes."""
    seeds = [episode_seed(0, "train", i) for i in range(300)]
    states = reset_states(TASK, seeds)
    return seeds, states, scenes_of(seeds, states, 0.1)


# ---- scenes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("point, name", [((-0.15, 0.15), "top left"), ((0.0, 0.15), "top"),
                                         ((0.15, 0.15), "top right"), ((-0.15, 0.0), "left"),
                                         ((0.0, 0.0), "centre"), ((0.15, -0.02), "right"),
                                         ((-0.1, -0.1), "bottom left"), ((0.05, -0.2), "bottom"),
                                         ((0.2, -0.2), "bottom right")])
def test_regions_by_hand(point, name):
    assert REGION_NAMES[int(region_of(np.array(point)))] == name


def test_scenes_are_deterministic_and_keep_the_distractor_elsewhere(episodes):
    seeds, states, scenes = episodes
    assert scenes == scenes_of(seeds, states, 0.1)                    # a function of the seed
    for scene, state in zip(scenes, states):
        t, d = scene.position(0), scene.position(1)
        np.testing.assert_array_equal(t, state[4:6])                  # the simulator's target
        assert scene.region(0) != scene.region(1)
        assert np.hypot(*(d - t)) >= 0.1 and np.hypot(*d) < TARGET_DISC
        assert {scene.look(0), scene.look(1)} == {0, 1}
    looks = np.array([s.target_look for s in scenes])
    assert 0.4 < looks.mean() < 0.6                                   # a fair coin per episode
    other = make_scene(seeds[0] + 1, states[0, 4:6])
    assert other.distractor != scenes[0].distractor
    wide = make_scene(seeds[0], states[0, 4:6], separation=0.2)
    assert np.hypot(*(wide.position(1) - wide.position(0))) >= 0.2


# ---- instructions -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("reach the bright round target at the top left", (0, 0)),
    ("move the arm to the dim marker on the right", (1, 5)),
    ("touch the square one", (1, None)),
    ("go to the target at the bottom", (None, 7)),
    ("point at the marker in the centre", (None, 4)),
    ("Reach the Round target, lower right!", (0, 8)),
    ("reach it", (None, None)),
    ("the bright square target", None),                  # two looks
    ("the target at the top and the bottom", None)])     # two rows
def test_parser_by_hand(text, parsed):
    assert parse_instruction(text) == parsed


def test_captions_are_true_to_the_episode(episodes):
    seeds, _, scenes = episodes
    seen = set()
    for seed, scene in zip(seeds[:100], scenes[:100]):
        for t in (0, 17, 49):
            for caption in captions(scene, 4, seed, t):
                look, region = parse_instruction(caption)
                assert look in (None, scene.look(0)) and region in (None, scene.region(0))
                assert (look, region) != (None, None)
                assert named_marker(scene, caption) == 0, (caption, scene)
                seen.add("look" if region is None else "region" if look is None else "both")
        # the same words name the other marker of the scene with the markers swapped
        swapped = Scene(target=scene.distractor, distractor=scene.target,
                        target_look=scene.look(1))
        assert named_marker(swapped, captions(scene, 1, seed, 0)[0]) == 1
    assert seen == set(NAMINGS)


def test_captions_are_deterministic_and_varied(episodes):
    seeds, _, scenes = episodes
    a = captions(scenes[0], 4, seeds[0], 3)
    assert a == captions(scenes[0], 4, seeds[0], 3) and len(set(a)) == 4
    assert any(captions(scenes[0], 4, seeds[0], t) != a for t in range(4, 8))
    assert len(captions(scenes[0], 12, seeds[0], 3)) == 12           # more than the templates


def test_evaluation_instructions_cycle_the_namings():
    adapter = SMALL.build()
    prompts = adapter.evaluation_prompts(6)
    _, scenes = adapter.heldout_episodes(6)
    assert prompts == [instruction(s, NAMINGS[i % 3]) for i, s in enumerate(scenes)]
    assert [parse_instruction(p)[0] is not None for p in prompts] == [True, True, False] * 2
    assert [parse_instruction(p)[1] is not None for p in prompts] == [True, False, True] * 2
    assert all(named_marker(s, p) == 0 for s, p in zip(scenes, prompts))


# ---- frames -----------------------------------------------------------------------------------

def test_scene_frames_show_both_markers_with_their_looks():
    size = 24
    state = _obs(target=(-0.12, 0.12), tip=(0.21, 0.0))              # arm along +x
    far = np.array([0.0, -0.15])

    def peak(frame, point):
        r, c = pixel_of(point, size)[0]
        return frame[r - 1:r + 2, c - 1:c + 2].max()

    bright, dim = (render_scene(state, far, look, size) for look in (0, 1))
    assert bright.shape == (size, size) and bright.dtype == np.float32
    assert peak(bright, state[4:6]) > peak(bright, far) > -0.5       # the target is the bright one
    assert peak(dim, far) > peak(dim, state[4:6]) > -0.5             # ... or the distractor is
    # the square marker fills its corners, the round one hardly: the same pixels, another shape
    assert not np.allclose(np.sort(bright.ravel()), np.sort(dim.ravel()))
    # away from the two markers the frame is the world model's
    plain = render_reacher(state, size)
    centres = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1)
    near = np.zeros((size, size), bool)
    for point in (state[4:6], far):
        near |= np.abs(centres - pixel_of(point, size)[0]).max(-1) <= 2
    np.testing.assert_array_equal(bright[~near], plain[~near])
    # a batch of episodes: one distractor and one look per episode
    batch = render_scene(np.stack([state, state])[:, None].repeat(3, 1),
                         np.stack([far, far])[:, None], np.array([[0], [1]]), size)
    assert batch.shape == (2, 3, size, size)
    assert np.array_equal(batch[0, 2], bright) and np.array_equal(batch[1, 0], dim)


# ---- the adapter ------------------------------------------------------------------------------

class TestLanguageContract(ModalityContract):
    config = SMALL

    def test_detokenize_inverts_tokenize(self, adapter, fields, batch):
        frames, actions = adapter.split(adapter.detokenize(batch.tokens))
        assert torch.equal(frames, fields["frames"]) and torch.equal(actions, fields["actions"])


@pytest.fixture(scope="module")
def small():
    adapter = SMALL.build()
    src = adapter.open_source("expert")
    return adapter, src, src.read(0, 100)


def test_source_frames_show_the_distractor_and_captions_name_the_target(small):
    adapter, src, raw = small
    demos = adapter.training_demonstrations()
    scenes = adapter.scenes(demos)
    far, looks = scene_arrays(scenes)
    e, t = raw["episode"], raw["timestep"]
    want = render_scene(demos.trajectory[e, t], far[e], looks[e], 16)
    np.testing.assert_array_equal(raw["frames"][:, 0], want)
    assert not np.array_equal(raw["frames"][:, 0], render_reacher(demos.trajectory[e, t], 16))
    assert raw["captions"].shape == (100, 3)
    assert all(named_marker(scenes[i], c) == 0 for i, row in zip(e, raw["captions"]) for c in row)
    enc = adapter.encode(raw)
    assert enc["captions"].shape == (100, 3) and set(adapter.fields()) == set(enc)
    # the same actions and layout as the world model's, another encoder record
    world = RoboticsWorldModality.Config(episodes=2, horizon=4, future_frames=2).build()
    world_raw = world.open_source("expert").read(0, 100)
    np.testing.assert_array_equal(raw["actions"], world_raw["actions"])
    assert adapter.num_tokens == world.num_tokens and adapter.token_dims == world.token_dims
    assert adapter.encoder_info()["name"] != world.encoder_info()["name"]
    assert "captions" not in world.fields()


def test_prompt_conditions_on_heldout_frames_with_distractors(small):
    adapter = small[0]
    prompt = adapter.prompt(3)
    frames = adapter.heldout_initial_frames(3)
    cond = prompt.tokens[:, :adapter.patch_tokens, :16]
    assert torch.equal(cond, patchify(torch.from_numpy(frames)[:, None], (1, 4, 4)))
    states, scenes = adapter.heldout_episodes(3)
    far, looks = scene_arrays(scenes)
    np.testing.assert_array_equal(frames, render_scene(states, far, looks, 16))


# ---- the language-following measures ----------------------------------------------------------

def test_follow_rate_by_hand():
    target, far = (0.1, 0.1), (-0.1, -0.05)
    at_target, at_far = _obs(target, target), _obs(target, far)
    near_target, near_far = _obs(target, (0.05, 0.05)), _obs(target, (-0.05, 0.0))
    d = np.array([far] * 4)
    assert nearer_target(np.stack([at_target, near_target]), d[:2]).tolist() == [True, True]
    assert nearer_target(np.stack([at_far, near_far]), d[:2]).tolist() == [False, False]
    assert nearer_target(np.stack([at_target, at_far, near_target, near_far]), d).mean() == 0.5


def test_rollouts_to_the_target_follow_and_to_the_distractor_do_not():
    seeds = [episode_seed(0, "rollout", i) for i in range(4)]
    scenes = scenes_of(seeds, reset_states(TASK, seeds), 0.1)
    far, _ = scene_arrays(scenes)
    to_target = follow_scores(rollout(TASK, expert_policy(TASK), seeds), far)
    to_far = follow_scores(rollout(TASK, distractor_expert(TASK, far), seeds), far)
    assert to_target["follow_rate"] == 1.0 and to_target["success_rate"] == 1.0
    assert to_far["follow_rate"] == 0.0 and to_far["success_rate"] == 0.0
    assert to_far == follow_scores(rollout(TASK, distractor_expert(TASK, far), seeds), far)


def _expert_chunks(states: np.ndarray, goals: np.ndarray, h: int) -> np.ndarray:
    """The expert's chunk of ``h`` actions from each state towards ``goals`` [n, 2]."""
    cur, chunk = states.copy(), []
    for _ in range(h):
        aimed = cur.copy()
        aimed[:, 8:10], aimed[:, 4:6] = aimed[:, 4:6] + aimed[:, 8:10] - goals, goals
        chunk.append(TASK.expert(aimed))
        cur = execute_chunks(TASK, cur, chunk[-1][:, None])[:, -1]
    return np.stack(chunk, 1)


def test_prompt_metrics_score_the_chunk_against_the_named_marker(small):
    adapter = small[0]
    n = 30
    states, scenes = adapter.heldout_episodes(n)
    far, _ = scene_arrays(scenes)
    prompts = adapter.evaluation_prompts(n)
    to_far = [f"reach the {' '.join(LOOK_WORDS[s.look(1)])} target" for s in scenes]

    def latents(goals):
        actions = adapter.stats.normalize_actions(_expert_chunks(states, goals, adapter.horizon))
        frames = torch.zeros(n, 3, 16, 16)
        return adapter.pack(frames, torch.from_numpy(actions).float()).tokens

    toward_target, toward_far = latents(states[:, 4:6]), latents(far)
    good = adapter.prompt_metrics(toward_target, prompts)
    assert good["named"] == 1.0 and good["chunk_follow_rate"] > 0.7 and good["chunk_progress"] > 0
    bad = adapter.prompt_metrics(toward_far, prompts)
    assert bad["chunk_follow_rate"] < 0.35
    # told to go to the distractor, going there is following
    assert adapter.prompt_metrics(toward_far, to_far)["chunk_follow_rate"] > 0.7
    assert adapter.prompt_metrics(toward_target, to_far)["chunk_follow_rate"] < 0.35
    unnamed = chunk_following(states, states, scenes, ["do something"] * n)
    assert unnamed["named"] == 0.0 and math.isnan(unnamed["chunk_follow_rate"])


# ---- presets and the tiny run -----------------------------------------------------------------

def test_language_presets():
    for preset in (language(), language_debug_tiny()):
        spec = preset.modalities["robotics_language"]
        adapter = spec.modality.build()
        assert isinstance(preset.backbone, MMDiT.Config)
        assert isinstance(preset.text_encoder, ByteTextEncoder.Config)
        assert sum(preset.backbone.axes_dim) == preset.backbone.width // preset.backbone.heads
        assert spec.scheduler == spec.modality.default_scheduler()
        assert preset.sampling.prompts == LANGUAGE_PROMPTS and preset.sampling.evaluate
        # sample i shows held-out episode i: the prompts are those episodes' instructions
        assert adapter.evaluation_prompts(len(LANGUAGE_PROMPTS)) == list(LANGUAGE_PROMPTS)
    longest = max(len(f"{v} " + d.format(b=b, s=s, w=w))
                  for v in VERBS for ds in DESCRIPTIONS.values() for d in ds
                  for b, s in LOOK_WORDS for w in WHERE.values())
    assert longest <= language().text_encoder.max_length
    tiny = language_debug_tiny()
    assert "tiny" in tiny.run_dir and tiny.steps <= 40
    assert tiny.modalities["robotics_language"].modality.episodes <= 6


class TestRoboticsLanguagePlugin(ModalityPluginContract):
    """The kit's checks for ``robotics_language`` and its tiny preset (trains a few steps,
    lowers the loss), then what the run samples from instructions and how it is evaluated."""

    modality, distribution = "robotics_language", "selfflow-robotics"
    config_class = RoboticsLanguageModality.Config
    presets = ("robotics_language", "robotics_world", "robotics")
    loss_window, loss_ratio = 8, 0.8

    def test_samples_from_instructions(self, debug_tiny_run):
        cfg = debug_tiny_run.config
        out = debug_tiny_run.run_dir / "samples" / f"step-{cfg.steps:08d}" / "robotics_language"
        listing = json.loads((out / "prompts.json").read_text())
        assert list(listing.values()) == list(LANGUAGE_PROMPTS[:cfg.sampling.count])
        frames = np.load(out / "frames.npy")
        adapter = cfg.modalities["robotics_language"].modality.build()
        np.testing.assert_array_equal(frames[:, 0],
                                      adapter.heldout_initial_frames(cfg.sampling.count))
        assert np.isfinite(frames).all()
        assert np.load(out / "actions.npy").shape == (cfg.sampling.count, 4, 2)

    def test_selfflow_evaluate_scores_the_instructions(self, debug_tiny_run, one_thread):
        run = debug_tiny_run.root / "run"
        res = evaluate_run(run, Components(), count=6, steps=2)
        scores = res["modalities"]["robotics_language"]
        assert scores["prompts"] == 6 and scores["named"] == 1.0
        assert 0.0 <= scores["chunk_follow_rate"] <= 1.0
        assert evaluate_run(run, Components(), count=6, steps=2) == res  # deterministic

    def test_closed_loop_guidance_is_against_the_encoders_empty_prompt(self, debug_tiny_run,
                                                                        one_thread):
        model = LearnedLanguageModel(debug_tiny_run.root / "run", steps=1, cfg_scale=2.0)
        byte_encode = model.text.encode

        def encode(captions):  # an encoder whose "" is a real token, as T5's end token
            out = byte_encode(captions)
            for i, caption in enumerate(captions):
                if caption == "":
                    out.ids[i, 0], out.mask[i, 0] = 47, True
            return out

        model.text.encode = encode
        calls, forward = [], model.model.forward

        def spy(x, t, batch, **kw):
            calls.append(batch)
            return forward(x, t, batch, **kw)

        model.model.forward = spy
        frames = model.adapter.heldout_initial_frames(2)
        model.sample_instructed(frames, list(LANGUAGE_PROMPTS[:2]))
        empty = encode([""])
        assert calls and all(torch.equal(c.text_ids[2:].cpu(), empty.ids.expand(2, -1))
                             and torch.equal(c.text_mask[2:].cpu(), empty.mask.expand(2, -1))
                             for c in calls)

    def test_closed_loop_following_instructions(self, debug_tiny_run, one_thread, capsys):
        out = debug_tiny_run.root / "language-eval.json"
        assert eval_main([str(debug_tiny_run.root / "run"), "--episodes", "3", "--steps", "2",
                          "--cfg-scale", "1.5", "--json", str(out)]) == 0
        printed = capsys.readouterr().out
        for row in ("world model", "expert→distractor", "arm held still", "random", "follow"):
            assert row in printed
        res = json.loads(out.read_text())
        s = res["settings"]
        assert s["kind"] == "robotics_language" and s["cfg_scale"] == 1.5 and s["execute"] == 2
        assert len(s["instructions"]) == 3 and s["normalization"].startswith("store")
        assert res["expert"]["follow_rate"] == 1.0 and res["distractor"]["follow_rate"] == 0.0
        assert res["expert"]["success_rate"] == 1.0 and res["distractor"]["success_rate"] == 0.0
        assert 0.0 <= res["still"]["follow_rate"] <= 1.0 and res["still"]["success_rate"] == 0.0
        for naming in NAMINGS:
            assert res["policy"][f"follow_rate_{naming}"] in (0.0, 1.0)
        assert math.isfinite(res["policy"]["mean_return"])
