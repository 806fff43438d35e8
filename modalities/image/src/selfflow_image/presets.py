"""Image presets: the default digits run (the main job) and a tiny one for tests."""

from __future__ import annotations

from selfflow_core import (
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
    Uniform,
    shrink,
)
from selfflow_image.adapter import ImageModality


def default() -> TrainerConfig:
    """Class-conditional Self-Flow on the bundled 8x8 digits, sized for a 2-core CPU (< 10 min):
    a 6-block, width-96 DiT on 16 tokens of 2x2 patches, 2000 steps of batch 64 (~70 epochs).

    Paper settings kept: uniform p(t), mask ratio 0.25, layers 0.3/0.7 of depth, gamma 0.8,
    AdamW, clip 1.0, label dropout 0.1. Changed for a run of a few thousand steps: lr 1e-3
    with warm-up (1e-4 assumes ~1M steps) and EMA decay 0.999 with warm-up (0.9999 averages
    over ~10k steps, longer than the whole run), for the teacher and for the evaluation EMA that
    samples come from (for Self-Flow the teacher's very weights; a vanilla or DTS run of this
    preset gets the same average; at step 2000 the warm-up's decay is still ~0.995).
    """
    return TrainerConfig(
        modalities={"image": ModalitySpec(
            modality=ImageModality.Config(patch=2, size=8, channels=1, classes=10),
            store="data/digits.zarr", source="digits", batch_size=64,
            scheduler=DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25))},
        backbone=DiT.Config(depth=6, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,  # as the teacher's (2k steps << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=200, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=100, steps=50, method="heun", cfg_scale=2.0),
        steps=2000, run_dir="runs/digits", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks)."""
    return shrink(default(), run_dir="runs/digits-tiny", stores={"image": "data/digits-tiny.zarr"},
                  samples=20)
