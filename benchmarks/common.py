"""Shared helpers for benchmarks: interleaved timing, a printed table, a JSON record."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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
