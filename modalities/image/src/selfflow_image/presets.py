"""Image presets: the default digits run (the main job) and a tiny one for tests."""

from __future__ import annotations

import attrs

from selfflow_core.builtin.dit import DiT
from selfflow_core.config.run import CheckpointConfig, ModalitySpec, OptimConfig, TrainerConfig
from selfflow_core.sampling import SamplingConfig
from selfflow_core.teachers import EMATeacher
from selfflow_core.timesteps import DualTimestep, Uniform
from selfflow_image.adapter import ImageModality


def default() -> TrainerConfig:
    """Class-conditional Self-Flow on the bundled 8x8 digits, sized for a 2-core CPU (< 10 min):
    a 6-block, width-96 DiT on 16 tokens of 2x2 patches, 2000 steps of batch 64 (~70 epochs).

    Paper settings kept: uniform p(t), mask ratio 0.25, layers 0.3/0.7 of depth, gamma 0.8,
    AdamW, clip 1.0, label dropout 0.1. Changed for a run of a few thousand steps: lr 1e-3
    with warm-up (1e-4 assumes ~1M steps) and EMA decay 0.999 with warm-up (0.9999 averages
    over ~10k steps, longer than the whole run).
    """
    return TrainerConfig(
        modalities={"image": ModalitySpec(
            modality=ImageModality.Config(patch=2, size=8, channels=1, classes=10),
            store="data/digits.zarr", source="digits", batch_size=64,
            scheduler=DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25))},
        backbone=DiT.Config(depth=6, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=100, steps=50, method="heun", cfg_scale=2.0),
        steps=2000, run_dir="runs/digits", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks)."""
    base = default()
    spec = attrs.evolve(base.modalities["image"], batch_size=16, store="data/digits-tiny.zarr")
    return attrs.evolve(
        base, modalities={"image": spec}, backbone=DiT.Config(depth=4, width=32, heads=4),
        teacher=EMATeacher.Config(decay=0.9, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=5), steps=20, log_every=5,
        checkpoint=CheckpointConfig(every=10, keep=2),
        sampling=SamplingConfig(count=20, steps=5), run_dir="runs/digits-tiny")

