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
from selfflow_image.words import WordsLook


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
#: ("owl", "rain", never rendered for training), in the preset's word-first templates
T2I_PROMPTS = ('"cat" on a sign', '"moon" in red letters', '"owl" on a sign',
               '"rain" in blue letters')

#: how the preset's words look: one DejaVu Sans Mono Bold letter (12 px) per 8-pixel cell, in
#: one of 8 named colours on solid black (light colours) or white, captioned by templates that
#: begin with the quoted word
T2I_LOOK = WordsLook(font="dejavu-sans-mono-bold", font_sizes=(12, 12), placement="grid",
                     gradients=False, background="black_or_white", templates="word_first")


def t2i_words() -> TrainerConfig:
    """Text to image with legible text: Self-Flow on 4096 renders of 160 short words (32x32 RGB,
    8x8 patches: 16 tokens of 192 values, each letter one column of tokens; :data:`T2I_LOOK`),
    each with 4 captions (``"cat" on a sign``, ``"cat" in red letters``, ...), conditioned on
    one caption per step through the byte-level text encoder (captions cut at 24 bytes, the
    longest template's length) and a FLUX-style MMDiT (3 double + 2 single blocks, width 128)
    that predicts clean tokens and adds absolute position embeddings to RoPE. Held-out words
    (40, never rendered for training) measure whether the model composes unseen words letter
    by letter: ``selfflow evaluate runs/t2i-words`` reads the samples with a fixed OCR reader.
    Measured in benchmarks/RESULTS.md ("Following the prompt").

    Paper settings kept: uniform p(t) (the paper's T2I), mask ratio 0.25, layers 0.3/0.7 of
    depth, gamma 0.8, AdamW, clip 1.0, caption dropout 0.1, guidance against the empty prompt.
    Changed for a 2-core CPU run of 2000 steps: lr 1e-3 with warm-up and cosine decay, EMA decay
    0.999 with warm-up for the teacher and the evaluation EMA (0.9999 averages over ~10k steps,
    longer than the run). What makes the prompt followed at this budget (each measured): solid
    black-or-white backgrounds (a random background colour is most of every image's loss and
    none of the prompt's), clean-token prediction (sharp glyphs), absolute positions (a latent
    token knows which letter of the word is its own) and captions that begin with the word
    (that letter is then always at the same byte)."""
    return TrainerConfig(
        modalities={"image": ModalitySpec(
            modality=ImageModality.Config(size=32, channels=3, patch=8, classes=0, captions=4,
                                          count=4096, words=T2I_LOOK),
            store="data/words.zarr", source="words", batch_size=32,
            scheduler=DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25))},
        backbone=MMDiT.Config(double_blocks=3, single_blocks=2, width=128, heads=4,
                              axes_dim=(16, 16), prediction="data", absolute_positions=True),
        text_encoder=ByteTextEncoder.Config(max_length=24),
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
                                                    heads=4, axes_dim=(4, 4), prediction="data",
                                                    absolute_positions=True))
