"""Audio-video presets: first-frame-conditioned joint generation of moving digits and their
spoken digit (the default run) and a tiny one for tests."""

from __future__ import annotations

from selfflow_audio import AudioModality
from selfflow_audio.presets import TINY_VOICES
from selfflow_video import VideoModality

from selfflow_audio_video.adapter import AudioVideoModality
from selfflow_core import (
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    LogitNormal,
    ModalitySpec,
    OptimConfig,
    PerKindTimestep,
    SamplingConfig,
    TrainerConfig,
    shrink,
)


def default() -> TrainerConfig:
    """Joint audio-video Self-Flow on 1000 pairs of a bouncing digit (8 frames of 16x16, 1x8x8
    tubes: 32 video tokens of 64 channels) and the spoken digit of its class (64 audio tokens of
    2 log-mel frames x 32 mels = 64 channels), class-conditional and conditioned on the first
    frame, as the paper's joint video-audio model is (App. F). Sized for a 2-core CPU: 1000
    steps of batch 32 with a 4x96 DiT (wider than either token, which matters: a token wider
    than the backbone leaves a noise floor in the samples) take about 5-15 minutes on a busy
    shared 2-core machine.

    Paper settings kept (App. B/C, F): each kind of token is planned with its own modality's
    settings (``PerKindTimestep``): video tokens with mask ratio 0.1 and logit-normal p(t) of shift
    2.95 with a 5 % low-SNR tail, audio tokens with mask ratio 0.5 and logit-normal p(t) of
    trainshift 1.0, each kind drawing its own t and s; the conditioning frame noise-augmented at t ~
    U[0, 0.2] in training and given clean (``condition_t = 0``, inside that range) at sampling;
    layers 0.3/0.7 of depth, gamma 0.8, AdamW, clip 1.0, label dropout 0.1. Changed for a run of 1k
    steps: lr 1e-3 with warm-up and cosine decay (1e-4 assumes hundreds of thousands of steps) and
    an EMA teacher of decay 0.999 with warm-up (0.9999 averages over ~10k steps, longer than the
    run); samples come from an evaluation EMA of the same decay 0.999 with warm-up, for the same
    reason (for Self-Flow the teacher's very weights; a vanilla or DTS run gets the same average).
    """
    modality = AudioVideoModality.Config(
        video=VideoModality.Config(size=16, frames=8, patch=8, temporal_patch=1,
                                   condition_first_frame=True),
        audio=AudioModality.Config(frames_per_token=2), classes=10, count=1000, digits=1,
        digit_size=10)
    return TrainerConfig(
        modalities={"audio_video": ModalitySpec(
            modality=modality, store="data/moving-spoken-digits.zarr",
            source="moving_spoken_digits", batch_size=32,
            scheduler=PerKindTimestep.Config(kinds=(
                DualTimestep.Config(distribution=LogitNormal.Config(shift=2.95,
                                                                    tail_fraction=0.05),
                                    mask_ratio=0.1, condition_noise=0.2),
                DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0),
                                    mask_ratio=0.5))))},
        backbone=DiT.Config(depth=4, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,  # as the teacher's (1k steps << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=10, steps=40, method="heun", cfg_scale=2.0, shift=2.95),
        steps=1000, run_dir="runs/audio-video", log_every=50,
    )


def debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 100 pairs, 2 voices, 4
    frames, a 4x32 DiT."""
    return shrink(default(), run_dir="runs/audio-video-tiny",
                  stores={"audio_video": "data/moving-spoken-digits-tiny.zarr"},
                  modality={"audio_video": {"count": 100, "video": {"frames": 4},
                                            "audio": TINY_VOICES}},
                  samples=4)
