"""Video presets: class-conditional moving digits (the default run), text to video on moving
digits (``t2v_digits``, one digit; ``t2v_two_digits``, two), and a tiny twin of each for
tests."""

from __future__ import annotations

import attrs

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


#: the prompts the trainer samples: 8 of the 10 digits, each of the 8 directions once, in
#: several of the caption templates
T2V_PROMPTS = ("a 3 moving to the left", "the digit 7 bouncing up and right", "a 0 moving down",
               "a handwritten five drifting toward the bottom left", "digit 2 heading up",
               "the number eight sliding right", "a 6 moving up and to the left",
               "a 9 moving down and right")


def t2v_digits() -> TrainerConfig:
    """Text to video: Self-Flow on 2048 moving-digit clips (8 frames of 16x16, one 10-px digit
    moving along one of 8 compass directions, ``motion = "compass"``; 2x4x4 tubes: 64 tokens of
    32 channels), each with 4 captions naming the digit and the direction it moves in (``a 3
    moving to the left``, ``the digit 7 bouncing up and right``, ...), conditioned on one
    caption per step through the byte-level text encoder (captions cut at 56 bytes; the longest
    one-digit caption has 52) and a FLUX-style MMDiT (1 double + 3 single blocks, width 64,
    4 heads, RoPE over ``(t, row, col)`` with ``axes_dim = (4, 6, 6)``). No class labels
    (``classes = 0``): the prompt alone says which digit and which way. Sized for a 2-core CPU:
    1000 steps of batch 32 ran at 1.3 steps/s (one torch thread, at low priority on a busy
    shared 2-core machine): 13 minutes, less on an idle one. ``selfflow evaluate
    runs/t2v-digits`` scores samples of ``a {digit} moving {direction}`` prompts with the fixed
    evaluator (digit accuracy per frame, direction accuracy of the intensity centroid, class
    flips between frames); the trainer's own samples are scored as well
    (``sampling.evaluate``; the evaluator's classifier is trained once, ~1 min, and cached).
    After the 1000 steps (80 evaluation prompts): ``direction_acc`` 0.74 (chance 0.125),
    ``digit_acc`` 0.12 (chance 0.1), ``class_flips`` 0.68: blobs that move the prompted way;
    legible digits need several thousand steps, as with the class-conditional preset.

    Paper settings kept (App. A.2-A.3, the video modality's default scheduler): mask ratio 0.1;
    logit-normal p(t) with shift 2.95 and 5 % of draws from U[0.95, 1]; layers 0.3/0.7 of depth,
    gamma 0.8; AdamW, clip 1.0; caption dropout 0.1 and guidance against the empty prompt.
    Changed for a run of 1k steps: lr 1e-3 with warm-up and cosine decay (1e-4 assumes ~600k
    steps) and EMA decay 0.999 with warm-up for the teacher and the evaluation EMA (0.9999
    averages over ~10k steps, longer than the whole run); a tiny MMDiT instead of the paper's
    ~625M one; sampling with shift 2.95 like training (the paper's 15.0 is for WAN2.2 latents at
    192p), Heun and guidance 3. First-frame conditioning (image + prompt -> video) is off here
    (text alone makes the clip); set ``condition_first_frame = true`` with ``temporal_patch =
    1`` to give a first frame too.
    """
    return TrainerConfig(
        modalities={"video": ModalitySpec(
            modality=VideoModality.Config(size=16, frames=8, patch=4, temporal_patch=2,
                                          classes=0, count=2048, digits=1, digit_size=10,
                                          motion="compass", captions=4),
            store="data/t2v-digits.zarr", source="moving_digits", batch_size=32,
            scheduler=DualTimestep.Config(
                distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                mask_ratio=0.1, condition_noise=0.2))},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=3, width=64, heads=4,
                              axes_dim=(4, 6, 6)),
        text_encoder=ByteTextEncoder.Config(max_length=56),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=16, steps=40, method="heun", cfg_scale=3.0, shift=2.95,
                                prompts=T2V_PROMPTS, evaluate=True),
        steps=1000, run_dir="runs/t2v-digits", log_every=50,
    )


def t2v_digits_debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 256 clips, a small MMDiT, and
    no scoring of the samples (the evaluator's classifier takes ~1 min to train the first
    time; ``selfflow evaluate`` still scores the run)."""
    tiny = shrink(t2v_digits(), run_dir="runs/t2v-digits-tiny",
                  stores={"video": "data/t2v-digits-tiny.zarr"},
                  modality={"video": {"count": 256}}, samples=8,
                  backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=32, heads=4,
                                        axes_dim=(2, 2, 4)))
    return attrs.evolve(tiny, sampling=attrs.evolve(tiny.sampling, evaluate=False))


#: the prompts the two-digit preset samples: two different digits each, every direction once
#: for the first digit and once for the second, in several caption templates and both joiners
T2V_TWO_PROMPTS = ("a 3 moving to the left and a 7 moving up",
                   "the digit 0 bouncing down while a 5 moving right",
                   "a handwritten two drifting up and right and an 8 moving down and left",
                   "a 6 moving up and to the left while the digit 1 bouncing down and right",
                   "digit 4 heading right and a 9 moving to the left",
                   "a 7 moving upward and the digit 2 bouncing down",
                   "the number five sliding toward the bottom left while a 0 moving up and right",
                   "a 1 moving down and right and a 3 moving up and to the left")


def t2v_two_digits() -> TrainerConfig:
    """Text to video with two digits per clip: the recipe of :func:`t2v_digits` (same MMDiT,
    scheduler, optimiser, EMA and sampler), on 2048 clips of two 10-px digits, each moving
    along its own compass direction, with 4 captions each that name both digits, each one's
    direction and so which is which (``a 3 moving down and a 5 moving right``).

    Frames are 32x32, not 16x16: two 10-px digits on 16x16 overlap in every frame, so neither
    could be told apart (nor scored). On 32x32 the source still places the two digits
    independently, and they overlap in about a quarter of the frames (``overlap_frames`` on
    real clips); 2x4x4 tubes make 256 tokens of 32 channels. Captions are cut at 112 bytes
    (the longest two-digit caption has 111), so the MMDiT reads 112 text tokens. A step costs
    about 3x one of ``t2v_digits`` (2.8 s against 0.86 s over 25 steps of batch 32, setup
    included, one torch thread on a busy shared 2-core machine): the 1000 steps take ~45
    minutes there; no trained result is recorded yet.
    ``selfflow evaluate runs/t2v-two-digits`` scores samples of two-digit prompts (two
    different digits, two different directions) with :mod:`selfflow_video.two_digits`: each
    digit segmented, tracked and read by the one-digit evaluator's classifier
    (``digit_acc``, ``direction_acc``, ``binding_acc``: the digit moving each prompted way is
    the prompted one, ``class_flips`` per track, ``overlap_frames``); the trainer's own samples
    are scored as well. On real clips of the source (400, seed 0) these read 0.95, 0.85, 0.80,
    0.02 and 0.25: the ceiling (digits overlapping in the first frames leave some directions
    unmeasured); clips whose digits move in each other's directions score binding 0.
    """
    base = t2v_digits()
    spec = base.modalities["video"]
    return attrs.evolve(
        base,
        modalities={"video": attrs.evolve(
            spec, store="data/t2v-two-digits.zarr",
            modality=attrs.evolve(spec.modality, size=32, digits=2))},
        text_encoder=ByteTextEncoder.Config(max_length=112),
        sampling=attrs.evolve(base.sampling, prompts=T2V_TWO_PROMPTS),
        run_dir="runs/t2v-two-digits")


def t2v_two_digits_debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 256 clips, a small MMDiT,
    batches of 8 (a step reads 4x the tokens of :func:`t2v_digits_debug_tiny`'s), and no
    scoring of the samples (``selfflow evaluate`` still scores the run)."""
    tiny = shrink(t2v_two_digits(), run_dir="runs/t2v-two-digits-tiny",
                  stores={"video": "data/t2v-two-digits-tiny.zarr"},
                  modality={"video": {"count": 256}}, samples=8, batch_size=8,
                  backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=32, heads=4,
                                        axes_dim=(2, 2, 4)))
    return attrs.evolve(tiny, sampling=attrs.evolve(tiny.sampling, evaluate=False))
