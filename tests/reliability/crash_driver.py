"""Crash driver for tests/reliability: real work in forked children, killed at random points.

``python crash_driver.py MODE OUT`` reads ``OUT/spec.json`` and writes ``OUT/summary.json``.
Forking (no new interpreter, no torch import) makes a trial cost milliseconds, so there can be
many. The parent process never touches zarr or starts a thread before forking, so every child
starts clean. Modes:

- ``checkpoint``: each child loops ``checkpoint.save`` of a real trainer state (step 1, 2, ...)
  and is SIGKILLed after a random delay.
- ``train``: each child runs ``selfflow train`` (``cli.main``) and gets SIGKILL or SIGTERM
  ``delay`` seconds after it reported step ``target`` (``log_every=1`` lines on a pipe).
- ``encode``: each child runs ``selfflow encode`` and is SIGKILLed once it has committed a
  random number of batches more than the store held, plus a random part of a batch's time;
  several kills per store.
- ``memory``: a long tiny run in this process, VmRSS recorded at the given steps.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import selfflow_core.cli.main as cli

# imported once here, not in every child
import selfflow_core.data.writer
import selfflow_core.trainer  # noqa: F401
from selfflow_core.runtime import checkpoint

torch.set_num_threads(1)

# the first optimizer imports torch._dynamo (seconds): pay that once, before forking
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def fork(fn, stdout: int | None = None) -> int:
    """Run ``fn()`` in a forked child (its return value is the exit status)."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        if stdout is not None:
            os.dup2(stdout, 1)
            os.dup2(stdout, 2)
        code = fn() or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - any failure: print it, exit 70
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # the reader is gone; the exit status tells the rest
                pass
    os._exit(code)


def wait(pid: int) -> int:
    """Exit status of ``pid``: the code, or minus the signal that killed it."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def mode_checkpoint(spec: dict, out: Path) -> dict:
    template = checkpoint.load(spec["template"])
    rng = random.Random(spec["seed"])
    trials = []
    for i in range(spec["trials"]):
        directory = out / f"trial-{i:03d}"

        def write(directory=directory):
            for step in itertools.count(1):
                state = {**template, "step": step, "marker": torch.full((64,), float(step))}
                checkpoint.save(state, directory, step, keep=spec["keep"])

        delay = rng.uniform(spec["min_delay"], spec["max_delay"])
        pid = fork(write)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        trials.append({"dir": str(directory), "delay": delay, "status": wait(pid)})
    return {"trials": trials}


def mode_train(spec: dict, out: Path) -> dict:
    trials = []
    for trial in spec["trials"]:
        read, write = os.pipe()
        pid = fork(lambda trial=trial: cli.main(["train", "toy", *trial["argv"]]), stdout=write)
        os.close(write)
        lines, sent, t0 = [], None, time.perf_counter()
        with os.fdopen(read, "r", errors="replace") as stream:
            for line in stream:
                lines.append(line)
                if sent is None and line.startswith("step="):
                    step = int(line.split("/")[0][len("step="):])
                    if step >= trial["target"]:
                        time.sleep(trial["delay"])
                        os.kill(pid, getattr(signal, trial["signal"]))
                        sent = step
        status = wait(pid)
        trials.append({**trial, "sent_after_step": sent, "status": status, "output": "".join(lines),
                       "seconds": time.perf_counter() - t0})
    return {"trials": trials}


def committed(store: Path) -> tuple[int | None, int | None]:
    """(committed, rows of the latents array) from the JSON metadata (no zarr in the parent)."""
    try:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        rows = json.loads((store / "latents" / "zarr.json").read_text())["shape"][0]
        return attrs.get("committed"), rows
    except (OSError, ValueError, KeyError):
        return None, None


def mode_encode(spec: dict, out: Path) -> dict:
    def encode(store):
        devnull = os.open(os.devnull, os.O_WRONLY)
        return fork(lambda: cli.main(["encode", "toy", "waves", str(store), *spec["options"],
                                      "--batch-size", str(spec["batch_size"])]), stdout=devnull)

    t0 = time.perf_counter()
    status = wait(encode(out / "timing.zarr"))  # how long an uninterrupted encode takes
    duration = time.perf_counter() - t0
    assert status == 0, f"uninterrupted encode exited {status}"
    rng = random.Random(spec["seed"])
    stores = []
    for i in range(spec["stores"]):
        store = out / f"store-{i:02d}.zarr"
        kills = []
        for _ in range(spec["kills_per_store"]):
            # killed once the child has committed a random number of batches more than the
            # store held (so a loaded machine still kills mid-way), a random part of a batch's
            # time later (so that some kills land between a write and its commit)
            before = committed(store)[0] or 0
            batches = rng.randint(1, spec["batches"] // 3)
            extra = rng.uniform(0.0, 1.0) * duration / spec["batches"]
            pid = encode(store)
            finished = None  # the child's exit status, if it ended before the kill
            deadline = time.perf_counter() + 60 * max(duration, 1.0)
            while time.perf_counter() < deadline:
                if (committed(store)[0] or 0) >= before + batches * spec["batch_size"]:
                    break
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    finished = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.002)
            if finished is None:
                time.sleep(extra)
                os.kill(pid, signal.SIGKILL)
                finished = wait(pid)
            kills.append({"batches": batches, "extra": extra, "status": finished,
                          "after": committed(store)})
        stores.append({"store": str(store), "kills": kills})
    return {"duration": duration, "stores": stores}


def mode_memory(spec: dict, out: Path) -> dict:
    from selfflow_core.cli.main import resolve_config
    from selfflow_core.plugins.hookspecs import hookimpl
    from selfflow_core.plugins.manager import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    def rss_mb() -> float:
        status = Path("/proc/self/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/self/status")

    rss: dict[int, float] = {}

    class Probe:
        @hookimpl
        def selfflow_on_step_end(self, trainer, step, terms):
            if step in spec["at"]:
                rss[step] = rss_mb()

    components = Components(make_plugin_manager([Probe()], entry_points=False))
    config = resolve_config(components, "toy", spec["overrides"])
    t0 = time.perf_counter()
    summary = Trainer(config, components=components, progress=False).fit()
    return {"rss_mb": rss, "steps": summary["step"], "seconds": time.perf_counter() - t0,
            "final_loss": summary["final_loss"]}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    spec = json.loads((out / "spec.json").read_text())
    summary = {"checkpoint": mode_checkpoint, "train": mode_train, "encode": mode_encode,
               "memory": mode_memory}[mode](spec, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
