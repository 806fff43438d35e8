"""Audio presets: class-conditional spoken digits (the default run), text to speech on spoken
words (``t2a_words``), and a tiny twin of each for tests."""

from __future__ import annotations

from selfflow_audio.adapter import AudioModality
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


#: the prompts the trainer samples (2 clips each): two naming no attribute, one naming the
#: pitch, two (word, pitch, speed) triples ``spoken_words`` trains on ("three" slow and low,
#: "dog" fast and high) and three it holds out ("seven" fast and high, "cat" slow and low, "two"
#: slow and high: never spoken so, see :func:`~selfflow_audio.words.heldout_combination`)
T2A_PROMPTS = ('the word "seven"', 'someone saying "hello"', 'a high voice saying "cat"',
               '"three" said slowly by a low voice', '"dog" said quickly by a high voice',
               '"seven" said quickly by a high voice', '"cat" said slowly by a low voice',
               '"two" said slowly by a high voice')


def t2a_words() -> TrainerConfig:
    """Text to speech: Self-Flow on 1440 espeak-ng clips of 30 short words (the digits' names and
    20 others; ~1 s at 16 kHz -> 128 log-mel frames x 32 mels -> 64 tokens of 2 frames, 64
    channels, as :func:`default`), each word in a low or high voice, said slowly or fast, with 4
    captions per clip (``the word "cat"``, ``a high voice saying "dog"``, ``"seven" said slowly
    by a low voice``, ...), conditioned on one caption per step through the byte-level text
    encoder (``max_length`` 36, the longest caption) and a FLUX-style MMDiT (1 double + 2 single
    blocks, width 96, ~0.8M parameters; RoPE over the 1-D time axis: ``axes_dim=(24,)``), class
    labels off (``classes = 0``). Every word is trained on, but each word's one (pitch, speed)
    combination of four is held out (:mod:`selfflow_audio.words`); ``selfflow evaluate
    runs/t2a-words`` asks for those triples and scores the samples with the fixed evaluator
    (:mod:`selfflow_audio.evaluator`: ``word_acc``, ``pitch_acc``, ``speed_acc``).

    Sized for a 2-core CPU: 1000 steps of batch 32, the class-conditional preset's budget. On the
    busy shared 2-core machine it was sized on (one torch thread, load average ~3.5) a step took
    ~0.8 s (:func:`default`: ~0.3 s there), ~14 minutes in all; expect a few minutes on an idle
    machine, about half with ``batch_size = 16``. The first run also synthesises the clips with
    espeak-ng (~50 s there, cached). At this budget the samples are speech-like but do not yet
    follow the prompt's word (the README has the numbers): a sanity run of the recipe, not a
    result; prompt following needs a longer run.

    Paper settings kept (App. A.3, B, T2A): mask ratio 0.5 and logit-normal p(t) with trainshift
    1.0 (the audio default scheduler); layers 0.3/0.7 of depth; gamma 0.8; AdamW, clip 1.0;
    caption dropout 0.1 and guidance against the empty prompt. Changed for a short CPU run: lr
    1e-3 with warm-up and cosine decay (1e-4 assumes ~350k steps); an EMA teacher and evaluation
    EMA of decay 0.999 with warm-up (0.9999 averages over ~10k steps, longer than the whole run);
    a byte-level text encoder trained with the model instead of the paper's frozen pretrained
    one (nothing is downloaded); a ~0.8M-parameter MMDiT instead of ~625M; log-mel latents
    instead of Songbloom's; sampling with shift 1.0 (the paper's 6.93 belongs to its latents and
    resolution), Heun, 40 steps, CFG 3 (prompts condition more weakly than class labels); WAVs
    are decoded by Griffin-Lim.
    """
    return TrainerConfig(
        modalities={"audio": ModalitySpec(
            modality=AudioModality.Config(classes=0, frames_per_token=2, captions=4,
                                          count=1440),
            store="data/spoken-words.zarr", source="spoken_words", batch_size=32,
            scheduler=DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0),
                                          mask_ratio=0.5))},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=96, heads=4,
                              axes_dim=(24,)),
        text_encoder=ByteTextEncoder.Config(max_length=36),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=16, steps=40, method="heun", cfg_scale=3.0,
                                prompts=T2A_PROMPTS),
        steps=1000, run_dir="runs/t2a-words", log_every=50,
    )


def t2a_words_debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 90 clips (one per training
    triple), a 1+3-block MMDiT of width 32."""
    return shrink(t2a_words(), run_dir="runs/t2a-words-tiny",
                  stores={"audio": "data/spoken-words-tiny.zarr"},
                  modality={"audio": {"count": 90}}, samples=4,
                  backbone=MMDiT.Config(double_blocks=1, single_blocks=3, width=32, heads=4,
                                        axes_dim=(8,)))
