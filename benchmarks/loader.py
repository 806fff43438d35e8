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
training config's data) against what that training consumes.

Then, for stores larger than RAM (simulated: every zarr store here is opened with
``cache_bytes=0``, so nothing is cached in RAM; the OS page cache is warm, as for the memmap),
on the default layout: the block shuffle (``ShuffleConfig(kind="block")``, default sizes) vs the
full shuffle's random reads vs the memmap gather, as a bare read and through the pipeline; and
how well each order mixes a store sorted by label (computed from the sample order alone).

Then object storage (``s3://``) beside local disk: a store of ``--object-samples`` samples
(default 4096) written to and read from moto's S3 server, started on 127.0.0.1 in this process
(latency-bound, a local server), through obstore (what ``s3://`` URLs use) and, if s3fs is
installed, zarr's FsspecStore over s3fs: write, open, cache load, uncached random batches bare
and through the pipeline (full and block shuffle).

Then sharded stores (``--part shards``, into ``benchmarks/results/loader_shards.json``; not in
``all``): the same data unsharded and in shards of 64 and 256 chunks (32 and 128 MiB, the
latter what ``shards="auto"`` picks), all uncached: the block shuffle's bare reads (the direct
reads of chunk files, or of inner chunks found by the shard index; and, for the 256-chunk
shards, through zarr instead) and the full shuffle's random batches; then the pre-check of a
larger store (``--check-samples``, default 65 536 samples, 512 MiB), full against sampled
(``check_store(fraction=...)``), unsharded and sharded.

Run: ``python benchmarks/loader.py`` (about 5 minutes on 2 loaded cores) writes
``benchmarks/results/loader.json``; ``--part layouts`` / ``--part block`` / ``--part object``
runs one part (the block part in about 1.5 minutes, into
``benchmarks/results/loader_block.json``; the object part in about 2 minutes, into
``benchmarks/results/loader_object.json``: it needs moto, from the ``test`` extra, and obstore,
from the ``s3`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import numpy as np
import torch
import zarr

from selfflow_core.data.block_reader import ChunkFiles
from selfflow_core.data.blocks import BlockPlan, ShuffleConfig
from selfflow_core.data.loader import LoaderSource, _Shards, build_loader
from selfflow_core.data.store import check_store, open_store
from selfflow_core.data.writer import StoreWriter
from selfflow_core.types import TokenBatch

BATCH = 256
#: assumed consumption of the default training config (digits, 1x8x8 latents); see RESULTS.md
TRAINING_SAMPLES_PER_S = 200
#: the block-shuffle rows: the default, and blocks of 4 chunks in windows of the same bytes
BLOCKS = {"block": ShuffleConfig(kind="block"),
          "block4": ShuffleConfig(kind="block", block_chunks=4, window_blocks=64)}
LAYOUTS = [  # (chunk samples of the latents field or None for the default, compressor)
    (None, "none"), (16, "none"), (256, "none"), (64, "zstd"), (64, "blosc-lz4"),
]


def tokenize(fields: dict[str, torch.Tensor]) -> TokenBatch:
    """Latents [B, C, H, W] -> tokens [B, H*W, C] (one token per latent pixel)."""
    x = fields["latents"].float().flatten(2).transpose(1, 2)
    return TokenBatch.single(x, torch.zeros(x.shape[0], x.shape[1], 2), labels=fields["labels"])


def write_store(path: Path, latents: np.ndarray, labels: np.ndarray, chunks: int | None,
                compressor: str, shards: int | None = None) -> float:
    """Write the arrays as a store (``shards``: samples per shard of the latents); returns
    seconds."""
    schema = {"format_version": 1, "modality": "bench", "config_hash": "bench",
              "fields": {"latents": {"shape": list(latents.shape[1:]), "dtype": str(latents.dtype)},
                         "labels": {"shape": [], "dtype": "int64"}}}
    start = time.perf_counter()
    with StoreWriter(path, schema, chunks={"latents": chunks} if chunks else None,
                     compressor=compressor, shards={"latents": shards} if shards else None) as w:
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


def pipeline(store, shuffle: ShuffleConfig | None = None) -> Callable[[], object]:
    """Next batch of the full loader: sampler, read, tensors, tokenize, 2 threads, prefetch 2."""
    loader = build_loader([LoaderSource(store=store, tokenize=tokenize, batch_size=BATCH)],
                          seed=0, num_workers=2, prefetch=2, shuffle=shuffle)
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


def lag1(order: np.ndarray, batch: int, classes: int, samples: int) -> float:
    """Lag-1 autocorrelation of consecutive batches' mean label, on a store sorted by label."""
    labels = order * classes // samples
    means = labels[: len(labels) // batch * batch].reshape(-1, batch).mean(1)
    means = means - means.mean()
    return float((means[1:] * means[:-1]).sum() / (means * means).sum())


def batch_variance(order: np.ndarray, batch: int, classes: int, samples: int) -> float:
    """Variance of the batches' mean label over what independent random batches give."""
    labels = order * classes // samples
    means = labels[: len(labels) // batch * batch].reshape(-1, batch).mean(1)
    return float(means.var() / (labels.var() / batch))


def mixing(samples: int, chunk: int, classes: int = 10) -> dict:
    """How each order mixes one epoch of a store of ``samples`` sorted by label (``classes``
    equal runs), chunks of ``chunk`` samples: per batch size, the lag-1 autocorrelation of batch
    mean labels (0: independent batches, 1: each like the one before) and the batch-mean
    variance over the full shuffle's (1: as random as independent batches), and what the window
    size predicts for each block shuffle of :data:`BLOCKS`."""
    out = {"samples": samples, "chunk": chunk, "classes": classes,
           "blocks": {k: attrs.asdict(c) for k, c in BLOCKS.items()}, "by_batch": {}}
    for batch in (64, 256):
        steps = samples // batch
        shards = _Shards(samples, batch, 0, 0, 0, 1)
        orders = {"full": np.concatenate([shards.batch(k) for k in range(steps)]),
                  "sequential": np.arange(samples)}
        predicted = {}
        for name, config in BLOCKS.items():
            block = chunk * config.block_chunks
            plan = BlockPlan(samples, batch, block, config.window_blocks, 0, 0, 0, 1)
            orders[name] = np.concatenate([plan.batch(k) for k in range(steps)])
            w, nb = config.window_blocks, -(-samples // block)
            shared = (1 - (w - 1) / (nb - 1)) / w
            own = (1 - batch / (w * block)) / batch
            predicted[name] = {"lag1": round(shared / (shared + own), 3),
                               "variance": round((shared + own) * batch, 2)}
        out["by_batch"][batch] = {
            "lag1": {k: round(lag1(o, batch, classes, samples), 3) for k, o in orders.items()},
            "variance_vs_random": {k: round(batch_variance(o, batch, classes, samples), 2)
                                   for k, o in orders.items()},
            "predicted": predicted}
    return out


def measure_block(path: Path, baseline: MemmapStore, seconds: float) -> dict:
    """Block shuffles vs full-shuffle random reads vs the memmap gather, all uncached (the zarr
    store opened with ``cache_bytes=0``, as a store larger than RAM is read), bare and through
    the pipeline."""
    store = open_store(path, cache_bytes=0)
    pick = random_batches(len(store))
    bare, read_fns, pipe_fns = {}, {}, {}
    for name, config in BLOCKS.items():
        bare[name] = build_loader([LoaderSource(store=store, tokenize=tokenize,
                                                batch_size=BATCH)], seed=0, shuffle=config)
        reader, plan, number = bare[name].sources[0].store, bare[name].shards[0], itertools.count()
        read_fns[name] = lambda r=reader, p=plan, n=number: r.read(p.batch(next(n)))
        pipe_fns[name] = pipeline(store, config)
    read = rates({"memmap": lambda: baseline.read(pick()), "full": lambda: store.read(pick()),
                  **read_fns}, seconds)
    # the full shuffle's pipeline apart: while the next contender is measured, its threads
    # still refill the prefetch queue with batches costing ~0.1 s each, which would slow that one
    memmap = pipeline(baseline)
    pipe = rates({"memmap": memmap, **pipe_fns}, seconds)
    beside_full = rates({"memmap": memmap, "full": pipeline(store)}, seconds / 2)
    sample_bytes = sum(v.nbytes for v in store.read([0]).values())
    # one 0.5 MiB latents chunk: a zarr slice (the store's own read) vs its file read straight
    files, arr = ChunkFiles.of(store._arrays["latents"]), store._arrays["latents"]
    assert files is not None
    chunk, step = np.empty(files.shape, files.dtype), arr.chunks[0]
    ks = np.random.default_rng(0).permutation(len(store) // step)[:64].tolist()
    per_chunk = {}
    for name, fn in (("zarr", lambda k: store._get("latents", slice(k * step, (k + 1) * step),
                                                   range(0))),
                     ("direct", lambda k: files._read(k, chunk))):
        runs = []
        for _ in range(5):
            cpu, wall = time.process_time(), time.perf_counter()
            for k in ks:
                fn(k)
            runs.append(((time.process_time() - cpu) / len(ks) * 1e3,
                         (time.perf_counter() - wall) / len(ks) * 1e3))
        per_chunk[name] = {"cpu_ms": round(float(np.median([r[0] for r in runs])), 3),
                           "wall_ms": round(float(np.median([r[1] for r in runs])), 3)}
    return {
        "chunk_read": per_chunk,
        "configs": {name: {
            **attrs.asdict(BLOCKS[name]), "block_samples": b.blocks[0],
            "window_mib": round(BLOCKS[name].window_blocks * b.blocks[0] * sample_bytes / 2**20,
                                1),
            "most_blocks_held": b.sources[0].store.most_held,
            "blocks_read": b.sources[0].store.blocks_read} for name, b in bare.items()},
        "read": read, "pipeline": {**pipe, "full": beside_full["full"]},
        "pipeline_memmap_beside_full": beside_full["memmap"],
        "read_vs_memmap": {k: round(v / read["memmap"], 4) for k, v in read.items()},
        "pipeline_vs_memmap": {**{k: round(v / pipe["memmap"], 4) for k, v in pipe.items()},
                               "full": round(beside_full["full"] / beside_full["memmap"], 4)},
    }


#: the sharded rows: latents shards of 64 and of 256 chunks of 64 samples (32 and 128 MiB)
SHARDS = {"unsharded": None, "shards64": 64 * 64, "shards256": 256 * 64}
#: the shares of chunks the sampled pre-check reads
FRACTIONS = (1.0, 0.1, 0.01)


def measure_shards(tmp: Path, latents: np.ndarray, labels: np.ndarray, seconds: float,
                   check_samples: int) -> dict:
    """Unsharded against sharded, all uncached, in the same run: the block shuffle's bare reads
    (default sizes) and the full shuffle's random batches; then the pre-check of a larger store,
    full and sampled."""
    stores, layout = {}, {}
    for name, shards in SHARDS.items():
        path = tmp / f"{name}.zarr"
        write_s = write_store(path, latents, labels, None, "none", shards)
        os.sync()
        stores[name] = open_store(path, cache_bytes=0)
        layout[name] = {"shard_samples": shards, "write_s": round(write_s, 2),
                        "latents_files": sum(1 for f in (path / "latents" / "c").rglob("*")
                                             if f.is_file())}
    pick = random_batches(len(latents))
    block_fns, held = {}, {}
    for name, store in stores.items():
        loader = build_loader([LoaderSource(store=store, tokenize=tokenize, batch_size=BATCH)],
                              seed=0, shuffle=BLOCKS["block"])
        reader, plan, number = loader.sources[0].store, loader.shards[0], itertools.count()
        assert "latents" in reader._files  # read straight from the files
        block_fns[name] = lambda r=reader, p=plan, n=number: r.read(p.batch(next(n)))
        held[name] = reader
    # the 256-chunk shards through zarr (no direct reads): what the shard index reads save
    loader = build_loader([LoaderSource(store=stores["shards256"], tokenize=tokenize,
                                        batch_size=BATCH)], seed=0, shuffle=BLOCKS["block"])
    reader, plan, number = loader.sources[0].store, loader.shards[0], itertools.count()
    reader._files = {}
    block_fns["shards256_zarr"] = lambda r=reader, p=plan, n=number: r.read(p.batch(next(n)))
    block = rates(block_fns, seconds)
    random = rates({name: lambda s=store: s.read(pick()) for name, store in stores.items()},
                   seconds)
    del held, stores, block_fns
    # the pre-check of a larger store: the data repeated, unsharded and in 256-chunk shards
    big = np.concatenate([latents] * -(-check_samples // len(latents)))[:check_samples]
    big_labels = np.resize(labels, check_samples)
    checks = {}
    for name in ("unsharded", "shards256"):
        path = tmp / f"check-{name}.zarr"
        write_store(path, big, big_labels, None, "none", SHARDS[name])
        os.sync()
        times = {}
        for fraction in FRACTIONS:
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                assert check_store(path, fraction=fraction) == []
                runs.append(time.perf_counter() - start)
            times[str(fraction)] = round(float(np.median(runs)), 3)
        checks[name] = times
    return {"layout": layout, "block_read": block, "random_read": random,
            "block_vs_unsharded": {k: round(v / block["unsharded"], 3) for k, v in block.items()},
            "random_vs_unsharded": {k: round(v / random["unsharded"], 3)
                                    for k, v in random.items()},
            "check": {"samples": check_samples,
                      "mib": round(big.nbytes / 2**20), "seconds": checks}}


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with the bucket ``bench``, and this process's
    environment pointing at it (restored after); yields its endpoint."""
    import logging
    import socket
    import urllib.request

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT")).close()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def measure_object(tmp: Path, latents: np.ndarray, labels: np.ndarray, seconds: float) -> dict:
    """Object storage (``s3://``) against a local S3 server (moto, in this process) beside
    local disk, on the same data in the default layout: write, open, RAM-cache load, and
    uncached random batches (bare reads and the pipeline, full and block shuffle). Through
    obstore (what ``s3://`` URLs use) and, when s3fs is installed, through zarr's FsspecStore
    over s3fs (the alternative it was chosen over). Latency-bound: each uncached batch is one
    request per chunk it touches, and the server is a Python one on the same loaded cores."""
    with local_s3_server() as endpoint:
        targets: dict[str, Callable[[], object]] = {
            "local disk": lambda: tmp / "object-local.zarr",
            "s3, obstore (used)": lambda: "s3://bench/obstore.zarr"}
        try:
            import s3fs  # noqa: F401
            from zarr.storage import FsspecStore
            targets["s3, s3fs via FsspecStore"] = lambda: FsspecStore.from_url(
                "s3://bench/fsspec.zarr", storage_options={"endpoint_url": endpoint})
        except ImportError:
            pass
        rows = {}
        for name, target in targets.items():
            write_s = write_store(target(), latents, labels, None, "none")
            opens = []
            for _ in range(5):
                start = time.perf_counter()
                store = open_store(target(), cache_bytes=0)
                opens.append(time.perf_counter() - start)
            start = time.perf_counter()
            open_store(target()).load()
            load_s = time.perf_counter() - start
            pick = random_batches(len(store))
            read = rates({"uncached": lambda s=store, p=pick: s.read(p())}, seconds)
            pipe = rates({"uncached": pipeline(store),
                          "block": pipeline(store, ShuffleConfig(kind="block"))}, seconds)
            rows[name] = {"write_s": round(write_s, 2),
                          "open_ms": round(float(np.median(opens)) * 1e3, 1),
                          "cache_load_s": round(load_s, 2), "read_uncached": read["uncached"],
                          "pipeline_uncached": pipe["uncached"], "pipeline_block": pipe["block"]}
            print(name, rows[name], flush=True)
    local = rows["local disk"]
    return {"samples": len(latents), "mib": round(latents.nbytes / 2**20, 1),
            "server": "moto ThreadedMotoServer on 127.0.0.1 (in this process)", "rows": rows,
            "vs_local": {name: {k: round(r[k] / local[k], 3) for k in
                                ("read_uncached", "pipeline_uncached", "pipeline_block")}
                         for name, r in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=1.2,
                        help="measuring time per contender and table cell")
    parser.add_argument("--block-seconds", type=float, default=8.0,
                        help="measuring time per contender of the block-shuffle rows (longer: "
                        "a trial should span windows, whose first batches do the reads)")
    parser.add_argument("--part", choices=["all", "layouts", "block", "object", "shards"],
                        default="all")
    parser.add_argument("--check-samples", type=int, default=65_536,
                        help="samples of the store the shards part's pre-check reads")
    parser.add_argument("--object-samples", type=int, default=4096,
                        help="samples of the object-storage rows (a Python S3 server on the "
                        "same cores: kept small)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/loader.json "
                        "(loader_block.json for --part block)")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    out = Path(args.out or results / {"block": "loader_block.json",
                                      "object": "loader_object.json",
                                      "shards": "loader_shards.json"}.get(args.part,
                                                                          "loader.json"))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.samples, 4, 32, 32), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 10, args.samples)
    rows, block, stored, sharded = [], None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/latents.npy", latents)
        np.save(f"{tmp}/labels.npy", labels)
        baseline = MemmapStore({k: np.load(f"{tmp}/{k}.npy", mmap_mode="r")
                                for k in ("latents", "labels")})
        for a in baseline.arrays.values():  # map every page once, as a long training run would
            np.asarray(a).sum()
        if args.part in ("all", "object"):
            n = args.object_samples
            stored = measure_object(Path(tmp), latents[:n], labels[:n], args.seconds)
        for chunks, compressor in LAYOUTS if args.part in ("all", "layouts") else []:
            path = Path(tmp) / f"{chunks}-{compressor}.zarr"
            write_s = write_store(path, latents, labels, chunks, compressor)
            os.sync()  # so that write-back does not compete with the measurement
            rows.append(measure_layout(path, baseline, chunks, compressor, write_s, args.seconds))
            print(rows[-1], flush=True)
        if args.part == "shards":
            sharded = measure_shards(Path(tmp), latents, labels, args.block_seconds,
                                     args.check_samples)
            print(sharded, flush=True)
        if args.part in ("all", "block"):
            path = Path(tmp) / "None-none.zarr"
            if not path.exists():
                write_store(path, latents, labels, None, "none")
                os.sync()
            block = measure_block(path, baseline, args.block_seconds)
            print(block, flush=True)
    digits_rates = None
    if args.part in ("all", "layouts"):  # the default training config's data: 1x8x8 float32
        digits = rng.standard_normal((60_000, 1, 8, 8), dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            write_store(Path(tmp) / "digits.zarr", digits, rng.integers(0, 10, 60_000), None,
                        "none")
            digits_rates = rates({"cached": pipeline(open_store(Path(tmp) / "digits.zarr")),
                                  "uncached": pipeline(open_store(Path(tmp) / "digits.zarr",
                                                                  cache_bytes=0))},
                                 args.seconds)
    load = os.getloadavg()[0]
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cores (shared; load average {load:.1f} at the end), Python "
        f"{platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}",
        "samples": args.samples, "sample_shape": [4, 32, 32], "dtype": "float16",
        "batch": BATCH, "layouts": rows,
    }
    if digits_rates is not None:
        result["digits_1x8x8"] = {
            "samples": 60_000, "pipeline": digits_rates,
            "assumed_training_samples_per_s": TRAINING_SAMPLES_PER_S,
            "cached_ratio": round(digits_rates["cached"] / TRAINING_SAMPLES_PER_S),
            "uncached_ratio": round(digits_rates["uncached"] / TRAINING_SAMPLES_PER_S)}
    if stored is not None:
        result["object_storage"] = stored
    if sharded is not None:
        result["shards"] = sharded
    if block is not None:
        result["block_shuffle"] = block
        # a store sorted by label, 2**20 samples in chunks of 64 (the default for 8 KiB latents)
        result["mixing"] = mixing(2**20, 64)
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def print_table(r: dict) -> None:
    if r["layouts"]:
        print_layouts(r)
    if "block_shuffle" in r:
        print_block(r)
    if "object_storage" in r:
        print_object(r)
    if "shards" in r:
        print_shards(r)


def print_shards(r: dict) -> None:
    s = r["shards"]
    print(f"\nsharded stores, uncached: {r['samples']:,} samples of {r['sample_shape']} "
          f"{r['dtype']}, latents in chunks of 64 samples (0.5 MiB); samples/s (x unsharded)\n")
    print("| latents layout | files | write s | block shuffle, bare read | random batches |")
    print("|---|---|---|---|---|")
    names = {"unsharded": "a file per chunk", "shards64": "shards of 64 chunks (32 MiB)",
             "shards256": "shards of 256 chunks (128 MiB, auto)"}
    for k, name in names.items():
        lay = s["layout"][k]
        print(f"| {name} | {lay['latents_files']} | {lay['write_s']} | "
              f"{s['block_read'][k]:,} ({s['block_vs_unsharded'][k]:.2f}x) | "
              f"{s['random_read'][k]:,} ({s['random_vs_unsharded'][k]:.2f}x) |")
    print(f"| shards of 256 chunks, the block shuffle through zarr | | | "
          f"{s['block_read']['shards256_zarr']:,} "
          f"({s['block_vs_unsharded']['shards256_zarr']:.2f}x) | |")
    c = s["check"]
    print(f"\npre-check of {c['samples']:,} samples ({c['mib']} MiB), seconds (median of 3)\n")
    print("| layout | " + " | ".join(f"fraction {f}" for f in FRACTIONS) + " |")
    print("|---|" + "---|" * len(FRACTIONS))
    for k, times in c["seconds"].items():
        print(f"| {k} | " + " | ".join(str(times[str(f)]) for f in FRACTIONS) + " |")


def print_object(r: dict) -> None:
    o = r["object_storage"]
    print(f"\nobject storage (s3://) vs local disk, same run: {o['samples']:,} samples "
          f"({o['mib']} MiB), default layout, uncached; {o['server']}; latency-bound; "
          "samples/s (% of local disk)\n")
    print("| store | write s | open ms | cache load s | read uncached | pipeline uncached "
          "| pipeline block shuffle |")
    print("|---|---|---|---|---|---|---|")
    for name, x in o["rows"].items():
        v = o["vs_local"][name]
        print(f"| {name} | {x['write_s']} | {x['open_ms']} | {x['cache_load_s']} "
              f"| {x['read_uncached']:,} ({v['read_uncached']:.0%}) "
              f"| {x['pipeline_uncached']:,} ({v['pipeline_uncached']:.0%}) "
              f"| {x['pipeline_block']:,} ({v['pipeline_block']:.0%}) |")


def print_layouts(r: dict) -> None:
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
    if "digits_1x8x8" not in r:
        return
    d = r["digits_1x8x8"]
    print(f"\ndigits 1x8x8 (60k samples, default layout): pipeline cached "
          f"{d['pipeline']['cached']:,} samples/s = {d['cached_ratio']}x, uncached "
          f"{d['pipeline']['uncached']:,} = {d['uncached_ratio']}x the assumed "
          f"{d['assumed_training_samples_per_s']} samples/s of training")



def print_block(r: dict) -> None:
    b = r["block_shuffle"]
    print(f"\nstores larger than RAM, simulated: zarr opened with cache_bytes=0 (no RAM cache; "
          f"warm OS page cache, as for the memmap); {r['samples']:,} samples of "
          f"{r['sample_shape']} {r['dtype']}, default layout; samples/s (% of the memmap "
          "gather measured beside it)\n")
    print("| reader | block | window | read | pipeline |")
    print("|---|---|---|---|---|")
    names = {"memmap": "memmap gather, random batches (baseline)",
             "full": "zarr, full shuffle (`kind=\"full\"`): random batches, uncached",
             "block": "zarr, block shuffle (`kind=\"block\"`, default sizes)",
             "block4": "zarr, block shuffle, `block_chunks=4, window_blocks=64`"}
    for k, name in names.items():
        c = b["configs"].get(k)
        size = (f"{c['block_samples']} samples | {c['window_blocks']} blocks, "
                f"{c['window_mib']} MiB" if c else "— | —")
        print(f"| {name} | {size} | {b['read'][k]:,} ({b['read_vs_memmap'][k]:.1%}) "
              f"| {b['pipeline'][k]:,} ({b['pipeline_vs_memmap'][k]:.1%}) |")
    for k, c in b["configs"].items():
        print(f"\n{k}, bare reads: {c['blocks_read']} blocks read, at most "
              f"{c['most_blocks_held']} held at once")
    z, d = b["chunk_read"]["zarr"], b["chunk_read"]["direct"]
    print(f"\nthe full shuffle's pipeline was measured beside the memmap pipeline apart "
          f"(memmap then: {b['pipeline_memmap_beside_full']:,} samples/s)")
    print(f"\none 0.5 MiB latents chunk: zarr slice {z['cpu_ms']} ms CPU / {z['wall_ms']} ms "
          f"wall; its file read straight, CRC checked {d['cpu_ms']} / {d['wall_ms']} ms")
    m = r["mixing"]
    print(f"\nmixing: one epoch of a store of {m['samples']:,} samples sorted by label "
          f"({m['classes']} equal runs), chunks of {m['chunk']}; lag-1 autocorrelation of "
          "consecutive batches' mean label (0: independent, 1: each like the one before) and "
          "variance of the batch mean label / that of independent random batches; predicted "
          "from the window size in brackets\n")
    print("| batch | order | lag-1 autocorrelation | batch-mean variance |")
    print("|---|---|---|---|")
    for batch, x in m["by_batch"].items():
        for k in ("full", *BLOCKS, "sequential"):
            p = x["predicted"].get(k)
            lag = f"{x['lag1'][k]:.3f}" + (f" ({p['lag1']:.3f})" if p else "")
            var = f"{x['variance_vs_random'][k]:.2f}" + (f" ({p['variance']:.2f})" if p else "")
            print(f"| {batch} | {k} | {lag} | {var} |")


if __name__ == "__main__":
    main()
