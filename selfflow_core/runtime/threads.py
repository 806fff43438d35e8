"""Torch's intra-op CPU threads for a run (``TrainerConfig.threads``) and the cores a process may
use. On a small shared CPU, torch's default (one OpenMP thread per core) is many times slower
than fewer threads as soon as other processes compete for the cores: see the "CPU threads"
section of benchmarks/RESULTS.md."""

from __future__ import annotations

import os

import torch

__all__ = ["apply_threads", "available_cores", "default_threads", "resolve_threads"]


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one
    (``os.sched_getaffinity``; a container or ``taskset`` may allow fewer than the machine has),
    else every core (``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """The processes of this run on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads(*, cores: int | None = None, processes: int | None = None,
                    current: int | None = None) -> int:
    """What ``threads = None`` resolves to: half the cores each of this machine's processes of
    the run may use (the other half left to the input pipeline and to whatever else runs on the
    machine), at least 1, and never more than torch is set to already (``current``: a process
    that lowered it, e.g. a test pinned to one thread, keeps its count)."""
    cores = available_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    current = torch.get_num_threads() if current is None else current
    return max(1, min(current, cores // processes // 2))


def resolve_threads(threads: int | None) -> int:
    """The intra-op thread count of a CPU run: ``threads`` when set; with ``None``, torch's count
    as it is when ``OMP_NUM_THREADS`` is set (the caller chose, e.g. ``torchrun`` sets 1 per
    process), else :func:`default_threads`."""
    if threads is not None:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    return default_threads()


def apply_threads(threads: int | None, device: torch.device) -> int | None:
    """Set torch's intra-op thread count (``torch.set_num_threads``, for the whole process, left
    so after the run) to :func:`resolve_threads` on a CPU ``device``, and return it; on any other
    device change nothing and return None (the GPU does the work there)."""
    if device.type != "cpu":
        return None
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
