"""Evaluating the instruction-following world model (``robotics_language``) in closed loop.

Episodes of the ``rollout`` split (never trained on), each with its scene
(:mod:`selfflow_robotics.scene`) and one instruction naming the simulator's target, by look and
region, by look, by region in turn (:func:`~selfflow_robotics.instructions.instruction`). Every
``execute`` steps the model draws the current frame (both markers), generates frames and actions
from it and the instruction, and the first ``execute`` actions are executed. Reported, next to
the scripted expert, the expert sent to the distractor, zero actions and uniform random actions:

- ``success_rate`` / ``near_rate`` / returns / final distance: against the simulator's target,
  as for the other kinds;
- ``follow_rate``: episodes whose fingertip ends nearer the named target than the distractor
  (the language-following measure: a policy that reaches one of the two markers without
  reading the instruction scores 0.5, as the looks are a fair coin per episode; so does, over
  many episodes, an arm that does not move, whose row shows the chance level of the episodes
  at hand), also per naming for the model (``follow_rate_both`` ...).

``selfflow-robotics-eval`` runs it for a ``robotics_language`` run (:func:`evaluate_language`);
``selfflow evaluate`` scores the same run's one-chunk samples of held-out reset frames
(:meth:`~selfflow_robotics.language.RoboticsLanguageModality.prompt_metrics`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from selfflow_core import TokenBatch, empty_encoding, sample
from selfflow_robotics.evaluate import LearnedWorldModel, _step_of
from selfflow_robotics.instructions import NAMINGS, instruction
from selfflow_robotics.language import RoboticsLanguageModality, reset_states, scenes_of
from selfflow_robotics.render import render_scene
from selfflow_robotics.scene import Scene, fingertip, nearer_target, scene_arrays
from selfflow_robotics.sim import (
    Policy,
    RolloutResult,
    Task,
    episode_seed,
    expert_policy,
    random_policy,
    rollout,
)


def _with_text(batch: TokenBatch, encoding) -> TokenBatch:
    """``batch`` with one encoded prompt per sample (a text encoder's ``TextEncoding``)."""
    def put(t):
        return None if t is None else t.to(batch.tokens.device)
    return attrs.evolve(batch, text=put(encoding.embeddings), text_ids=put(encoding.ids),
                        text_mask=put(encoding.mask), text_pooled=put(encoding.pooled))


class LearnedLanguageModel(LearnedWorldModel):
    """A trained ``robotics_language`` run: :meth:`sample_instructed` generates frames and
    actions from current frames and instructions; :meth:`policy` is the closed-loop policy of a
    list of scenes and their instructions. ``cfg_scale``: the guidance against the empty prompt
    (default: the run's ``sampling.cfg_scale``), the unconditional half of each guided call
    holding the text encoder's encoding of ``""``, as the run's own samples; the other options are
    :class:`~selfflow_robotics.evaluate.LearnedWorldModel`'s."""

    def __init__(self, checkpoint_path: str | Path, *, cfg_scale: float | None = None,
                 **options: Any) -> None:
        super().__init__(checkpoint_path, **options)
        if not isinstance(self.adapter, RoboticsLanguageModality):
            raise ValueError(f"{self.path}: modality {self.runtime.name!r} is a "
                             f"{self.adapter.name}, not a robotics_language modality")
        if self.config.text_encoder is None:
            raise ValueError(f"{self.path}: the run has no text_encoder")
        self.text = self.config.text_encoder.build()
        self.cfg_scale = (self.config.sampling.cfg_scale if cfg_scale is None
                          else float(cfg_scale))

    @torch.no_grad()
    def sample_instructed(self, frames: np.ndarray, prompts: Sequence[str],
                          batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames [n, 1 + F, size, size], normalised actions [n, H, A])`` for current frames
        [n, size, size] and one instruction each."""
        if len(prompts) != len(frames):
            raise ValueError(f"{len(prompts)} instructions for {len(frames)} frames")
        outs_f, outs_a = [], []
        frames = torch.from_numpy(np.array(frames, np.float32))
        for start in range(0, len(frames), batch_size):
            part = frames[start:start + batch_size]
            prompt = self.adapter.prompt(len(part), {"frame": part}).to(self.device)
            prompt = attrs.evolve(prompt, modality_ids=prompt.modality_ids + self.runtime.id_offset)
            prompt = _with_text(prompt, self.text.encode(list(prompts[start:start + len(part)])))
            tokens = sample(self.model, prompt, steps=self.steps, method=self.method,
                            shift=self.shift, cfg_scale=self.cfg_scale,
                            generator=self.generator, condition_t=self.condition_t,
                            empty_text=empty_encoding(self.text))
            f, a = self.adapter.split(tokens.float().cpu())
            outs_f.append(f)
            outs_a.append(a)
        return torch.cat(outs_f), torch.cat(outs_a)

    def policy(self, scenes: Sequence[Scene], prompts: Sequence[str]) -> Policy:
        """Raw states [n, S] of the ``n`` episodes of ``scenes`` -> action chunks [n, H, A] in
        simulator units, following ``prompts`` (one per episode)."""
        far, looks = scene_arrays(scenes)

        def act(states: np.ndarray) -> np.ndarray:
            frames = render_scene(np.asarray(states, np.float64), far, looks, self.adapter.size)
            return self.adapter.actions_to_env(self.sample_instructed(frames, prompts)[1])
        return act


def distractor_expert(task: Task, distractors: np.ndarray) -> Policy:
    """The scripted expert sent to each episode's distractor [n, 2] instead of its target."""
    far = np.asarray(distractors, np.float64)

    def act(states: np.ndarray) -> np.ndarray:
        s = np.array(states, np.float64)
        s[:, 8:10] = fingertip(s) - far
        s[:, 4:6] = far
        return task.expert(s)[:, None, :]
    return act


def still_policy(task: Task) -> Policy:
    """Zero actions: the arm stays about where it was reset (the follow rate of not moving)."""
    return lambda states: np.zeros((len(states), 1, task.action_dim))


def follow_scores(run: RolloutResult, distractors: np.ndarray) -> dict[str, float]:
    """:meth:`RolloutResult.summary` and ``follow_rate``: the fraction of episodes ending
    nearer the (simulator's) target than the distractor."""
    return {**run.summary(),
            "follow_rate": float(nearer_target(run.final_states, distractors).mean())}


def evaluate_language(checkpoint_path: str | Path, *, episodes: int = 50,
                      execute: int | None = None, steps: int | None = None,
                      method: str | None = None, seed: int = 0, device: str = "cpu",
                      store: str | None = None, modality: str | None = None, components=None,
                      condition_t: float | None = None, cfg_scale: float | None = None,
                      verbose: bool = True, loaded=None) -> dict[str, Any]:
    """The closed loop of a ``robotics_language`` checkpoint (see the module doc): rows
    ``policy``, ``expert``, ``distractor`` (the expert sent to the distractor), ``still`` (zero
    actions: the follow rate of not moving, about 0.5 over many episodes) and ``random``,
    each with :func:`follow_scores`; ``policy`` also has ``follow_rate_<naming>`` and
    ``success_rate_<naming>`` per naming (``None`` when no episode had it)."""
    t0 = time.perf_counter()
    model = LearnedLanguageModel(checkpoint_path, components=components, device=device,
                                 modality=modality, store=store, steps=steps, method=method,
                                 condition_t=condition_t, seed=seed, loaded=loaded,
                                 cfg_scale=cfg_scale)
    adapter, c = model.adapter, model.adapter.config
    task, horizon = adapter.task, adapter.horizon
    execute = execute or max(1, horizon // 2)
    if not 1 <= execute <= horizon:
        raise ValueError(f"execute must be in 1..{horizon} (the chunk length), got {execute}")
    seeds = [episode_seed(c.seed, "rollout", i) for i in range(episodes)]
    scenes = scenes_of(seeds, reset_states(task, seeds), c.separation)
    namings = [NAMINGS[i % len(NAMINGS)] for i in range(episodes)]
    prompts = [instruction(s, n) for s, n in zip(scenes, namings)]
    far, _ = scene_arrays(scenes)
    runs = {"policy": rollout(task, model.policy(scenes, prompts), seeds, execute=execute),
            "expert": rollout(task, expert_policy(task), seeds, execute=1),
            "distractor": rollout(task, distractor_expert(task, far), seeds, execute=1),
            "still": rollout(task, still_policy(task), seeds, execute=1),
            "random": rollout(task, random_policy(task, seed=seed), seeds, execute=1)}
    results: dict[str, Any] = {name: follow_scores(run, far) for name, run in runs.items()}
    followed = nearer_target(runs["policy"].final_states, far)
    for naming in NAMINGS:
        rows = [i for i, n in enumerate(namings) if n == naming]
        results["policy"][f"follow_rate_{naming}"] = (
            float(followed[rows].mean()) if rows else None)
        results["policy"][f"success_rate_{naming}"] = (
            float(runs["policy"].success[rows].mean()) if rows else None)
    results["settings"] = {
        "kind": RoboticsLanguageModality.Config.kind, "checkpoint": str(model.path),
        "step": _step_of(model.path), "task": task.env_id, "horizon": horizon,
        "execute": execute, "sampler_steps": model.steps, "method": model.method,
        "shift": model.shift, "cfg_scale": model.cfg_scale, "condition_t": model.condition_t,
        "rollout_episodes": episodes, "instructions": prompts,
        "success": f"final distance < {getattr(task, 'success_distance', float('nan'))}",
        "near": f"final distance < {getattr(task, 'near_distance', float('nan'))}",
        "follow": "final fingertip nearer the named target than the distractor (chance 0.5)",
        "normalization": model.normalization_from, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2)}
    bad = [f"{k}.{m}" for k in runs for m, x in results[k].items()
           if isinstance(x, float) and not math.isfinite(x)]
    if bad:
        raise FloatingPointError(f"non-finite evaluation numbers: {bad}")
    if verbose:
        print(format_language_table(results))
    return results


def format_language_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (f"{s['task']} instruction-following world model | {s['checkpoint']} | chunk "
            f"{s['horizon']}, execute {s['execute']}, {s['method']} {s['sampler_steps']} steps "
            f"(shift {s['shift']:g}, guidance {s['cfg_scale']:g}) | rollouts "
            f"{s['rollout_episodes']} | success: {s['success']}, near: {s['near']}")
    cols = ("success", "near", "follow", "mean return", "final dist")
    rows = [("world model", "policy"), ("expert", "expert"),
            ("expert→distractor", "distractor"), ("arm held still", "still"),
            ("random", "random")]
    lines = [head, f"{'':<18}" + "".join(f"{col:>15}" for col in cols)]
    for label, key in rows:
        r = results[key]
        cells = (f"{100 * r['success_rate']:.1f}%", f"{100 * r['near_rate']:.1f}%",
                 f"{r['follow_rate']:.2f}", f"{r['mean_return']:.2f} ± {r['std_return']:.2f}",
                 f"{r['mean_final_distance']:.4f}")
        lines.append(f"{label:<18}" + "".join(f"{cell:>15}" for cell in cells))
    p = results["policy"]
    per = [f"{n}: follow {p[f'follow_rate_{n}']:.2f}, success "
           f"{100 * p[f'success_rate_{n}']:.1f}%" for n in NAMINGS
           if p[f"follow_rate_{n}"] is not None]
    lines.append("world model by naming (look and region / look / region): " + "; ".join(per))
    lines.append(f"follow: {s['follow']}; normalisation: {s['normalization']}")
    return "\n".join(lines)
