"""An exclusive lock file for one writer of a local path (a latent store, a run directory).

The lock file holds ``pid host``. It appears with its content or not at all (written aside, then
hard-linked: ``link`` fails when the lock exists), so a process killed while taking it never
leaves an empty lock that no later one could tell from a live one. A lock left by a process that
is gone (same host) is taken over; one from another host is assumed alive.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

__all__ = ["LockHeld", "PidLock"]
from selfflow_core.errors import LockHeld


class PidLock:
    """``PidLock(file).acquire()`` or ``with PidLock(file):``; :class:`LockHeld` when another
    live process holds it. :meth:`release` removes the file only if this process holds it."""

    def __init__(self, file: str | os.PathLike) -> None:
        self.file = os.fspath(file)

    def acquire(self) -> PidLock:
        os.makedirs(os.path.dirname(os.path.abspath(self.file)), exist_ok=True)
        tmp = f"{self.file}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            for attempt in range(2):
                try:
                    os.link(tmp, self.file)
                except FileExistsError:
                    holder = self.holder()
                    if attempt == 0 and holder is not None and not _alive(*holder):
                        os.remove(self.file)  # stale: its process is gone
                        continue
                    raise LockHeld(self.file, holder) from None
                return self
        finally:
            os.remove(tmp)
        raise AssertionError("unreachable")

    def holder(self) -> tuple[int, str] | None:
        try:
            pid, host = Path(self.file).read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.holder() == (os.getpid(), socket.gethostname()):
            os.remove(self.file)

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell; assume it is
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
