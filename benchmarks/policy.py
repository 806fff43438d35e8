"""Robotics: vanilla flow matching, DTS alone and Self-Flow as action-chunk policies for Reacher,
scored by the modality's own metrics (held-out action error, closed-loop success), several seeds.

Every run is the ``robotics`` preset (``selfflow_robotics.presets.default``: 200 scripted-expert
episodes, a 4x96 DiT, cosine LR) changed in two places only: the method (scheduler and teacher)
and an evaluation EMA of decay ``--eval-ema`` for *every* method, so that all policies are
sampled from the same kind of weights (without it Self-Flow's policy would be its EMA teacher and
vanilla's the raw student). Each trained run is evaluated by :func:`selfflow_robotics.evaluate`:
action MSE on held-out expert states (normalised units) and ``--episodes`` rollouts (success:
final fingertip distance < 2 cm), next to the scripted expert (100 %) and a random policy (0 %).

    python benchmarks/policy.py                      # 3 methods x 3 seeds, 1000 steps
    python benchmarks/policy.py --steps 2000 --seeds 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_json

METHODS = ("vanilla", "dts", "selfflow")
METRICS = ("success_rate", "near_rate", "action_mse", "first_action_mse", "mean_return")


def make_config(method: str, seed: int, args, run_dir: str, store: str):
    import attrs
    from selfflow_robotics.presets import default

    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.config.run import CheckpointConfig
    from selfflow_core.teachers import NoTeacher
    from selfflow_core.timesteps import SingleTimestep

    base = default()
    spec = base.modalities["robotics"]
    if method == "vanilla":
        spec = attrs.evolve(spec, scheduler=SingleTimestep.Config(
            distribution=spec.scheduler.distribution))
    if method != "selfflow":
        base = attrs.evolve(base, teacher=NoTeacher.Config())
    spec = attrs.evolve(spec, store=store, modality=attrs.evolve(
        spec.modality, episodes=args.episodes_train))
    return attrs.evolve(
        base, modalities={"robotics": spec}, steps=args.steps, seed=seed, run_dir=run_dir,
        eval_ema_decay=args.eval_ema, eval_ema_warmup=False,  # as the recorded results were
        tracker=NullTracker.Config(), log_every=10 ** 9,
        checkpoint=CheckpointConfig(every=10 ** 9, keep=1))


def run_one(job: dict) -> dict:
    try:
        return _run_one(job)
    except Exception:  # noqa: BLE001 - a plain message crosses the process boundary intact
        import traceback
        raise RuntimeError(f"run {job['method']} seed {job['seed']} failed:\n"
                           f"{traceback.format_exc()}") from None


def _run_one(job: dict) -> dict:
    import attrs
    import torch

    torch.set_num_threads(1)
    from selfflow_robotics.evaluate import evaluate

    from selfflow_core.trainer import Trainer

    args = argparse.Namespace(**job["args"])
    t0 = time.perf_counter()
    config = make_config(job["method"], job["seed"], args, job["run_dir"], job["store"])
    # the store was encoded once before the runs: parallel runs only read it (no encode, no
    # writer's lock)
    config = attrs.evolve(config, modalities={k: attrs.evolve(v, source="")
                                              for k, v in config.modalities.items()})
    summary = Trainer(config, progress=False).fit()
    train_s = time.perf_counter() - t0
    result = evaluate(job["run_dir"], episodes=args.episodes, mse_episodes=args.mse_episodes,
                      verbose=False)
    return {"method": job["method"], "seed": job["seed"], "train_s": train_s,
            "eval_s": time.perf_counter() - t0 - train_s, "final_loss": summary["final_loss"],
            **{k: result["policy"][k] for k in METRICS},
            "expert": {k: result["expert"].get(k) for k in METRICS},
            "random": {k: result["random"].get(k) for k in METRICS},
            "settings": result["settings"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> dict:
    out = {}
    for m in METHODS:
        runs = [r for r in results if r["method"] == m]
        if runs:
            out[m] = {"seeds": len(runs), **{k: mean_std([r[k] for r in runs]) for k in METRICS}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--episodes-train", type=int, default=200, help="expert episodes to learn")
    ap.add_argument("--episodes", type=int, default=50, help="closed-loop rollouts per run")
    ap.add_argument("--mse-episodes", type=int, default=10, help="held-out expert episodes")
    ap.add_argument("--eval-ema", type=float, default=0.995,
                    help="evaluation EMA decay of every method (the policy's weights)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "selfflow-policy"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="policy")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / f"reacher-{args.episodes_train}.zarr")
    # the store is written once, before the parallel runs (each run would otherwise encode it)
    make = make_config("vanilla", 0, args, str(work / "encode"), store)
    from selfflow_core.config.converter import make_converter, to_data
    from selfflow_core.data.writer import encode_store
    from selfflow_core.plugins.manager import Components
    from selfflow_core.runtime.assembly import build_modalities

    spec = make.modalities["robotics"]
    encode_store(build_modalities(make)[0].adapter, spec.source, store, progress=False,
                 adapter_config=to_data(make_converter(Components()), spec.modality))
    jobs = [{"method": m, "seed": s, "args": vars(args), "store": store,
             "run_dir": str(work / f"{m}-{s}-{args.steps}")} for s in range(args.seeds)
            for m in methods]
    results = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            results.append(r)
            print(f"  [{len(results)}/{len(jobs)}] {r['method']:8s} seed {r['seed']}: success "
                  f"{r['success_rate']:.2f}, action MSE {r['action_mse']:.4f} (train "
                  f"{r['train_s']:.0f}s, eval {r['eval_s']:.0f}s)", flush=True)
    results.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    summary = summarize(results)
    ref = results[0]
    print(f"\nReacher, {args.steps} steps, {args.seeds} seeds (mean ± std), {args.episodes} "
          f"rollouts per run; expert success {ref['expert']['success_rate']:.2f}, random "
          f"{ref['random']['success_rate']:.2f}")
    print_table(["method", "success (< 2 cm)", "near (< 5 cm)", "action MSE",
                 "first-action MSE", "return"], [
        [m] + [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in METRICS] for m, s in summary.items()])
    payload = {"args": vars(args), "summary": summary, "runs": results,
               "wall_s": time.perf_counter() - t0}
    write_json(args.name, payload, folder=Path(args.out))
    return payload


if __name__ == "__main__":
    main()
