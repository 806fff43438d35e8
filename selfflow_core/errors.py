"""Every error a user can cause, under one base: :class:`SelfFlowError`.

The ``selfflow`` command catches the base and prints the message as one ``error: ...`` line (exit
status 2): a user never sees a traceback for their own mistake. Each error also derives from the
built-in exception it refines (``ValueError``, ``RuntimeError``, ...), so ``except ValueError``
keeps working. Errors that carry data rebuild from it when unpickled, so they cross process
boundaries (a multiprocessing pool, a ``torchrun`` worker) intact.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError", "ConfigError", "DuplicateComponentError", "EvaluatorCacheError", "LockHeld",
    "NonFiniteLossError", "ObjectStoreError", "PluginLoadError", "RunDirInUse", "ScaffoldError",
    "SelfFlowError", "StoreError", "UnknownComponentError",
]


class SelfFlowError(Exception):
    """The base of every user-facing selfflow error; its message is complete on its own."""


class ConfigError(SelfFlowError, ValueError):
    """Everything wrong with one config, each problem with its path (``$.teacher.decay: ...``)."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")

    def __reduce__(self):
        return (type(self), (self.problems, self.source))


class UnknownComponentError(SelfFlowError, LookupError):
    """A config named a ``kind`` that no installed plugin registered."""


class DuplicateComponentError(SelfFlowError, ValueError):
    """Two plugins registered the same ``kind`` in one category."""


class PluginLoadError(SelfFlowError, ImportError):
    """An installed plugin could not be imported; names its distribution and the error."""


class StoreError(SelfFlowError, ValueError):
    """A latent store that cannot be used, with every problem found (store, field, sample index)."""

    def __init__(self, store: str, problems: list[str]) -> None:
        self.store = store
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"latent store {store}: {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self):
        return (type(self), (self.store, self.problems))


class ObjectStoreError(SelfFlowError, OSError):
    """A store in object storage (``s3://...``) that cannot be reached: no such bucket, refused
    credentials, a dropped connection. One line naming the store; it never holds a secret."""

    def __init__(self, store: str, problem: str) -> None:
        self.store, self.problem = store, problem
        super().__init__(f"object store {store}: {problem}")

    def __str__(self) -> str:  # OSError's own would show its args as a tuple
        return f"object store {self.store}: {self.problem}"

    def __reduce__(self):
        return (type(self), (self.store, self.problem))


class CheckpointError(SelfFlowError, RuntimeError):
    """A checkpoint is missing, truncated, unsafe, or from another run; names the file."""


class EvaluatorCacheError(SelfFlowError, RuntimeError):
    """A cached fixed evaluator whose weights do not match their recorded SHA-256 (or whose
    record holds other settings); names the files and the folder to delete."""


class LockHeld(SelfFlowError, RuntimeError):
    """The lock belongs to another live process: ``holder`` is ``(pid, host)`` or None."""

    def __init__(self, file: str, holder: tuple[int, str] | None) -> None:
        self.file, self.holder = file, holder
        super().__init__(f"lock {file} is held by {self.who}")

    @property
    def who(self) -> str:
        """The holder in words: ``pid 26975 on host vm`` (or ``an unknown process`` when the
        lock file cannot be read)."""
        if self.holder is None:
            return "an unknown process"
        pid, host = self.holder
        return f"pid {pid} on host {host}"

    def __reduce__(self):
        return (type(self), (self.file, self.holder))


class RunDirInUse(SelfFlowError, RuntimeError):
    """Another live training process holds the run directory's lock."""


class NonFiniteLossError(SelfFlowError, FloatingPointError):
    """A loss term became NaN/Inf; names the step and the term."""


class ScaffoldError(SelfFlowError, ValueError):
    """A modality name or a target directory that cannot be used; the message says why."""
