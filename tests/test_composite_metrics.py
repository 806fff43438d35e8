"""A composite run reports each modality's losses (flow and representation), not only the mixed
loss, so a user can tell which modality learns: in the tracker (JSONL here) and the console."""

from __future__ import annotations

import json

import pytest

from selfflow_core import (
    CheckpointConfig,
    DiT,
    JsonlTracker,
    ModalitySpec,
    Trainer,
    TrainerConfig,
)
from selfflow_core.testing.fixtures import TINY_TOY

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, toy_store, core_components, names=("a", "b")) -> Trainer:
    config = TrainerConfig(
        modalities={n: ModalitySpec(modality=TINY_TOY, store=toy_store, batch_size=8,
                                    probability=0.5) for n in names},
        backbone=DiT.Config(depth=3, width=32), checkpoint=CheckpointConfig(every=100),
        tracker=JsonlTracker.Config(), steps=12, log_every=6, run_dir=str(tmp_path / "run"))
    trainer = Trainer(config, components=core_components, progress=False)
    trainer.fit()
    return trainer


def logged(tmp_path) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    return [r for r in rows if "loss" in r]


def test_each_modality_logs_its_own_losses(tmp_path, toy_store, core_components, monkeypatch):
    trained_on = []
    original = Trainer._next_batch

    def next_batch(self):
        m, batch = original(self)
        trained_on.append(m.name)
        return m, batch

    monkeypatch.setattr(Trainer, "_next_batch", next_batch)
    trainer = run(tmp_path, toy_store, core_components)
    rows = logged(tmp_path)
    assert [r["step"] for r in rows] == [6, 12]
    for row, window in zip(rows, (slice(0, 6), slice(6, 12))):
        steps = trained_on[window]
        for name in sorted(set(steps)):
            # the modality's loss is the mean of the history over the steps that trained it
            own = [loss for loss, n in zip(trainer.losses[window], steps) if n == name]
            assert row[f"loss/{name}"] == pytest.approx(sum(own) / len(own))
            assert {f"flow/{name}", f"rep/{name}"} <= set(row)
        assert not {f"loss/{n}" for n in {"a", "b"} - set(steps)} & set(row)


def test_a_single_modality_run_logs_no_split(tmp_path, toy_store, core_components):
    run(tmp_path, toy_store, core_components, names=("only",))
    assert not any(k.startswith("loss/") for r in logged(tmp_path) for k in r)
