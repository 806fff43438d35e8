"""Audio-video presets: first-frame-conditioned joint generation of moving digits and their
spoken digit (the default run), video and audio together from one prompt (``t2av_digits``),
and a tiny twin of each for tests."""

from __future__ import annotations

import attrs
from selfflow_audio import AudioModality
from selfflow_audio.presets import TINY_VOICES
from selfflow_video import VideoModality

from selfflow_audio_video.adapter import AudioVideoModality
from selfflow_core import (
    ByteTextEncoder,
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    LogitNormal,
    MMDiT,
    ModalitySpec,
    OptimConfig,
    PerKindTimestep,
    SamplingConfig,
    TrainerConfig,
    shrink,
)


def per_kind_paper_schedule() -> PerKindTimestep.Config:
    """Each kind of token with its own modality's paper schedule: video tokens (id 0) mask
    ratio 0.1, logit-normal p(t) of shift 2.95 with a 5 % low-SNR tail, a conditioning frame at
    t ~ U[0, 0.2]; audio tokens (id 1) mask ratio 0.5, shift 1.0."""
    return PerKindTimestep.Config(kinds=(
        DualTimestep.Config(distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                            mask_ratio=0.1, condition_noise=0.2),
        DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0), mask_ratio=0.5)))


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
            scheduler=per_kind_paper_schedule())},
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


#: the prompts the trainer samples: 8 of the 10 digits, each of the 8 directions once, in
#: several of the video and spoken caption templates
T2AV_PROMPTS = ("a 4 bouncing to the left, and its name spoken",
                'the digit 7 bouncing up and right, and a voice saying "seven"',
                "a 0 moving down while its name is spoken",
                "a handwritten two drifting toward the bottom left, its name said aloud",
                'digit 9 heading up, with "nine" spoken',
                "the number five sliding right, and its name spoken",
                "a 3 moving up and to the left while its name is spoken",
                "an 8 moving down and right, and its name spoken")


def t2av_digits() -> TrainerConfig:
    """Text to audio-video: Self-Flow on 1280 pairs of a moving digit (8 frames of 16x16, one
    10-px digit moving along one of 8 compass directions, ``motion = "compass"``; 1x8x8 tubes:
    32 video tokens of 64 channels) and its name spoken by espeak-ng (8 voices x 2 speeds x 2
    pitches; 128 log-mel frames x 32 mels -> 64 audio tokens of 2 frames, 64 channels), both
    generated in one sequence from one caption, 4 per pair: a video caption of the digit and
    its direction with a spoken part appended (``a 4 bouncing to the left, and its name
    spoken``, ``the digit 7 bouncing up and right, and a voice saying "seven"``, ...; at most 80
    bytes, the text encoder's ``max_length``). The byte-level text encoder feeds a FLUX-style
    MMDiT (1 double + 3 single blocks, width 96, 4 heads, RoPE over ``(t, row, col)`` with
    ``axes_dim = (12, 6, 6)``: half of each head on the time axis, the one the two kinds
    share); no class labels (``classes = 0``) and no conditioning frame: the prompt alone says
    which digit, which way and what is heard. ``selfflow evaluate runs/t2av-digits`` scores
    samples of ``a {digit} moving {direction}, and its name spoken`` with the fixed evaluator
    (:mod:`selfflow_audio_video.evaluator`: the video's ``digit_acc`` / ``direction_acc`` /
    ``class_flips``, ``word_acc``, ``av_agreement`` of the word heard and the digit shown, and
    ``onset_in_clip``); the trainer's own samples are scored as well (``sampling.evaluate``;
    the two classifiers are trained once, ~2.5 min, and cached). Sized for a 2-core CPU: 1000
    steps of batch 32 ran at ~0.7 steps/s (one torch thread, load average ~3 on a busy shared
    2-core machine; 0.5 at load ~5.5): ~25 minutes, less on an idle one; the first run also
    synthesises the 320 spoken digits (~10 s, cached). Keep the backbone wider than the
    64-channel tokens (as :func:`default`).

    Paper settings kept (App. A.2-A.3, B, F): each kind of token with its own modality's
    schedule (``PerKindTimestep``, as :func:`default`): video tokens with mask ratio 0.1 and
    logit-normal p(t) of shift 2.95 with a 5 % low-SNR tail, audio tokens with mask ratio 0.5
    and shift 1.0, each kind drawing its own t and s; layers 0.3/0.7 of depth, gamma 0.8;
    AdamW, clip 1.0; caption dropout 0.1 and guidance against the empty prompt. Changed for a
    run of 1k steps: lr 1e-3 with warm-up and cosine decay (1e-4 assumes hundreds of thousands
    of steps) and EMA decay 0.999 with warm-up for the teacher and the evaluation EMA (0.9999
    averages over ~10k steps, longer than the whole run); a byte-level text encoder trained with
    the model instead of a frozen pretrained one (nothing is downloaded); a ~1M-parameter MMDiT
    instead of ~625M; pixels and log-mel latents instead of WAN2.2's and Songbloom's; sampling
    with shift 2.95 for the whole sequence (as :func:`default`; the paper's 15.0 and 6.93
    belong to its latents), Heun, 40 steps, guidance 3 (prompts condition more weakly than
    class labels); WAVs are decoded by Griffin-Lim.
    """
    modality = AudioVideoModality.Config(
        video=VideoModality.Config(size=16, frames=8, patch=8, temporal_patch=1,
                                   motion="compass"),
        audio=AudioModality.Config(frames_per_token=2), classes=0, count=1280, digits=1,
        digit_size=10, captions=4)
    return TrainerConfig(
        modalities={"audio_video": ModalitySpec(
            modality=modality, store="data/t2av-digits.zarr", source="moving_spoken_digits",
            batch_size=32, scheduler=per_kind_paper_schedule())},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=3, width=96, heads=4,
                              axes_dim=(12, 6, 6)),
        text_encoder=ByteTextEncoder.Config(max_length=80),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=16, steps=40, method="heun", cfg_scale=3.0, shift=2.95,
                                prompts=T2AV_PROMPTS, evaluate=True),
        steps=1000, run_dir="runs/t2av-digits", log_every=50,
    )


def t2av_digits_debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 80 pairs (every (digit,
    direction) pair once, 2 voices), a small MMDiT, and no scoring of the samples (the
    evaluator's classifiers take minutes to train the first time; ``selfflow evaluate`` still
    scores the run)."""
    tiny = shrink(t2av_digits(), run_dir="runs/t2av-digits-tiny",
                  stores={"audio_video": "data/t2av-digits-tiny.zarr"},
                  modality={"audio_video": {"count": 80, "audio": TINY_VOICES}}, samples=8,
                  backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=32, heads=4,
                                        axes_dim=(4, 2, 2)))
    return attrs.evolve(tiny, sampling=attrs.evolve(tiny.sampling, evaluate=False))
