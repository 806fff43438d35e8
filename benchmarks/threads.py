"""Training steps/s on a CPU against the number of torch threads (``TrainerConfig.threads``):
threads = 1, 2 and torch's default, on an idle machine and on a loaded one, each as a ratio to
threads = 1 measured beside it in the same run.

- **Workload:** the ``image`` preset (8x8 digits, a 6x96 DiT, batch 64) or its
  ``image_debug_tiny`` twin (``--preset``), its store encoded into a temporary folder, one
  ``Trainer`` per thread count (its ``threads`` set, no tracker), ``Trainer.train_step`` in a loop.
- **Method:** the variants take turns in ``--rounds`` rounds; in each round a variant gets its
  thread count back (torch's count is per process), one untimed step, then steps for
  ``--seconds`` (at least one); steps/s is the median over the rounds. Interleaving makes drift
  in the machine's speed hit every variant alike.
- **torch's default:** the count torch picks in a fresh process with ``OMP_NUM_THREADS`` and
  ``MKL_NUM_THREADS`` unset (asked of a subprocess), i.e. what a run got before ``threads``.
- **Load:** ``--load-only``/``--idle-only`` pick the conditions. The loaded one starts one
  CPU-burning subprocess (a busy Python loop) per core this process may use, stops them after,
  and records the load average seen. "Idle" means no load of ours: other users' jobs on a
  shared machine still run, and the load average recorded before each condition says how many.

    python benchmarks/threads.py [--preset image] [--rounds 3] [--seconds 4]

It takes about 3 minutes with the defaults and writes ``benchmarks/results/threads.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import attrs
import torch
from common import print_table, write_json

from selfflow_core import Components, NullTracker, Trainer
from selfflow_core.runtime.threads import available_cores, default_threads

BURN = "while True: pass"


def torch_default_threads() -> int:
    """torch's intra-op thread count in a fresh process without thread variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@contextmanager
def burning(count: int):
    """``count`` CPU-burning subprocesses for the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(count)]
    try:
        if procs:
            time.sleep(2.0)  # let them reach full speed
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def trainers(preset: str, tmp: str, counts: dict[str, int]) -> dict[str, Trainer]:
    components = Components()
    base = components.presets.get(preset)()
    (name, spec), = base.modalities.items()
    out = {}
    for label, n in counts.items():
        spec = attrs.evolve(spec, store=f"{tmp}/store.zarr",
                            source=spec.source if not out else "")  # the first encodes it
        config = attrs.evolve(base, modalities={name: spec}, steps=10**6, threads=n, device="cpu",
                              run_dir=f"{tmp}/run-{label}", tracker=NullTracker.Config())
        out[label] = Trainer(config, components=components, progress=False)
    return out


def measure(runs: dict[str, Trainer], *, rounds: int, seconds: float) -> dict[str, list[float]]:
    """Steps/s of each trainer per round, the trainers taking turns."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label, trainer in runs.items():
            torch.set_num_threads(trainer.threads)
            trainer.train_step()  # untimed: the thread pool resized, caches warm
            steps, t0 = 0, time.perf_counter()
            while steps == 0 or time.perf_counter() - t0 < seconds:
                trainer.train_step()
                steps += 1
            rates[label].append(steps / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="image", choices=["image", "image_debug_tiny"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--idle-only", action="store_true")
    group.add_argument("--load-only", action="store_true")
    args = ap.parse_args()
    cores, torch_default = available_cores(), torch_default_threads()
    counts = {"1": 1, "2": 2, f"torch default ({torch_default})": torch_default}
    auto = default_threads(cores=cores, current=torch_default)
    conditions = [c for c in ("idle", "loaded")
                  if not (args.idle_only and c == "loaded" or args.load_only and c == "idle")]
    print(f"preset {args.preset}, {cores} core(s) for this process, torch's default "
          f"{torch_default} thread(s), threads=None resolves to {auto}; "
          f"load: {cores} CPU-burning subprocess(es) (one per core)")
    record: dict = {"args": vars(args), "cores": cores, "torch_default_threads": torch_default,
                    "threads_none_resolves_to": auto, "load_processes": cores, "conditions": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = trainers(args.preset, tmp, counts)
        for condition in conditions:
            with burning(cores if condition == "loaded" else 0):
                before = os.getloadavg()[0]
                rates = measure(runs, rounds=args.rounds, seconds=args.seconds)
                after = os.getloadavg()[0]
            base = statistics.median(rates["1"])
            entry = {"load_average_before": before, "load_average_after": after, "variants": {}}
            for label, samples in rates.items():
                median = statistics.median(samples)
                entry["variants"][label] = {"threads": counts[label], "steps_per_s": median,
                                            "rounds": samples, "ratio_vs_1": median / base}
                rows.append([condition, f"{before:.1f} -> {after:.1f}", label, median,
                             median / base])
            record["conditions"][condition] = entry
    print_table(["machine", "load avg", "threads", "steps/s", "vs threads=1"], rows)
    write_json("threads", record)


if __name__ == "__main__":
    main()
