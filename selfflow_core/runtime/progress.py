"""Progress: a tqdm bar on a terminal, structured ``key=value`` log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, start: int, *, enabled: bool, every: int) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0, self.s0 = time.perf_counter(), start
        self.bar = (tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")
                    if self.tty else None)

    def rate(self, step: int) -> float:
        return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Advance to ``step``; ``metrics`` (given on log steps) are shown."""
        if not self.enabled:
            return
        metrics = metrics or {}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.every == 0 or step == self.total:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = self.rate(step)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
            print(f"step={step}/{self.total} {fields} it/s={rate:.2f} eta_s={eta:.0f}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
