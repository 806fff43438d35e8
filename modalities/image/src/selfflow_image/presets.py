"""Image presets: the default digits run (the main job), text to image on rendered words
(``t2i_words``), and a tiny twin of each for tests."""

from __future__ import annotations

from selfflow_core import (
    ByteTextEncoder,
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    MMDiT,
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


#: the prompts the trainer samples: two training words ("cat", "moon") and two held-out ones
#: ("owl", "rain", never rendered for training), in two templates
T2I_PROMPTS = ('a sign that says "cat"', '"moon" in red letters', 'a sign that says "owl"',
               '"rain" in blue letters')


def t2i_words() -> TrainerConfig:
    """Text to image with legible text: Self-Flow on 4096 renders of 160 short words (32x32 RGB,
    4x4 patches: 64 tokens of 48 channels), each with 4 captions (``a sign that says "cat"``,
    ``"cat" in red letters``, ...), conditioned on one caption per step through the byte-level
    text encoder (captions cut at 40 bytes) and a FLUX-style MMDiT (1 double + 4 single blocks,
    width 64). Held-out words
    (40, never rendered for training) measure whether the model composes unseen words letter by
    letter: ``selfflow evaluate runs/t2i-words`` reads the samples with a fixed OCR reader.
    Measured (benchmarks/RESULTS.md): 2000 steps take ~20 minutes on a shared 2-core machine and
    learn the layout (background, a band of strokes) but not yet legible letters (OCR exact match
    0.00 on held-out words, ceiling 1.00); text rendering needs longer or larger runs.

    Paper settings kept: uniform p(t) (the paper's T2I), mask ratio 0.25, layers 0.3/0.7 of
    depth, gamma 0.8, AdamW, clip 1.0, caption dropout 0.1, guidance against the empty prompt.
    Changed for a 2-core CPU run of 2000 steps: lr 1e-3 with warm-up and cosine decay, EMA decay
    0.999 with warm-up for the teacher and the evaluation EMA (0.9999 averages over ~10k steps,
    longer than the run)."""
    return TrainerConfig(
        modalities={"image": ModalitySpec(
            modality=ImageModality.Config(size=32, channels=3, patch=4, classes=0, captions=4,
                                          count=4096),
            store="data/words.zarr", source="words", batch_size=32,
            scheduler=DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25))},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=4, width=64, heads=4,
                              axes_dim=(8, 8)),
        text_encoder=ByteTextEncoder.Config(max_length=40),
        teacher=EMATeacher.Config(decay=0.999, warmup=True),
        eval_ema_decay=0.999, eval_ema_warmup=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=200, schedule="cosine", min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=500, keep=3),
        sampling=SamplingConfig(count=16, steps=40, method="heun", cfg_scale=3.0,
                                prompts=T2I_PROMPTS),
        steps=2000, run_dir="runs/t2i-words", log_every=50,
    )


def t2i_words_debug_tiny() -> TrainerConfig:
    """A few-second run of the same recipe (tests, smoke checks): 256 renders, a small MMDiT."""
    return shrink(t2i_words(), run_dir="runs/t2i-words-tiny",
                  stores={"image": "data/words-tiny.zarr"}, modality={"image": {"count": 256}},
                  samples=4, backbone=MMDiT.Config(double_blocks=1, single_blocks=3, width=32,
                                                    heads=4, axes_dim=(4, 4)))
