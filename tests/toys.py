"""Toy modalities the store tests share."""

from __future__ import annotations

from selfflow_core import ToyModality


class FailingToy(ToyModality):
    """The toy modality whose encoder raises ``RuntimeError(message)`` at its ``fail_at``-th
    call."""

    def __init__(self, config, fail_at: int, message: str = "encoder died") -> None:
        super().__init__(config)
        self.calls, self.fail_at, self.message = 0, fail_at, message

    def encode(self, raw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(self.message)
        return raw
