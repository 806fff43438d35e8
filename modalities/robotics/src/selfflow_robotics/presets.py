"""Robotics presets: the default Reacher run (~410 CPU-seconds on one thread) and a tiny one."""

from __future__ import annotations

from selfflow_core import (
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    JsonlTracker,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
    Uniform,
    shrink,
)
from selfflow_robotics.adapter import RoboticsModality

#: the paper gives no mask ratio for robotics; 0.25 (its image and audio value) is our choice
MASK_RATIO = 0.25


def default() -> TrainerConfig:
    """A Self-Flow action-chunk policy for Reacher-v5 from 200 scripted-expert episodes
    (10 000 state/chunk samples), sized for a 2-core CPU: ~410 CPU-seconds on one thread, a few
    minutes on an idle machine. Evaluated (50 rollouts, execute 4 of 8): 76 % success (< 2 cm),
    return -5.15 (expert 100 %, -4.63; random 0 %, -43.0).

    Paper settings kept: uniform p(t), dual-timestep scheduling, layers 0.3/0.7 of depth,
    gamma 0.8, AdamW, clip 1.0, EMA teacher. Mask ratio 0.25: the paper gives none for robotics.
    Changed for a short run: lr 1e-3 with warm-up and cosine decay, EMA decay 0.995 with
    warm-up, for the teacher and for the evaluation EMA the policy is sampled from (the same
    weights as the teacher for Self-Flow, the same kind for a vanilla or DTS run; 0.9999 without
    warm-up would still hold ~80 % of the random initialisation at step 2000).
    """
    return TrainerConfig(
        modalities={"robotics": ModalitySpec(
            modality=RoboticsModality.Config(task="reacher", episodes=200, horizon=8),
            store="data/reacher.zarr", source="expert", batch_size=128,
            scheduler=DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=MASK_RATIO))},
        backbone=DiT.Config(depth=4, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.995, warmup=True),
        eval_ema_decay=0.995, eval_ema_warmup=True,  # as the teacher's (2k steps << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05),
        checkpoint=CheckpointConfig(every=500, keep=2),
        sampling=SamplingConfig(count=16, steps=10, method="euler"),
        tracker=JsonlTracker.Config(),  # aim is not a dependency of this plugin
        steps=2000, run_dir="runs/reacher", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe on 6 episodes (tests, smoke checks)."""
    return shrink(default(), run_dir="runs/reacher-tiny",
                  stores={"robotics": "data/reacher-tiny.zarr"},
                  modality={"robotics": {"episodes": 6, "horizon": 4, "state_chunk": 4}},
                  batch_size=32, steps=40, lr=2e-3, samples=4, sample_steps=4)
