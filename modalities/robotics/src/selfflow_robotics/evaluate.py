"""Evaluating a trained action-chunk policy: held-out action error and closed-loop rollouts.

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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
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
from selfflow_robotics.sim import collect, episode_seed, expert_policy, random_policy, rollout


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory / its ``checkpoints`` folder (-> the latest)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for folder in (p / "checkpoints", p):
        if folder.is_dir() and (found := latest_checkpoint(folder)) is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (give a checkpoint file or a run directory)")


class LearnedPolicy:
    """A trained run's action-chunk sampler: raw states [n, S] -> raw action chunks [n, H, A]."""

    def __init__(self, checkpoint_path: str | Path, *, components: Components | None = None,
                 device: str = "cpu", modality: str | None = None, store: str | None = None,
                 steps: int | None = None, method: str | None = None, seed: int = 0) -> None:
        self.path = resolve_checkpoint(checkpoint_path)
        components = components or Components()
        self.config, runtimes, self.model = load_for_sampling(self.path, components, device)
        robotic = [m for m in runtimes if isinstance(m.adapter, RoboticsModality)
                   and (modality is None or m.name == modality)]
        if not robotic:
            raise ValueError(f"{self.path}: the run has no robotics modality"
                             + (f" named {modality!r}" if modality else "")
                             + f" (modalities: {[m.name for m in runtimes]})")
        self.runtime = robotic[0]
        self.adapter: RoboticsModality = self.runtime.adapter
        self.device = torch.device(device)
        self.steps = steps or self.config.sampling.steps
        self.method = method or self.config.sampling.method
        self.shift = self.config.sampling.shift
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.normalization_from = self._restore_normalization(
            components, store or self.runtime.spec.store)

    def _restore_normalization(self, components: Components, store: str) -> str:
        """Use the statistics recorded in the training store when it is found and was written
        for this modality config; otherwise recompute them (the demonstrations are
        deterministic given the config, so the numbers are the same)."""
        wanted = to_data(make_converter(components), self.runtime.spec.modality)
        candidates = [Path(store).expanduser()]
        run_dir = Path(self.config.run_dir)
        if not run_dir.is_absolute() and "://" not in store and not Path(store).is_absolute():
            # the store path is relative to where training ran: the run dir's base
            candidates.append(self.path.parents[1].joinpath(*[".."] * len(run_dir.parts)) / store)
        for path in candidates:
            try:
                found = open_store(path, adapter=self.adapter)
            except StoreError:
                continue
            if found.schema.get("adapter_config") == wanted:
                self.adapter.set_normalization(found.schema["normalization"])
                return f"store {path}"
        _ = self.adapter.stats
        return "recomputed from the training demonstrations (store not found)"

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
             verbose: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (see the module doc); prints a table when ``verbose`` and returns
    ``{"policy": {...}, "expert": {...}, "random": {...}, "settings": {...}}`` where each
    policy has ``action_mse``, ``first_action_mse``, ``success_rate``, ``near_rate``,
    ``mean_return``, ``std_return`` and ``mean_final_distance``."""
    t0 = time.perf_counter()
    policy = LearnedPolicy(checkpoint_path, components=components, device=device,
                           modality=modality, store=store, steps=steps, method=method, seed=seed)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="selfflow-robotics-eval",
        description="Evaluate a selfflow robotics policy: action MSE against the expert on "
                    "held-out states and closed-loop success/return in the simulator, next to "
                    "the expert and a random policy.")
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is often fastest on a shared CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = evaluate(args.checkpoint, episodes=args.episodes,
                           mse_episodes=args.mse_episodes, execute=args.execute,
                           steps=args.steps, method=args.method, seed=args.seed,
                           device=args.device, store=args.store)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
