"""The instruction-following world model (kind ``robotics_language``): the world model of
:mod:`selfflow_robotics.world` whose frames also show a distractor marker, conditioned on an
instruction that names the real target (``reach the bright round target at the top left``).

- **Scenes.** Every episode gets a distractor and the two markers' looks
  (:mod:`selfflow_robotics.scene`, deterministic per reset seed); the frames of its states are
  drawn with both markers (:func:`~selfflow_robotics.render.render_scene`). The simulator, its
  expert, its actions and its success test are those of the world model: the distractor has no
  physics and success is always the simulator's own target.
- **Captions.** ``captions`` (``K``) instructions per sample, stored in the ``captions`` field
  (:mod:`selfflow_robotics.instructions`): the target named by its look, its region of the 3x3
  grid, or both; the distractor differs in both, so each names the target alone. Frames alone
  cannot tell which marker is real (the looks are a fair coin per episode): the instruction
  must.
- **Tokens, timesteps, normalisation, samples**: the world model's (same layout and default
  scheduler; the run's text encoder adds the prompt tokens).
- **Prompts.** Without ``fields``, :meth:`prompt` conditions sample ``i`` on the reset frame of
  held-out episode ``i``, and :meth:`evaluation_prompts` gives those episodes' instructions, so
  ``selfflow evaluate`` pairs them; :meth:`prompt_metrics` executes each sample's generated
  chunk from its episode's reset state and scores it against the marker its prompt names.

A kind of its own (a subclass of the world model's), not options of ``robotics_world``: its
stores hold another field and other frames, and the world model's config, and so the hash of
its stores, stays exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from attrs import validators as v
from torch import Tensor

from selfflow_core.tokens import caption_array, captions_field, captions_spec
from selfflow_robotics.instructions import (
    CAPTIONS_VERSION,
    NAMINGS,
    captions,
    instruction,
    named_marker,
)
from selfflow_robotics.render import render_scene, scene_render_settings
from selfflow_robotics.scene import (
    SCENE_VERSION,
    SEPARATION,
    Scene,
    fingertip,
    make_scene,
    scene_arrays,
)
from selfflow_robotics.sim import Demonstrations, Task, collect, episode_seed, execute_chunks
from selfflow_robotics.world import RoboticsWorldModality, WorldSource


def reset_states(task: Task, seeds: Sequence[int]) -> np.ndarray:
    """The reset observations [n, S] (float64) of episodes reset with ``seeds``."""
    env = task.make_env()
    try:
        return np.stack([env.reset(seed=int(s))[0] for s in seeds]).astype(np.float64)
    finally:
        env.close()


def scenes_of(seeds: Sequence[int], states: np.ndarray, separation: float) -> list[Scene]:
    """The scene of each episode from its reset seed and a state of it [n, S] (its target)."""
    return [make_scene(s, x[4:6], separation=separation) for s, x in zip(seeds, states)]


class LanguageSource(WorldSource):
    """The world model's samples with frames that show each episode's distractor, plus
    ``captions`` [K] (str) per sample."""

    def __init__(self, demos: Demonstrations, scenes: list[Scene], future_frames: int,
                 k: int, description: str) -> None:
        super().__init__(demos, future_frames, description)
        self.scenes, self.k = scenes, k

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = super().read(start, stop)
        seeds = self.demos.seeds
        out["captions"] = caption_array(
            [captions(self.scenes[e], self.k, int(seeds[e]), int(t))
             for e, t in zip(out["episode"], out["timestep"])], self.k)
        return out


class RoboticsLanguageModality(RoboticsWorldModality):
    name = "robotics_language"

    @attrs.frozen(kw_only=True)
    class Config(RoboticsWorldModality.Config):
        """The world model's fields, plus ``captions``: instructions per sample (``K``), and
        ``separation``: the least distance of the distractor from the target (metres)."""

        kind = "robotics_language"
        captions: int = attrs.field(default=4, validator=[v.ge(1), v.le(64)])
        separation: float = attrs.field(default=SEPARATION, validator=[v.ge(0), v.le(0.2)])

        def build(self) -> RoboticsLanguageModality:
            return RoboticsLanguageModality(self)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._demos: dict[tuple[str, int], Demonstrations] = {}
        self._heldout: dict[int, tuple[np.ndarray, list[Scene]]] = {}

    def fields(self):
        return {**super().fields(), "captions": captions_spec(self.config.captions)}

    def encoder_info(self) -> dict[str, Any]:
        info = super().encoder_info()
        c = self.config
        settings = {**info["settings"], "render": scene_render_settings(self.size),
                    "scene": {"version": SCENE_VERSION, "separation": c.separation},
                    "captions": {"version": CAPTIONS_VERSION, "per_sample": c.captions}}
        return {"name": "robotics-language", "version": "1", "settings": settings}

    # ---- demonstrations and scenes ---------------------------------------------------------------

    def _with_scenes(self, split: str, episodes: int) -> Demonstrations:
        """Expert episodes of ``split`` whose frames show their distractors (cached)."""
        key = (split, episodes)
        if key not in self._demos:
            c = self.config
            demos = collect(c.task, episodes, seed=c.seed, split=split, horizon=c.horizon,
                            action_noise=c.action_noise)
            far, looks = scene_arrays(self.scenes(demos))
            frames = render_scene(demos.trajectory, far[:, None], looks[:, None], self.size)
            frames.flags.writeable = False
            self._demos[key] = attrs.evolve(demos, frames=frames)
        return self._demos[key]

    def scenes(self, demos: Demonstrations) -> list[Scene]:
        """The scene of each episode of ``demos``."""
        return scenes_of(demos.seeds, demos.trajectory[:, 0], self.config.separation)

    def training_demonstrations(self) -> Demonstrations:
        return self._with_scenes("train", self.config.episodes)

    def heldout_demonstrations(self, episodes: int) -> Demonstrations:
        return self._with_scenes("heldout", episodes)

    def heldout_episodes(self, n: int) -> tuple[np.ndarray, list[Scene]]:
        """Reset states [n, S] and scenes of the first ``n`` held-out episodes."""
        if n not in self._heldout:
            seeds = [episode_seed(self.config.seed, "heldout", i) for i in range(n)]
            states = reset_states(self.task, seeds)
            self._heldout[n] = (states, scenes_of(seeds, states, self.config.separation))
        return self._heldout[n]

    def heldout_initial_frames(self, n: int) -> np.ndarray:
        """Frames [n, size, size] of the reset states of the first ``n`` held-out episodes, with
        their distractors."""
        states, scenes = self.heldout_episodes(n)
        far, looks = scene_arrays(scenes)
        return render_scene(states, far, looks, self.size)

    # ---- offline -----------------------------------------------------------------------------

    def open_source(self, source: str) -> LanguageSource:
        """``expert``: the world model's demonstrations, frames with distractors, and
        ``captions`` instructions per sample."""
        world = super().open_source(source)
        c = self.config
        demos = self.training_demonstrations()
        desc = (f"{world.description}; a distractor at least {c.separation} m from the target "
                f"in another region, {c.captions} instructions per sample")
        return LanguageSource(demos, self.scenes(demos), c.future_frames, c.captions, desc)

    def encode(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**super().encode(raw),
                "captions": captions_field(raw, self.config.captions, modality="robotics")}

    # ---- prompt-following evaluation -------------------------------------------------------------

    def evaluation_prompts(self, n: int) -> list[str]:
        """The instructions of the first ``n`` held-out episodes, naming the target by look and
        region, by look, by region in turn (:data:`~selfflow_robotics.instructions.NAMINGS`):
        prompt ``i`` goes with :meth:`prompt`'s sample ``i``."""
        _, scenes = self.heldout_episodes(n)
        return [instruction(s, NAMINGS[i % len(NAMINGS)]) for i, s in enumerate(scenes)]

    def prompt_metrics(self, latents: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Sample ``i``'s generated chunk executed from held-out episode ``i``'s reset state
        (the state :meth:`prompt` shows it), scored against the marker prompt ``i`` names there
        (:func:`~selfflow_robotics.instructions.named_marker`; prompts naming neither marker
        alone are left out):

        - ``chunk_follow_rate``: chunks that bring the fingertip nearer the named marker than
          the other, relative to where it started (its distance to the named one shrinks by
          more);
        - ``chunk_progress``: the mean shrinking of the distance to the named marker (metres);
        - ``named``: the fraction of prompts that name one marker."""
        n = len(prompts)
        states, scenes = self.heldout_episodes(n)
        _, actions = self.split(latents.detach().float().cpu()[:n])
        reached = execute_chunks(self.task, states, self.actions_to_env(actions))
        return chunk_following(reached[:, 0], reached[:, -1], scenes, prompts)


def chunk_following(start: np.ndarray, end: np.ndarray, scenes: Sequence[Scene],
                    prompts: Sequence[str]) -> dict[str, float]:
    """The scores of :meth:`RoboticsLanguageModality.prompt_metrics` for chunks that took the
    arm from states ``start`` to ``end`` [n, S] in ``scenes``, after ``prompts``."""
    named = [named_marker(s, p) for s, p in zip(scenes, prompts)]
    rows = [i for i, m in enumerate(named) if m is not None]
    if not rows:
        return {"chunk_follow_rate": float("nan"), "chunk_progress": float("nan"), "named": 0.0}
    a, b = fingertip(np.asarray(start)[rows]), fingertip(np.asarray(end)[rows])
    pos = np.array([[scenes[i].position(m) for m in (named[i], 1 - named[i])] for i in rows])
    gain = (np.linalg.norm(a[:, None] - pos, axis=-1) - np.linalg.norm(b[:, None] - pos, axis=-1))
    return {"chunk_follow_rate": float(np.mean(gain[:, 0] > gain[:, 1])),
            "chunk_progress": float(np.mean(gain[:, 0])), "named": len(rows) / len(prompts)}
