"""No device->host copy on every step: the loss check and the metrics are read back on the log,
checkpoint and stop steps only, and the loss history a checkpoint keeps is bounded. Counted on
the CPU by patching the tensor methods that copy to the host and counting the calls made by the
project's own code (torch's CPU optimizer reads its step counter, a host tensor, by design)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import attrs
import pytest
import torch

import selfflow_core
from selfflow_core import CheckpointConfig, DiT, NullTracker, Trainer
from selfflow_core.builtin.presets import toy
from selfflow_core.runtime import metrics
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
CORE = Path(selfflow_core.__file__).parent
#: the input pipeline works on host tensors by design (it reads, tokenizes and collates there)
HOST_SIDE = (CORE / "data",)


def _by_the_step(frame) -> bool:
    """Called by the project's code, and not on behalf of the host-side input pipeline."""
    files = []
    while frame is not None:
        files.append(Path(frame.f_code.co_filename))
        frame = frame.f_back
    if any(f.is_relative_to(h) for f in files for h in HOST_SIDE):
        return False
    return files[0].is_relative_to(CORE)


@contextlib.contextmanager
def counting_host_reads():
    counts = {name: 0 for name in READS}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        def read(self, *args, **kwargs):
            if _by_the_step(sys._getframe(1)):
                counts[name] += 1  # the project's own code reading a tensor back
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def trainer(tmp_path, toy_store, core_components, one_thread):
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, store=toy_store, source="",
                        batch_size=8)
    config = attrs.evolve(base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32),
                          checkpoint=CheckpointConfig(every=1000), tracker=NullTracker.Config(),
                          steps=12, log_every=6, run_dir=str(tmp_path / "run"))
    return Trainer(config, components=core_components, progress=False)


def test_a_training_step_reads_nothing_back_from_the_device(trainer):
    trainer.train_step()  # the first step may set things up
    with counting_host_reads() as counts:
        for _ in range(4):
            trainer.train_step()
    assert sum(counts.values()) == 0, counts


def test_the_loop_reads_back_only_on_log_steps(trainer, monkeypatch):
    flushes = []
    original = metrics.StepLosses.flush

    def flush(self):
        flushes.append(len(self._pending))
        return original(self)

    monkeypatch.setattr(metrics.StepLosses, "flush", flush)
    summary = trainer.fit()
    assert summary["step"] == 12
    assert flushes[:2] == [6, 6]  # steps 1-6 and 7-12, each read back at once
    assert trainer.losses == pytest.approx(trainer.losses) and len(trainer.losses) == 12


def test_the_loss_history_is_bounded(trainer, monkeypatch):
    monkeypatch.setattr(trainer.step_losses, "keep", 5)
    trainer.fit()
    assert len(trainer.losses) == 5
    assert len(trainer.state_dict()["losses"]) == 5
