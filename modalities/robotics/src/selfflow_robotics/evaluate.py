"""Evaluating a trained action-chunk policy or world model: held-out action error (and, for a
world model, frame prediction error) and closed-loop rollouts.

``selfflow-robotics-eval CHECKPOINT`` (or :func:`evaluate`) loads the run's evaluation model
(the evaluation EMA, else the EMA teacher, else the raw student, as
:func:`selfflow_core.eval.samples.load_for_sampling` picks) and reports, next to the scripted
expert and a uniform random policy:

1. **Action MSE on held-out states.** Expert episodes whose reset seeds are from the
   ``heldout`` split (never used for training), recorded exactly like the training data; for
   each of their states one action chunk is sampled and compared with the expert's chunk, in
   normalised units (1 = half the 1..99 % range of a dim): over the whole chunk and for its
   first action. The expert's own error is 0 by definition.
2. **Closed loop.** Episodes with reset seeds from the ``rollout`` split, every environment
   stepped in lockstep: every ``execute`` steps the policy samples a chunk of ``H`` actions
   for the current states, the first ``execute`` are executed (receding horizon), then it
   re-plans. Reported: success rate (final fingertip distance < 0.02 m for Reacher), the
   looser "near" rate (< 0.05 m), mean return and mean final distance. The expert acts every
   step (no noise); random acts uniformly.

A ``robotics_world`` run (:func:`evaluate_world`) is evaluated the same way, its policy being
"draw the current frame, generate frames and actions, execute the actions", plus the error of
its generated future frames (:func:`world_model_errors`): against the frames the simulator draws
after executing the *generated* actions from the same state, and against the held-out expert
episode's own frames; a "still frame" baseline (the future = the current frame) sits beside it.
A ``robotics_language`` run is evaluated in closed loop following instructions
(:mod:`selfflow_robotics.language_eval`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from selfflow_core import (
    CheckpointError,
    Components,
    StoreError,
    latest_checkpoint,
    load_for_sampling,
    make_converter,
    open_store,
    sample,
    to_data,
)
from selfflow_robotics.adapter import RoboticsModality
from selfflow_robotics.sim import (
    Demonstrations,
    Task,
    collect,
    episode_seed,
    execute_chunks,
    expert_policy,
    random_policy,
    rollout,
)
from selfflow_robotics.world import RoboticsWorldModality


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory / its ``checkpoints`` folder (-> the latest)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for folder in (p / "checkpoints", p):
        if folder.is_dir() and (found := latest_checkpoint(folder)) is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (give a checkpoint file or a run directory)")


def _load(path: Path, components: Components, device: str, modality: str | None,
          kinds: tuple[type, ...], loaded=None):
    """``(config, runtime, model)``: the run's first modality of one of ``kinds`` (named
    ``modality`` when given), from ``loaded`` (what ``load_for_sampling`` returned) or the
    checkpoint at ``path``."""
    config, runtimes, model = loaded or load_for_sampling(path, components, device)
    found = [m for m in runtimes if isinstance(m.adapter, kinds)
             and (modality is None or m.name == modality)]
    if not found:
        what = " or ".join(k.name for k in kinds)
        raise ValueError(f"{path}: the run has no {what} modality"
                         + (f" named {modality!r}" if modality else "")
                         + f" (modalities: {[m.name for m in runtimes]})")
    return config, found[0], model


def _restore_normalization(adapter, runtime, config, path: Path, components: Components,
                           store: str) -> str:
    """Use the statistics recorded in the training store when it is found and was written
    for this modality config; otherwise recompute them (the demonstrations are
    deterministic given the config, so the numbers are the same)."""
    wanted = to_data(make_converter(components), runtime.spec.modality)
    candidates = [Path(store).expanduser()]
    run_dir = Path(config.run_dir)
    if not run_dir.is_absolute() and "://" not in store and not Path(store).is_absolute():
        # the store path is relative to where training ran: the run dir's base
        candidates.append(path.parents[1].joinpath(*[".."] * len(run_dir.parts)) / store)
    for candidate in candidates:
        try:
            found = open_store(candidate, adapter=adapter)
        except StoreError:
            continue
        if found.schema.get("adapter_config") == wanted:
            adapter.set_normalization(found.schema["normalization"])
            return f"store {candidate}"
    _ = adapter.stats
    return "recomputed from the training demonstrations (store not found)"


class LearnedPolicy:
    """A trained run's action-chunk sampler: raw states [n, S] -> raw action chunks [n, H, A].
    ``loaded``: what :func:`selfflow_core.load_for_sampling` returned for the checkpoint, to
    not load it again."""

    def __init__(self, checkpoint_path: str | Path, *, components: Components | None = None,
                 device: str = "cpu", modality: str | None = None, store: str | None = None,
                 steps: int | None = None, method: str | None = None, seed: int = 0,
                 loaded=None) -> None:
        self.path = resolve_checkpoint(checkpoint_path)
        components = components or Components()
        self.config, self.runtime, self.model = _load(self.path, components, device, modality,
                                                      (RoboticsModality,), loaded)
        self.adapter: RoboticsModality = self.runtime.adapter
        self.device = torch.device(device)
        self.steps = steps or self.config.sampling.steps
        self.method = method or self.config.sampling.method
        self.shift = self.config.sampling.shift
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.normalization_from = _restore_normalization(
            self.adapter, self.runtime, self.config, self.path, components,
            store or self.runtime.spec.store)

    @torch.no_grad()
    def sample_normalized(self, states: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """Normalised action chunks [n, H, A] for raw states [n, S]."""
        out = []
        for start in range(0, len(states), batch_size):
            prompt = self.adapter.prompt_from_states(states[start:start + batch_size])
            prompt = prompt.to(self.device)
            prompt = attrs.evolve(prompt, modality_ids=prompt.modality_ids + self.runtime.id_offset)
            tokens = sample(self.model, prompt, steps=self.steps, method=self.method,
                            shift=self.shift, generator=self.generator)
            out.append(self.adapter.detokenize(tokens).float().cpu())
        return torch.cat(out)

    def __call__(self, states: np.ndarray) -> np.ndarray:
        return self.adapter.actions_to_env(self.sample_normalized(states))


def _mse(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"action_mse": float(np.mean((pred - target) ** 2)),
            "first_action_mse": float(np.mean((pred[:, 0] - target[:, 0]) ** 2))}


def evaluate(checkpoint_path: str | Path, *, episodes: int = 50, mse_episodes: int = 10,
             execute: int | None = None, steps: int | None = None, method: str | None = None,
             seed: int = 0, device: str = "cpu", store: str | None = None,
             modality: str | None = None, components: Components | None = None,
             condition_t: float | None = None, cfg_scale: float | None = None,
             verbose: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (see the module doc); prints a table when ``verbose`` and returns
    ``{"policy": {...}, "expert": {...}, "random": {...}, "settings": {...}}`` where each
    policy has ``action_mse``, ``first_action_mse``, ``success_rate``, ``near_rate``,
    ``mean_return``, ``std_return`` and ``mean_final_distance``.

    A run whose robotics modality is a world model (``robotics_world``, or the one ``modality``
    names) is evaluated by :func:`evaluate_world`, which adds the frame prediction errors and a
    ``still`` row (``condition_t``: the time the conditioning frame is fed at; default the
    run's). An instruction-following world model (``robotics_language``) is evaluated by
    :func:`selfflow_robotics.language_eval.evaluate_language` (``cfg_scale``: its guidance;
    default the run's). A run with an action policy (``robotics``) and no ``modality``
    evaluates the policy."""
    path = resolve_checkpoint(checkpoint_path)
    components = components or Components()
    loaded = load_for_sampling(path, components, device)
    kinds = {m.name: type(m.adapter) for m in loaded[1]}
    world = [n for n, k in kinds.items() if issubclass(k, RoboticsWorldModality)
             and modality in (None, n)]
    policies = [n for n, k in kinds.items() if issubclass(k, RoboticsModality)
                and modality in (None, n)]
    if world and not policies and kinds[world[0]].name == "robotics_language":
        from selfflow_robotics.language_eval import evaluate_language

        return evaluate_language(path, episodes=episodes, execute=execute, steps=steps,
                                 method=method, seed=seed, device=device, store=store,
                                 modality=world[0], components=components,
                                 condition_t=condition_t, cfg_scale=cfg_scale,
                                 verbose=verbose, loaded=loaded)
    if world and not policies:
        return evaluate_world(path, episodes=episodes, mse_episodes=mse_episodes,
                              execute=execute, steps=steps, method=method, seed=seed,
                              device=device, store=store, modality=world[0],
                              components=components, condition_t=condition_t,
                              verbose=verbose, loaded=loaded)
    t0 = time.perf_counter()
    policy = LearnedPolicy(path, components=components, device=device, modality=modality,
                           store=store, steps=steps, method=method, seed=seed, loaded=loaded)
    adapter, c = policy.adapter, policy.adapter.config
    task, norm, horizon = adapter.task, adapter.stats, adapter.horizon
    execute = execute or max(1, horizon // 2)
    if not 1 <= execute <= horizon:
        raise ValueError(f"execute must be in 1..{horizon} (the chunk length), got {execute}")

    # (1) action error on held-out states
    demos = collect(c.task, mse_episodes, seed=c.seed, split="heldout", horizon=horizon,
                    action_noise=c.action_noise)
    flat = demos.flat()
    target = norm.normalize_actions(flat["actions"].astype(np.float64))
    pred = policy.sample_normalized(flat["state"].astype(np.float64)).double().numpy()
    rand = random_policy(task, seed=seed, horizon=horizon)(flat["state"])
    results = {"policy": _mse(pred, target),
               "expert": {"action_mse": 0.0, "first_action_mse": 0.0},
               "random": _mse(norm.normalize_actions(rand), target)}

    # (2) closed loop
    seeds = [episode_seed(c.seed, "rollout", i) for i in range(episodes)]
    runs = {"policy": rollout(task, policy, seeds, execute=execute),
            "expert": rollout(task, expert_policy(task), seeds, execute=1),
            "random": rollout(task, random_policy(task, seed=seed), seeds, execute=1)}
    for name, run in runs.items():
        results[name].update(run.summary())
    results["settings"] = {
        "checkpoint": str(policy.path), "step": _step_of(policy.path), "task": task.env_id,
        "horizon": horizon, "execute": execute, "sampler_steps": policy.steps,
        "method": policy.method, "rollout_episodes": episodes,
        "heldout_episodes": mse_episodes, "heldout_states": int(len(target)),
        "success": f"final distance < {getattr(task, 'success_distance', float('nan'))}",
        "near": f"final distance < {getattr(task, 'near_distance', float('nan'))}",
        "normalization": policy.normalization_from, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2)}
    bad = [f"{k}.{m}" for k in ("policy", "expert", "random") for m, x in results[k].items()
           if not math.isfinite(x)]
    if bad:
        raise FloatingPointError(f"non-finite evaluation numbers: {bad}")
    if verbose:
        print(format_table(results))
    return results


def _step_of(path: Path) -> int | None:
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return int(digits) if digits else None


def format_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (f"{s['task']} | {s['checkpoint']} | chunk {s['horizon']}, execute {s['execute']}, "
            f"{s['method']} {s['sampler_steps']} steps | held-out states {s['heldout_states']} "
            f"({s['heldout_episodes']} episodes), rollouts {s['rollout_episodes']} | success: "
            f"{s['success']}, near: {s['near']}")
    cols = ("action MSE", "1st-action MSE", "success", "near", "mean return", "final dist")
    rows = [("policy (Self-Flow)", "policy"), ("expert", "expert"), ("random", "random")]
    lines = [head, f"{'':<20}" + "".join(f"{c:>15}" for c in cols)]
    for label, key in rows:
        r = results[key]
        cells = (f"{r['action_mse']:.4f}", f"{r['first_action_mse']:.4f}",
                 f"{100 * r['success_rate']:.1f}%", f"{100 * r['near_rate']:.1f}%",
                 f"{r['mean_return']:.2f} ± {r['std_return']:.2f}",
                 f"{r['mean_final_distance']:.4f}")
        lines.append(f"{label:<20}" + "".join(f"{c:>15}" for c in cells))
    lines.append("action MSE: normalised units (1 = half the 1..99 % range of a dim), vs the "
                 f"expert's chunks; normalisation: {s['normalization']}")
    return "\n".join(lines)


# ---- the world model ---------------------------------------------------------------------------

#: a world model as a plain function: current frames [n, size, size] -> (future frames
#: [n, F, size, size] in [-1, 1], action chunks [n, H, A] in simulator units)
WorldPredictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

#: PSNR of frames in [-1, 1] (peak-to-peak 2) is capped at this (a perfect prediction)
PSNR_CAP = 100.0


def psnr(mse: float) -> float:
    """``10 log10(2² / mse)`` dB for frames in ``[-1, 1]``, capped at :data:`PSNR_CAP`."""
    return float(min(PSNR_CAP, 10 * math.log10(4.0 / max(mse, 1e-30))))


class LearnedWorldModel:
    """A trained ``robotics_world`` run as a :data:`WorldPredictor`: current frames ->
    (generated future frames, generated action chunk in simulator units). :meth:`policy` is
    the same model as a closed-loop policy (raw states -> action chunks: it draws the current
    frame of each state and keeps the actions). ``condition_t``: the time the conditioning
    frame is fed at (default: the run's ``sampling.condition_t``)."""

    def __init__(self, checkpoint_path: str | Path, *, components: Components | None = None,
                 device: str = "cpu", modality: str | None = None, store: str | None = None,
                 steps: int | None = None, method: str | None = None,
                 condition_t: float | None = None, seed: int = 0, loaded=None) -> None:
        self.path = resolve_checkpoint(checkpoint_path)
        components = components or Components()
        self.config, self.runtime, self.model = _load(self.path, components, device, modality,
                                                      (RoboticsWorldModality,), loaded)
        self.adapter: RoboticsWorldModality = self.runtime.adapter
        self.device = torch.device(device)
        s = self.config.sampling
        self.steps = steps or s.steps
        self.method = method or s.method
        self.shift = s.shift
        self.condition_t = s.condition_t if condition_t is None else float(condition_t)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.normalization_from = _restore_normalization(
            self.adapter, self.runtime, self.config, self.path, components,
            store or self.runtime.spec.store)

    @torch.no_grad()
    def sample_normalized(self, frames: np.ndarray, batch_size: int = 512
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames [n, 1 + F, size, size], normalised actions [n, H, A])`` sampled for
        current frames [n, size, size] (returned first, as given)."""
        outs_f, outs_a = [], []
        frames = torch.from_numpy(np.array(frames, np.float32))
        for start in range(0, len(frames), batch_size):
            prompt = self.adapter.prompt(len(frames[start:start + batch_size]),
                                         {"frame": frames[start:start + batch_size]})
            prompt = prompt.to(self.device)
            prompt = attrs.evolve(prompt, modality_ids=prompt.modality_ids + self.runtime.id_offset)
            tokens = sample(self.model, prompt, steps=self.steps, method=self.method,
                            shift=self.shift, generator=self.generator,
                            condition_t=self.condition_t)
            f, a = self.adapter.split(tokens.float().cpu())
            outs_f.append(f)
            outs_a.append(a)
        return torch.cat(outs_f), torch.cat(outs_a)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, a = self.sample_normalized(frames)
        return f[:, 1:].numpy(), self.adapter.actions_to_env(a)

    def policy(self, states: np.ndarray) -> np.ndarray:
        """Raw states [n, S] -> raw action chunks [n, H, A] (from the states' frames)."""
        frames = self.adapter.task.render(np.asarray(states, np.float64), self.adapter.size)
        return self(frames)[1]


def _frame_errors(pred: np.ndarray, target: np.ndarray, prefix: str) -> dict[str, Any]:
    mse = float(np.mean((pred - target) ** 2))
    return {f"frame_mse_{prefix}": mse, f"psnr_{prefix}": psnr(mse),
            f"frame_mse_{prefix}_per_frame": [float(x) for x in
                                              np.mean((pred - target) ** 2, axis=(0, 2, 3))]}


def world_model_errors(task: Task, predictor: WorldPredictor, demos: Demonstrations, *,
                       future_frames: int, normalize_actions: Callable[[np.ndarray], np.ndarray]
                       ) -> dict[str, Any]:
    """Open-loop errors of ``predictor`` on every step of the (held-out) expert episodes
    ``demos`` (collected with frames and a ``horizon`` of the model's ``H``):

    - ``action_mse`` / ``first_action_mse``: the predicted chunk against the actions the
      expert executed, in normalised units (``normalize_actions``).
    - ``frame_mse_sim`` / ``psnr_sim`` (and ``_per_frame``): the predicted future frames against
      the frames the simulator draws after executing the *predicted* actions from the same
      state (:func:`execute_chunks`): does the model foresee the consequences of its own plan.
    - ``frame_mse_gt`` / ``psnr_gt`` (and ``_per_frame``): against the expert episode's own
      frames (video prediction error; the predicted actions differ from the expert's a little).

    Pixels are in ``[-1, 1]``; PSNR is ``10 log10(4 / MSE)`` dB (capped at 100)."""
    h, stride = demos.horizon, demos.horizon // future_frames
    e, t = np.divmod(np.arange(demos.episodes * demos.steps), demos.steps)
    ahead = stride * np.arange(1, future_frames + 1)
    current = np.asarray(demos.frames[e, t])
    gt_frames = np.asarray(demos.frames[e[:, None], t[:, None] + ahead[None]])
    gt_actions = np.asarray(demos.executed[e[:, None], t[:, None] + np.arange(h)[None]])
    frames, actions = predictor(current)
    frames, actions = np.asarray(frames, np.float64), np.asarray(actions, np.float64)
    if frames.shape != gt_frames.shape or actions.shape != gt_actions.shape:
        raise ValueError(f"predictor returned frames {frames.shape} and actions "
                         f"{actions.shape}; expected {gt_frames.shape} and {gt_actions.shape}")
    reached = execute_chunks(task, demos.trajectory[e, t], actions)
    sim_frames = task.render(reached[:, ahead], current.shape[-1])
    out: dict[str, Any] = _mse(normalize_actions(actions), normalize_actions(gt_actions))
    out.update(_frame_errors(frames, sim_frames, "sim"))
    out.update(_frame_errors(frames, gt_frames, "gt"))
    return out


def perfect_predictor(demos: Demonstrations, future_frames: int) -> WorldPredictor:
    """The expert episodes' own future frames and executed actions, for every step of
    ``demos`` in order (what :func:`world_model_errors` asks): zero error by construction."""
    h, stride = demos.horizon, demos.horizon // future_frames
    e, t = np.divmod(np.arange(demos.episodes * demos.steps), demos.steps)
    ahead = stride * np.arange(1, future_frames + 1)

    def predict(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(frames) != len(e):
            raise ValueError(f"perfect_predictor answers {len(e)} frames, got {len(frames)}")
        return (np.asarray(demos.frames[e[:, None], t[:, None] + ahead[None]]),
                np.asarray(demos.executed[e[:, None], t[:, None] + np.arange(h)[None]]))
    return predict


def still_predictor(demos: Demonstrations, future_frames: int) -> WorldPredictor:
    """The frame baseline: every future frame equals the current one (and the expert's
    executed actions)."""
    perfect = perfect_predictor(demos, future_frames)

    def predict(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, actions = perfect(frames)
        return np.repeat(np.asarray(frames)[:, None], future_frames, axis=1), actions
    return predict


def evaluate_world(checkpoint_path: str | Path, *, episodes: int = 50, mse_episodes: int = 10,
                   execute: int | None = None, steps: int | None = None,
                   method: str | None = None, seed: int = 0, device: str = "cpu",
                   store: str | None = None, modality: str | None = None,
                   components: Components | None = None, condition_t: float | None = None,
                   verbose: bool = True, loaded=None) -> dict[str, Any]:
    """Evaluate a ``robotics_world`` checkpoint: :func:`world_model_errors` on the held-out
    expert episodes (``mse_episodes``) and the closed loop (``episodes`` rollouts, the generated
    chunk's first ``execute`` actions executed, default ``H / 2``, then re-planned from the new
    current frame). Rows: ``policy`` (the world model), ``expert`` (its own frames and actions:
    frame errors 0 up to float rounding, and the expert's closed loop), ``still`` (future =
    current frame; frames only) and ``random`` (actions only). Frame numbers that do not apply
    are ``None``."""
    t0 = time.perf_counter()
    model = LearnedWorldModel(checkpoint_path, components=components, device=device,
                              modality=modality, store=store, steps=steps, method=method,
                              condition_t=condition_t, seed=seed, loaded=loaded)
    adapter, c = model.adapter, model.adapter.config
    task, norm, horizon = adapter.task, adapter.stats, adapter.horizon
    execute = execute or max(1, horizon // 2)
    if not 1 <= execute <= horizon:
        raise ValueError(f"execute must be in 1..{horizon} (the chunk length), got {execute}")

    # (1) open loop on held-out expert episodes: actions and frames
    demos = adapter.heldout_demonstrations(mse_episodes)
    f = adapter.future_frames
    errors = {"policy": model, "expert": perfect_predictor(demos, f),
              "still": still_predictor(demos, f)}
    results: dict[str, dict[str, Any]] = {
        name: world_model_errors(task, pred, demos, future_frames=f,
                                 normalize_actions=norm.normalize_actions)
        for name, pred in errors.items()}
    states = demos.trajectory[:, :demos.steps].reshape(-1, task.state_dim)
    gt = demos.executed[np.arange(demos.episodes)[:, None, None],
                        np.arange(demos.steps)[None, :, None] + np.arange(horizon)[None, None]]
    rand = random_policy(task, seed=seed, horizon=horizon)(states)
    results["random"] = _mse(norm.normalize_actions(rand),
                             norm.normalize_actions(gt.reshape(-1, horizon, task.action_dim)))
    for key in ("frame_mse_sim", "psnr_sim", "frame_mse_gt", "psnr_gt"):
        results["random"][key] = None
    for key in ("action_mse", "first_action_mse", "frame_mse_sim", "psnr_sim",
                "frame_mse_sim_per_frame"):
        results["still"][key] = None  # its actions are the expert's: only its frames count

    # (2) closed loop
    seeds = [episode_seed(c.seed, "rollout", i) for i in range(episodes)]
    runs = {"policy": rollout(task, model.policy, seeds, execute=execute),
            "expert": rollout(task, expert_policy(task), seeds, execute=1),
            "random": rollout(task, random_policy(task, seed=seed), seeds, execute=1)}
    for name, run in runs.items():
        results[name].update(run.summary())
    results["still"].update({k: None for k in runs["policy"].summary()})
    results["settings"] = {
        "kind": RoboticsWorldModality.Config.kind,
        "checkpoint": str(model.path), "step": _step_of(model.path), "task": task.env_id,
        "horizon": horizon, "future_frames": f, "frame_steps": adapter.frame_steps,
        "frame_size": adapter.size, "execute": execute, "sampler_steps": model.steps,
        "method": model.method, "shift": model.shift, "condition_t": model.condition_t,
        "rollout_episodes": episodes, "heldout_episodes": mse_episodes,
        "heldout_states": int(len(states)),
        "success": f"final distance < {getattr(task, 'success_distance', float('nan'))}",
        "near": f"final distance < {getattr(task, 'near_distance', float('nan'))}",
        "normalization": model.normalization_from, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2)}
    bad = [f"{k}.{m}" for k in ("policy", "expert", "still", "random")
           for m, x in results[k].items()
           if isinstance(x, float) and not math.isfinite(x)]
    if bad:
        raise FloatingPointError(f"non-finite evaluation numbers: {bad}")
    if verbose:
        print(format_world_table(results))
    return results


def format_world_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    head = (f"{s['task']} world model | {s['checkpoint']} | {s['frame_size']}x"
            f"{s['frame_size']} frames at steps {s['frame_steps']}, chunk {s['horizon']}, "
            f"execute {s['execute']}, {s['method']} {s['sampler_steps']} steps (shift "
            f"{s['shift']:g}, condition t {s['condition_t']:g}) | held-out states "
            f"{s['heldout_states']} ({s['heldout_episodes']} episodes), rollouts "
            f"{s['rollout_episodes']} | success: {s['success']}, near: {s['near']}")
    cols = ("action MSE", "frame MSE sim", "PSNR sim", "frame MSE gt", "PSNR gt", "success",
            "near", "mean return", "final dist")
    rows = [("world model", "policy"), ("expert", "expert"), ("still frame", "still"),
            ("random", "random")]

    def fmt(x, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    lines = [head, f"{'':<14}" + "".join(f"{c:>14}" for c in cols)]
    for label, key in rows:
        r = results[key]
        ret = ("–" if r["mean_return"] is None
               else f"{r['mean_return']:.2f} ± {r['std_return']:.2f}")
        cells = (fmt(r["action_mse"], ".4f"), fmt(r["frame_mse_sim"], ".5f"),
                 fmt(r["psnr_sim"], ".1f"), fmt(r["frame_mse_gt"], ".5f"),
                 fmt(r["psnr_gt"], ".1f"),
                 "–" if r["success_rate"] is None else f"{100 * r['success_rate']:.1f}%",
                 "–" if r["near_rate"] is None else f"{100 * r['near_rate']:.1f}%", ret,
                 fmt(r["mean_final_distance"], ".4f"))
        lines.append(f"{label:<14}" + "".join(f"{c:>14}" for c in cells))
    lines.append("frame MSE: pixels in [-1, 1]; sim = against the frames the simulator draws "
                 "after executing the generated actions, gt = against the held-out expert "
                 "episode's frames; PSNR = 10 log10(4 / MSE) dB. action MSE: normalised units, "
                 f"vs the expert's executed chunks; normalisation: {s['normalization']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="selfflow-robotics-eval",
        description="Evaluate a selfflow robotics policy or world model: action MSE against "
                    "the expert on held-out states (a world model: also the error of its "
                    "generated frames) and closed-loop success/return in the simulator, next "
                    "to the expert and a random policy.")
    p.add_argument("checkpoint", help="checkpoint file or run directory (latest checkpoint)")
    p.add_argument("--episodes", type=int, default=50, help="closed-loop episodes (50)")
    p.add_argument("--mse-episodes", type=int, default=10,
                   help="held-out expert episodes for the action MSE (10)")
    p.add_argument("--execute", type=int, default=None,
                   help="actions executed per chunk before re-planning (default: horizon / 2)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--method", choices=["euler", "heun"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", default=None,
                   help="training store holding the normalisation (default: the run's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--condition-t", type=float, default=None,
                   help="world model: the time the conditioning frame is fed at (default: the "
                        "run's sampling.condition_t)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="instruction-following world model: guidance against the empty "
                        "prompt (default: the run's sampling.cfg_scale)")
    p.add_argument("--modality", default=None,
                   help="the run's robotics modality to evaluate (default: its policy, else its "
                        "world model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is often fastest on a shared CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = evaluate(args.checkpoint, episodes=args.episodes,
                           mse_episodes=args.mse_episodes, execute=args.execute,
                           steps=args.steps, method=args.method, seed=args.seed,
                           device=args.device, store=args.store, modality=args.modality,
                           condition_t=args.condition_t, cfg_scale=args.cfg_scale)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
