"""Audio presets: class-conditional spoken digits (the default run) and a tiny one for tests."""

from __future__ import annotations

from selfflow_audio.adapter import AudioModality
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

#: the spoken-digit variants of the tiny presets: 2 voices x 1 speed x 1 pitch (20 clips)
TINY_VOICES = {"voices": ("en-us", "en+f2"), "speeds": (175,), "pitches": (50,)}


def default() -> TrainerConfig:
    """Class-conditional Self-Flow on 320 espeak-ng spoken digits (8 voices x 2 speeds x 2
    pitches; ~1 s at 16 kHz -> 128 log-mel frames x 32 mels -> 64 tokens of 2 frames x 32 mels,
    64 channels like the paper's audio tokens) with a 4x96 DiT, sized for a 2-core CPU: 1000
    steps of batch 32 took ~0.4 s each on a busy shared 2-core machine (one torch thread), i.e.
    ~6 minutes; the first run also synthesises the clips with espeak-ng (~10 s, cached). After
    800 steps the spectrograms look like speech over clean silence. Keep the backbone width
    well above the token width: with 4-frame tokens (128 channels > width 96) the samples kept
    a noise floor however long they trained.

    Paper settings kept (App. A.3, B): mask ratio 0.5 for audio; logit-normal p(t) with
    trainshift 1.0 (Self-Flow's audio setting); layers 0.3/0.7 of depth; gamma 0.8; AdamW, clip
    1.0, label dropout 0.1. Changed for a run of 1k steps: lr 1e-3 with warm-up and cosine
    decay (1e-4 assumes ~350k steps) and an EMA teacher of decay 0.999 with warm-up (0.9999
    averages over ~10k steps, longer than the whole run); samples come from an evaluation EMA of
    the same decay 0.999 with warm-up, for the same reason (for Self-Flow the teacher's very
    weights; a vanilla or DTS run of this preset gets the same average). The paper's Songbloom
    latents and its sample shift 6.93 do not carry over to a tiny log-mel model: sampling uses
    shift 1.0, Heun, CFG 2; WAVs are decoded by Griffin-Lim.
    """
    return TrainerConfig(
        modalities={"audio": ModalitySpec(
            modality=AudioModality.Config(classes=10, frames_per_token=2),
            store="data/spoken-digits.zarr", source="spoken_digits", batch_size=32,
            scheduler=DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0),
                                          mask_ratio=0.5))},
        backbone=DiT.Config(depth=4, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,  # as the teacher's (1k steps << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=20, steps=40, method="heun", cfg_scale=2.0),
        steps=1000, run_dir="runs/audio", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 20 clips (2 voices), a 4x32
    DiT."""
    return shrink(default(), run_dir="runs/audio-tiny",
                  stores={"audio": "data/spoken-digits-tiny.zarr"},
                  modality={"audio": TINY_VOICES})
