"""Loader throughput: random shuffled batches from latent stores vs. a NumPy memmap baseline.

Data: 20 000 float16 latents of shape (4, 32, 32) (8 KiB each, 156 MiB) plus int64 labels,
written once per layout to a temporary directory (warm page cache). For each layout:

- ``read cached`` / ``read uncached``: ``LatentStore.read`` of 256 random indices, with the
  in-memory cache (what ``open_store`` does by default for stores up to 2 GiB) / straight from
  zarr (one sorted ``oindex`` per field; the store opened with ``cache_bytes=0``);
- ``pipeline cached`` / ``pipeline uncached``: the whole ``build_loader`` pipeline (sampler,
  read, tensors, tokenize, 2 thread workers, prefetch 2) over the same two stores;
- the baseline: the same random batches gathered from ``np.load(mmap_mode="r")`` arrays, both
  as a bare read and through the same pipeline. Percentages are relative to it.

Then the default pipeline on digit-like data (60 000 float32 latents of 1x8x8, the default
training config's data) against what that training consumes. Run:
``python benchmarks/loader.py`` (about 90 s on 2 cores); writes
``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.store import StoreWriter, open_store
from selfflow_core.types import TokenBatch

BATCH = 256
#: assumed consumption of the default training config (digits, 1x8x8 latents); see RESULTS.md
TRAINING_SAMPLES_PER_S = 200
LAYOUTS = [  # (chunk samples of the latents field or None for the default, compressor)
    (None, "none"), (16, "none"), (256, "none"), (64, "zstd"), (64, "blosc-lz4"),
]


def tokenize(fields: dict[str, torch.Tensor]) -> TokenBatch:
    """Latents [B, C, H, W] -> tokens [B, H*W, C] (one token per latent pixel)."""
    x = fields["latents"].float().flatten(2).transpose(1, 2)
    return TokenBatch.single(x, torch.zeros(x.shape[0], x.shape[1], 2), labels=fields["labels"])


def write_store(path: Path, latents: np.ndarray, labels: np.ndarray, chunks: int | None,
                compressor: str) -> float:
    """Write the arrays as a store; returns seconds."""
    schema = {"format_version": 1, "modality": "bench", "config_hash": "bench",
              "fields": {"latents": {"shape": list(latents.shape[1:]), "dtype": str(latents.dtype)},
                         "labels": {"shape": [], "dtype": "int64"}}}
    start = time.perf_counter()
    with StoreWriter(path, schema, chunks={"latents": chunks} if chunks else None,
                     compressor=compressor) as w:
        for a in range(0, len(latents), 2048):
            w.append({"latents": latents[a:a + 2048], "labels": labels[a:a + 2048]})
        w.finish()
    return time.perf_counter() - start


class MemmapStore:
    """The baseline as a store: the same read interface over NumPy memmaps (no checks, no cache)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays, self.path = arrays, "memmap"

    def __len__(self) -> int:
        return len(self.arrays["labels"])

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: a[indices] for k, a in self.arrays.items()}  # one NumPy gather per field


def rates(fns: dict[str, Callable[[], object]], seconds: float, trials: int = 5) -> dict[str, int]:
    """Samples/s of each ``fn()`` (one batch per call), measured in interleaved short trials
    (``seconds`` per function in all) and reported as medians, so that the load of a shared
    machine hits every contender alike."""
    for fn in fns.values():
        fn()  # warm up (and, for cached stores, load)
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            start, n = time.perf_counter(), 0
            while n < 2 or time.perf_counter() - start < seconds / trials:
                fn()
                n += 1
            runs[name].append(n * BATCH / (time.perf_counter() - start))
    return {k: round(float(np.median(v))) for k, v in runs.items()}


def pipeline(store) -> Callable[[], object]:
    """Next batch of the full loader: sampler, read, tensors, tokenize, 2 threads, prefetch 2."""
    loader = build_loader([LoaderSource(store=store, tokenize=tokenize, batch_size=BATCH)],
                          seed=0, num_workers=2, prefetch=2)
    it = iter(loader)
    return lambda: next(it)


def random_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda: rng.choice(n, BATCH, replace=False)


def measure_layout(path: Path, baseline: MemmapStore, chunks: int | None, compressor: str,
                   write_s: float, seconds: float) -> dict:
    """One table row: write/load cost, then reads and pipelines beside the memmap baseline."""
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    uncached, cached = open_store(path, cache_bytes=0), open_store(path)
    start = time.perf_counter()
    cached.load()
    load_s = time.perf_counter() - start
    pick = random_batches(len(cached))
    read = rates({"memmap": lambda: baseline.read(pick()), "cached": lambda: cached.read(pick()),
                  "uncached": lambda: uncached.read(pick())}, seconds)
    pipe = rates({"memmap": pipeline(baseline), "cached": pipeline(cached),
                  "uncached": pipeline(uncached)}, seconds)
    return {
        "latents_chunk": int(zarr.open_array(str(path / "latents"), mode="r").chunks[0]),
        "default_layout": chunks is None, "compressor": compressor, "write_s": round(write_s, 2),
        "disk_mib": round(disk / 2**20, 1), "cache_load_s": round(load_s, 3),
        "read": read, "pipeline": pipe,
        "read_cached_vs_memmap": round(read["cached"] / read["memmap"], 3),
        "read_uncached_vs_memmap": round(read["uncached"] / read["memmap"], 4),
        "pipeline_cached_vs_memmap": round(pipe["cached"] / pipe["memmap"], 3),
        "pipeline_uncached_vs_memmap": round(pipe["uncached"] / pipe["memmap"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=1.2,
                        help="measuring time per contender and table cell")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.samples, 4, 32, 32), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 10, args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/latents.npy", latents)
        np.save(f"{tmp}/labels.npy", labels)
        baseline = MemmapStore({k: np.load(f"{tmp}/{k}.npy", mmap_mode="r")
                                for k in ("latents", "labels")})
        for a in baseline.arrays.values():  # map every page once, as a long training run would
            np.asarray(a).sum()
        for chunks, compressor in LAYOUTS:
            path = Path(tmp) / f"{chunks}-{compressor}.zarr"
            write_s = write_store(path, latents, labels, chunks, compressor)
            os.sync()  # so that write-back does not compete with the measurement
            rows.append(measure_layout(path, baseline, chunks, compressor, write_s, args.seconds))
            print(rows[-1], flush=True)
    # the default training config's data: digit latents 1x8x8 float32
    digits = rng.standard_normal((60_000, 1, 8, 8), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        write_store(Path(tmp) / "digits.zarr", digits, rng.integers(0, 10, 60_000), None, "none")
        digits_rates = rates({"cached": pipeline(open_store(Path(tmp) / "digits.zarr")),
                              "uncached": pipeline(open_store(Path(tmp) / "digits.zarr",
                                                              cache_bytes=0))}, args.seconds)
    load = os.getloadavg()[0]
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cores (shared; load average {load:.1f} at the end), Python "
        f"{platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}",
        "samples": args.samples, "sample_shape": [4, 32, 32], "dtype": "float16",
        "batch": BATCH, "layouts": rows,
        "digits_1x8x8": {"samples": 60_000, "pipeline": digits_rates,
                         "assumed_training_samples_per_s": TRAINING_SAMPLES_PER_S,
                         "cached_ratio": round(digits_rates["cached"] / TRAINING_SAMPLES_PER_S),
                         "uncached_ratio": round(digits_rates["uncached"]
                                                 / TRAINING_SAMPLES_PER_S)},
    }
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def print_table(r: dict) -> None:
    print("\nsamples/s (% of the memmap baseline measured beside it)\n")
    print("| latents chunk | codec | write s | disk MiB | cache load s | memmap read | read cached "
          "(default) | read uncached | memmap pipeline | pipeline cached (default) "
          "| pipeline uncached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["layouts"]:
        chunk = f"{x['latents_chunk']}{' (default)' if x['default_layout'] else ''}"
        rd, pp = x["read"], x["pipeline"]
        print(f"| {chunk} | {x['compressor']} | {x['write_s']} | {x['disk_mib']} "
              f"| {x['cache_load_s']} | {rd['memmap']:,} "
              f"| {rd['cached']:,} ({x['read_cached_vs_memmap']:.0%}) "
              f"| {rd['uncached']:,} ({x['read_uncached_vs_memmap']:.1%}) | {pp['memmap']:,} "
              f"| {pp['cached']:,} ({x['pipeline_cached_vs_memmap']:.0%}) "
              f"| {pp['uncached']:,} ({x['pipeline_uncached_vs_memmap']:.1%}) |")
    d = r["digits_1x8x8"]
    print(f"\ndigits 1x8x8 (60k samples, default layout): pipeline cached "
          f"{d['pipeline']['cached']:,} samples/s = {d['cached_ratio']}x, uncached "
          f"{d['pipeline']['uncached']:,} = {d['uncached_ratio']}x the assumed "
          f"{d['assumed_training_samples_per_s']} samples/s of training")


if __name__ == "__main__":
    main()
