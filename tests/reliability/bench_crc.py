"""What the checksums cost (docs/reliability.md): the per-chunk CRC-32C of latent stores and the
zip CRC-32 check of ``checkpoint.load``.

    OMP_NUM_THREADS=1 python tests/reliability/bench_crc.py [samples] [checkpoint MiB]

Writes the same float32 latents (N, 16, 8) with the store's default layout (0.5 MiB chunks, no
compression) with and without the checksum codec, then times: a full write, a full read (what a
cached store does once), and random batches of 256 samples (what an uncached store does per
step). Best of 5 repeats each; also checks that one flipped byte is caught only with the codec.
Then a checkpoint of that many MiB of tensors: ``torch.load`` alone vs ``checkpoint.load``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from selfflow_core.data.store import chunk_samples
from selfflow_core.interfaces import FieldSpec
from selfflow_core.runtime import checkpoint


def best(fn, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    data = np.random.default_rng(0).standard_normal((n, 16, 8), dtype=np.float32)
    chunk = chunk_samples(FieldSpec(shape=(16, 8), dtype="float32"))
    rng = np.random.default_rng(1)
    batches = [np.unique(rng.integers(0, n, 256)) for _ in range(200)]
    root = Path(tempfile.mkdtemp())
    results = {"samples": n, "megabytes": data.nbytes / 2**20, "chunk_samples": chunk}
    try:
        for name, compressors in (("plain", None), ("crc32c", (Crc32cCodec(),))):
            path = root / f"{name}.zarr"

            def write(path=path, compressors=compressors):
                shutil.rmtree(path, ignore_errors=True)
                arr = zarr.create_array(str(path), shape=data.shape, dtype="float32",
                                        chunks=(chunk, 16, 8), compressors=compressors)
                arr[:] = data

            results[f"{name}_write_s"] = best(write)
            arr = zarr.open_array(str(path), mode="r")
            results[f"{name}_read_all_s"] = best(lambda arr=arr: arr[:])
            results[f"{name}_batch_ms"] = best(
                lambda arr=arr: [arr.oindex[b] for b in batches]) / len(batches) * 1000
            victim = path / "c" / "1" / "0" / "0"
            raw = bytearray(victim.read_bytes())
            raw[100] ^= 0x10
            victim.write_bytes(bytes(raw))
            try:
                arr[chunk: 2 * chunk]
                results[f"{name}_flip_detected"] = False
            except ValueError:
                results[f"{name}_flip_detected"] = True
        blob = data.tobytes()
        results["crc32c_GB_per_s"] = len(blob) / best(lambda: google_crc32c.value(blob)) / 1e9
        mib = int(sys.argv[2]) if len(sys.argv) > 2 else 256
        state = {"format": 1, "model": {f"w{i}": torch.randn(mib * 2**18 // 16)
                                        for i in range(16)}}
        path = root / "step-00000001.pt"
        torch.save(state, path)
        results["checkpoint_MiB"] = path.stat().st_size / 2**20
        results["torch_load_s"] = best(lambda: torch.load(path, weights_only=True))
        results["checkpoint_load_s"] = best(lambda: checkpoint.load(path))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for what in ("write_s", "read_all_s", "batch_ms"):
        results[f"overhead_{what}"] = results[f"crc32c_{what}"] / results[f"plain_{what}"] - 1
    results["overhead_checkpoint_load"] = (results["checkpoint_load_s"]
                                           / results["torch_load_s"] - 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
