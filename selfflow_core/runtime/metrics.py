"""Step losses kept on the device between log points: the trainer reads them back (one
device->host copy, one collective) only when it logs, checkpoints or stops, never per step.

The same read-back is the non-finite check of ``on_nonfinite="stop"``: a NaN/Inf loss is found at
the next read-back, before any checkpoint is written, so the last checkpoint is always of finite
weights. (``on_nonfinite="skip"`` must decide before each optimizer step and checks every step.)
"""

from __future__ import annotations

import torch

from selfflow_core.runtime.dist import Dist
from selfflow_core.types import LossTerms

__all__ = ["LOSS_HISTORY", "StepLosses"]

#: how many recent per-step losses a run keeps (and saves in its checkpoints)
LOSS_HISTORY = 10_000
TERMS = ("total", "flow", "rep")


class StepLosses:
    """Per-step ``(total, flow, rep)`` recorded as device tensors, with the modality each step
    trained on; :meth:`flush` averages the pending steps over ranks in one collective, appends
    the totals to :attr:`history` and adds each step to its modality's running means
    (:meth:`take_by_modality`)."""

    def __init__(self, dist: Dist, keep: int = LOSS_HISTORY) -> None:
        self.dist, self.keep = dist, keep
        self.history: list[float] = []
        self._pending: list[tuple[int, str, torch.Tensor]] = []
        self._by_modality: dict[str, list[list[float]]] = {}

    def record(self, step: int, terms: LossTerms, modality: str = "") -> None:
        self._pending.append((step, modality, torch.stack([getattr(terms, k).detach().float()
                                                           for k in TERMS])))

    def take_by_modality(self) -> dict[str, float]:
        """``loss/<modality>``, ``flow/<modality>`` and ``rep/<modality>``: the means over the
        steps read back since the last call, per modality (steps of a composite run each train
        one modality); then starts afresh."""
        out = {}
        for name, rows in sorted(self._by_modality.items()):
            for k, column in zip(("loss", "flow", "rep"), zip(*rows)):
                out[f"{k}/{name}"] = sum(column) / len(column)
        self._by_modality = {}
        return out

    def flush(self) -> tuple[int, dict[str, float], dict[str, float]] | None:
        """Read the pending steps back. Returns None when every loss was finite on every rank,
        else ``(step, this rank's terms, all ranks' mean terms)`` of the first bad step (the
        steps from it on are not added to the history)."""
        if not self._pending:
            return None
        steps = [s for s, _, _ in self._pending]
        modalities = [m for _, m, _ in self._pending]
        local = torch.stack([v for _, _, v in self._pending])
        self._pending = []
        mean = self.dist.mean(local)  # NaN/Inf anywhere spreads to the mean on every rank
        both = torch.stack([local, mean]).tolist()
        for i, step in enumerate(steps):
            if not all(map(_finite, both[1][i])):
                return step, dict(zip(TERMS, both[0][i])), dict(zip(TERMS, both[1][i]))
            self.history.append(both[1][i][0])
            self._by_modality.setdefault(modalities[i], []).append(both[1][i])
        del self.history[:-self.keep]
        return None


def _finite(x: float) -> bool:
    return x - x == 0.0
