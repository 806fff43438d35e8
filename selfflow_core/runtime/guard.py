"""What guards a training run from the outside: one trainer per run directory, and SIGTERM /
SIGINT turned into "stop after this step" (the trainer then writes a checkpoint and exits
cleanly)."""

from __future__ import annotations

import signal
from pathlib import Path

from selfflow_core.errors import RunDirInUse
from selfflow_core.runtime.locking import LockHeld, PidLock

__all__ = ["RunDirInUse", "StopSignals", "lock_run_dir"]


def lock_run_dir(run_dir: Path) -> PidLock:
    """Take ``<run_dir>/train.lock``: two trainers on one run directory would overwrite each
    other's checkpoints and logs. A lock left by a dead process on this host is taken over."""
    lock = PidLock(Path(run_dir) / "train.lock")
    try:
        return lock.acquire()
    except LockHeld as exc:
        who = exc.who
        raise RunDirInUse(
            f"run_dir {run_dir} is in use by another training process ({who}): two trainers on "
            f"one run_dir would overwrite each other's checkpoints. Use another run_dir, or, if "
            f"none is running, delete {lock.file}") from None


class StopSignals:
    """Inside ``with``, SIGTERM and SIGINT only record their name in :attr:`received`; the
    previous handlers come back on exit. Outside the main thread it changes nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
