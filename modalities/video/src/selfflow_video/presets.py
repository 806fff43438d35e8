"""Video presets: class-conditional moving digits (the default run) and a tiny one for tests."""

from __future__ import annotations

from selfflow_core import (
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    LogitNormal,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
    shrink,
)
from selfflow_video.adapter import VideoModality


def default() -> TrainerConfig:
    """Class-conditional Self-Flow on 2048 moving-digit clips (8 frames of 16x16, 2x4x4 tubes:
    64 tokens of 32 channels) with a 4x96 DiT, sized for a 2-core CPU: 1000 steps of batch 32
    took ~0.3-0.9 s each on a busy shared 2-core machine (one torch thread), i.e. 5-15 minutes.
    One 10-px digit per clip, of the labelled class, so that the label decides the content and
    class-conditional samples can be checked by eye after a short run (the adapter's default is
    two 8-px digits, Moving-MNIST style). After 600-1000 steps samples are blurry moving
    digit-like shapes; crisp digits need several thousand steps.

    Paper settings kept (App. A.3): mask ratio 0.1 for video; logit-normal p(t) with shift 2.95 and
    5 % of draws from U[0.95, 1] (the low-SNR tail); a conditioning first frame (with
    ``condition_first_frame``, image-to-video) noise-augmented at t ~ U[0, 0.2] (App. E/F); layers
    0.3/0.7 of depth; gamma 0.8; AdamW, clip 1.0, label dropout 0.1. Changed for a run of 1k steps:
    lr 1e-3 with warm-up and cosine decay (1e-4 assumes ~600k steps) and an EMA teacher of decay
    0.999 with warm-up (0.9999 averages over ~10k steps, longer than the whole run); samples come
    from an evaluation EMA of the same decay 0.999 with warm-up, for the same reason (for Self-Flow
    the teacher's very weights; a vanilla or DTS run gets the same average). Sampling uses shift
    2.95 like training (the paper's 15.0 is for WAN2.2 latents at 192p) and Heun with CFG 2.
    """
    return TrainerConfig(
        modalities={"video": ModalitySpec(
            modality=VideoModality.Config(size=16, frames=8, patch=4, temporal_patch=2,
                                          classes=10, count=2048, digits=1, digit_size=10),
            store="data/moving-digits.zarr", source="moving_digits", batch_size=32,
            scheduler=DualTimestep.Config(
                distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                mask_ratio=0.1, condition_noise=0.2))},
        backbone=DiT.Config(depth=4, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,  # as the teacher's (1k steps << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=20, steps=40, method="heun", cfg_scale=2.0, shift=2.95),
        steps=1000, run_dir="runs/video", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 256 clips, a 4x32 DiT."""
    return shrink(default(), run_dir="runs/video-tiny",
                  stores={"video": "data/moving-digits-tiny.zarr"},
                  modality={"video": {"count": 256}})
