"""Shared helpers for benchmarks: interleaved timing, a printed table, a JSON record, and the
machinery of the training-run harnesses (``convergence.py``, ``prompt_tasks.py``): evaluation
points, runs in a process pool with a resumable partial file, and the aggregation over seeds
(mean ± std curves, steps to reach a target, gaps paired by seed)."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


#: the methods the convergence benchmarks compare, as configs of one trainer
METHODS = ("vanilla", "dts", "selfflow", "repa")
#: REPA with the label-free encoder: not a default method (its encoder is trained on first use)
LABEL_FREE = "repa_label_free"
REPA_METHODS = ("repa", LABEL_FREE)


def machine() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     inner: int) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating rounds so that drift in the
    machine's speed hits every variant alike. Returns all per-round means."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            out[name].append((time.perf_counter() - t0) / inner)
    return out


def summary(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "rounds": len(samples)}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(name: str, payload: dict, folder: Path = RESULTS) -> Path:
    """``folder/name.json`` with the machine's description first (written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def selfflow_step(net, teacher, scheduler, batch_fn: Callable[[], object], device,
                  *, autocast: bool = False) -> Callable[[], None]:
    """One Self-Flow optimizer step of ``net`` as a closure: a plan and a noise draw for the
    batch ``batch_fn()`` gives, the objective (student, ``teacher``'s target), backward, clip 1,
    AdamW, the teacher's update. Seeded: the same sequence in every process."""
    from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective

    torch.manual_seed(0)
    net = net.to(device)
    obj = SelfFlowObjective(ObjectiveConfig(), depth=net.depth, width=net.width).to(device)
    teacher.attach(net)
    opt = torch.optim.AdamW(list(net.parameters()) + list(obj.parameters()), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else None

    def step():
        batch = batch_fn()
        plan = scheduler.plan(batch, generator=gen)
        noise = torch.randn(batch.tokens.shape, generator=gen, device=device)
        if cast is not None:
            with cast:
                terms = obj(net, teacher, batch, plan, noise)
        else:
            terms = obj(net, teacher, batch, plan, noise)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        teacher.update(net, step=0)
    step.objective = obj
    return step


# ---- training-run harnesses: planned runs, a pool, a resumable partial file -------------------

def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evaluation points spread evenly over ``steps`` (the last one is ``steps``)."""
    return sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})


def run_jobs(jobs: dict[str, dict], todo: list[dict], run_one: Callable[[dict], dict],
             partial: Path, *, resume: bool, workers: int, evals_of: Callable[[dict], int],
             describe: Callable[[dict], str]) -> tuple[list[dict], int]:
    """Run ``todo`` (planned runs, each with a unique ``key`` into ``jobs``) in a spawn pool of
    ``workers`` processes (one: in this process), appending each finished result to ``partial``
    (JSON lines) as it comes. With ``resume``, a result already in ``partial`` whose key and
    number of evaluation points (``evals_of(job)``) match a planned run is taken as it is (its
    ``groups`` updated to this plan's) and the run is not repeated; without, an old ``partial``
    is deleted first. Returns (every result, the number of runs trained by this call)."""
    results: list[dict] = []
    if resume and partial.is_file():
        done = {}
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["key"], len(r["curve"]))] = r
        results = [done.pop((j["key"], evals_of(j))) for j in todo
                   if (j["key"], evals_of(j)) in done]
        for r in results:
            r["groups"] = jobs[r["key"]]["groups"]
        finished = {r["key"] for r in results}
        todo = [j for j in todo if j["key"] not in finished]
        print(f"resuming: {len(results)} runs already done ({partial})")
    elif partial.exists():
        partial.unlink()
    if not todo:
        return results, 0
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers))
            finished = pool.imap_unordered(run_one, todo)
        else:  # one at a time: in this process (no worker to start)
            finished = map(run_one, todo)
        log = stack.enter_context(partial.open("a"))
        for res in finished:
            log.write(json.dumps(res) + "\n")
            log.flush()
            results.append(res)
            print(f"  [{len(results)}/{len(jobs)}] {describe(res)}", flush=True)
    return results, len(todo)


# ---- aggregation over seeds -------------------------------------------------------------------

def mean_spread(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (``N - 1``; 0 for one value) of the finite values
    (NaN, NaN when there is none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def curve_mean(runs: list[dict], key: str) -> list[tuple[int, float, float]]:
    """``[(step, mean, std)]`` of ``key`` over the runs' curves, at every step any of them has."""
    steps = sorted({r["step"] for run in runs for r in run["curve"]})
    out = []
    for s in steps:
        m, sd = mean_spread([r[key] for run in runs for r in run["curve"]
                             if r["step"] == s and key in r])
        out.append((s, m, sd))
    return out


def steps_to_reach(curve: Sequence[Sequence[float]], target: float, *,
                   higher_is_better: bool = False) -> float | None:
    """First step where the (linearly interpolated) mean curve ``[(step, mean, ...)]`` reaches
    ``target``: at or below it for a lower-is-better metric (FD), at or above it with
    ``higher_is_better`` (an accuracy). None if it never does."""
    sign = -1.0 if higher_is_better else 1.0
    prev = None
    for s, m, *_ in curve:
        if sign * m <= sign * target:
            if prev is None or prev[1] == m:
                return float(s)
            s0, m0 = prev
            return s0 + (s - s0) * (m0 - target) / (m0 - m)
        prev = (s, m)
    return None


def paired_gaps(runs: list[dict], base: list[dict], value: Callable[[dict], float | None]
                ) -> tuple[float, float, int]:
    """``value(run) - value(base run of the same seed)`` over the seeds both have: mean, std
    (``N - 1``) and the number of pairs."""
    by_seed = {r["seed"]: value(r) for r in base}
    gaps = []
    for r in runs:
        a, b = value(r), by_seed.get(r["seed"])
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            gaps.append(a - b)
    m, sd = mean_spread(gaps)
    return m, sd, len(gaps)


def best_probe(row: dict) -> float:
    """The best block's linear-probe accuracy of an evaluation row."""
    return max(v for k, v in row.items() if k.startswith("probe_acc/"))


def variant_order(variant: str) -> tuple:
    """Sweep variants in a natural order: by their numbers, warm-up before no warm-up."""
    return ("no warm-up" in variant, [float(x) for x in re.findall(r"\d+(?:\.\d+)?", variant)])


def summarize_sweep(points: list[tuple[str, dict]], metrics: Sequence[str] = ("fd",)
                    ) -> list[dict]:
    """Per (variant, method): for each of ``metrics`` (keys of the evaluation rows) its final
    value (``final_<metric>``) and curve (``<metric>_curve``), and the best probe, mean ± std
    over seeds; and, where a variant holds vanilla and another method, their gap paired by seed
    (``<metric>_gap_vs_vanilla``: the method minus vanilla; ``paired_seeds`` pairs)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for variant, run in points:
        cells.setdefault((variant, run["method"]), []).append(run)
    out = []
    for (variant, method), runs in sorted(cells.items(),
                                          key=lambda kv: (variant_order(kv[0][0]), kv[0][1])):
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {"variant": variant, "method": method, "seeds": [r["seed"] for r in runs],
               "size": runs[0]["size"], "steps": runs[0]["steps"], "params": runs[0]["params"]}
        for k in metrics:
            row[f"final_{k}"] = mean_spread([r["curve"][-1].get(k) for r in runs])
        row["best_probe"] = mean_spread([best_probe(r["curve"][-1]) for r in runs])
        for k in metrics:
            row[f"{k}_curve"] = curve_mean(runs, k)
        if method != "vanilla" and (variant, "vanilla") in cells:
            for k in metrics:
                m, sd, n = paired_gaps(runs, cells[(variant, "vanilla")],
                                       lambda r, k=k: r["curve"][-1].get(k))
                row[f"{k}_gap_vs_vanilla"] = (m, sd)
            row["paired_seeds"] = n
        out.append(row)
    return out
