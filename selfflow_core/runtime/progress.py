"""Progress: a tqdm bar on a terminal, structured ``key=value`` log lines otherwise. On log
steps it also says when the machine is oversubscribed (:func:`oversubscription`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

import torch
from tqdm import tqdm

from selfflow_core.runtime.threads import available_cores


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscription() -> tuple[float, int] | None:
    """``(load, cores)`` when the machine's 1-minute load average is above the cores this process
    may use (more runnable threads than cores: CPU training with several torch threads then
    slows down many times, see ``TrainerConfig.threads``), else None. The load counts this run
    too, and every process of the machine, not only those on this process's cores."""
    load, cores = load_average(), available_cores()
    if load is None or load <= cores:
        return None
    return load, cores


class Progress:
    def __init__(self, total: int, start: int, *, enabled: bool, every: int) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0, self.s0 = time.perf_counter(), start
        self.warned = False  # the oversubscription message is printed once
        self.bar = (tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")
                    if self.tty else None)

    def rate(self, step: int) -> float:
        return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Advance to ``step``; ``metrics`` (given on log steps) are shown, and on log steps a
        ``load=... cores=... (oversubscribed)`` field when :func:`oversubscription` says so."""
        if not self.enabled:
            return
        metrics = metrics or {}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.every == 0 or step == self.total:
                over = self._oversubscribed()
                postfix = {k: f"{v:.4g}" for k, v in metrics.items()}
                if over is not None:
                    postfix["load"] = f"{over[0]:.1f} cores={over[1]} (oversubscribed)"
                self.bar.set_postfix(postfix, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = self.rate(step)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
            over = self._oversubscribed()
            load = (f" load={over[0]:.1f} cores={over[1]} (oversubscribed)"
                    if over is not None else "")
            print(f"step={step}/{self.total} {fields} it/s={rate:.2f} eta_s={eta:.0f}{load}",
                  flush=True)

    def _oversubscribed(self) -> tuple[float, int] | None:
        """:func:`oversubscription`, with a message the first time it is found."""
        over = oversubscription()
        if over is not None and not self.warned:
            self.warned = True
            load, cores, threads = *over, torch.get_num_threads()
            advice = (f"; CPU training on several torch threads (here {threads}) then runs many "
                      f"times slower: set `threads=1` if this run trains on the CPU"
                      if threads > 1 else "; CPU steps will be slower than on an idle machine")
            self.message(f"the machine is oversubscribed: load average {load:.1f} over the "
                         f"{cores} core(s) this process may use{advice}")
        return over

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
