"""Timeseries presets: a default run of a few minutes on a CPU and a tiny one for tests."""

from __future__ import annotations

import attrs
from selfflow_core import (
    CheckpointConfig,
    DiT,
    EMATeacher,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
)

from selfflow_timeseries.adapter import TimeseriesModality


def default() -> TrainerConfig:
    """Class-conditional Self-Flow on the ``sensors`` source at the adapter's default config (as
    written: 2048 synthetic 3-channel signals of 64 steps, 16 tokens of 4 steps each).

    Paper settings kept: uniform p(t), layers 0.3/0.7 of depth, gamma 0.8, AdamW, label dropout
    0.1. Changed for a short run: lr 1e-3 with warm-up and an EMA teacher of decay 0.99 with
    warm-up (0.9999 averages over far more steps than the run has).
    """
    modality = TimeseriesModality.Config()
    return TrainerConfig(
        modalities={"timeseries": ModalitySpec(
            modality=modality, store="data/timeseries.zarr", source="sensors", batch_size=64,
            scheduler=modality.default_scheduler())},
        backbone=DiT.Config(depth=4, width=64, heads=4),
        teacher=EMATeacher.Config(decay=0.99, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=50),
        checkpoint=CheckpointConfig(every=250, keep=2),
        sampling=SamplingConfig(count=16, steps=25, method="heun", cfg_scale=2.0),
        steps=1000, run_dir="runs/timeseries", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks)."""
    base = default()
    spec = attrs.evolve(base.modalities["timeseries"],
                        modality=attrs.evolve(base.modalities["timeseries"].modality, count=128),
                        store="data/timeseries-tiny.zarr", batch_size=16)
    return attrs.evolve(
        base, modalities={"timeseries": spec}, backbone=DiT.Config(depth=3, width=32, heads=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=2), checkpoint=CheckpointConfig(every=5, keep=2),
        sampling=SamplingConfig(count=8, steps=4), steps=10, run_dir="runs/timeseries-tiny",
        log_every=5)
