"""Robotics presets: the default Reacher policy run (~410 CPU-seconds on one thread), the world
model run (``robotics_world``: future frames and actions from the current frame), the
instruction-following world model (``robotics_language``: the same from the frame and an
instruction naming the target) and a tiny twin of each."""

from __future__ import annotations

from selfflow_core import (
    ByteTextEncoder,
    CheckpointConfig,
    DiT,
    DualTimestep,
    EMATeacher,
    JsonlTracker,
    MMDiT,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
    Uniform,
    shrink,
)
from selfflow_robotics.adapter import RoboticsModality
from selfflow_robotics.language import RoboticsLanguageModality
from selfflow_robotics.world import RoboticsWorldModality

#: the paper gives no mask ratio for robotics; 0.25 (its image and audio value) is our choice
MASK_RATIO = 0.25
#: the world model: sampling time shift (as its training p(t)) and training steps
WORLD_SHIFT = 2.95
WORLD_STEPS = 1500


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


def world() -> TrainerConfig:
    """The world model (paper App. E) for Reacher-v5: from the current 16x16 frame, generate the
    frames 4 and 8 steps ahead and the 8 actions that lead there, jointly in one sequence (16 +
    32 frame-patch tokens of 4x4 pixels, 8 action tokens), from 200 scripted-expert episodes
    (10 000 samples), sized for a 2-core CPU: 1500 steps of batch 64 with a 4x96 DiT took 608 s
    on a busy shared 2-core machine (2.5 it/s, one thread), about 5-10 minutes.

    Paper settings kept: actions and frames share the noise timesteps (the ordinary
    dual-timestep plan); the conditioning frame is noise-augmented with t ~ U[0, 0.2]
    (``condition_noise = 0.2``); actions quantile-normalised (1..99 % -> [-1, 1]); the
    video's schedule (logit-normal p(t), shift 2.95, 5 % low-SNR tail; mask ratio 0.1, the
    paper's video ratio: frame patches are most of the sequence); layers 0.3/0.7 of depth,
    gamma 0.8, AdamW, clip 1.0, EMA teacher; sampling at the training shift 2.95 with the
    conditioning frame fed clean (``condition_t = 0``, inside the training range [0, 0.2]).

    Different from the paper, for a short CPU run: pixels as latents (no FLUX.2 / WAN2.2
    autoencoder), 3 frames instead of 1 + 49 and 8 actions instead of 6, a 4x96 DiT trained
    from scratch (not fine-tuned from a 625M video model for 100K steps), lr 1e-3 with
    warm-up and cosine decay, EMA decay 0.995 with warm-up for the teacher and the
    evaluation EMA (0.9999 averages over ~10k steps, longer than the run), 10 Euler steps.

    Measured (``selfflow-robotics-eval``, 500 held-out states, 50 rollouts, execute 4 of 8):
    generated frames vs the simulator's after the generated actions MSE 0.034 (20.7 dB), vs
    the expert's frames 0.029 (21.4 dB), the still-frame baseline 0.037 (20.4 dB); action MSE
    0.048 (random 2.31); closed loop 0 % success, 2 % near, return -12.6 (expert 100 %, -4.63;
    random 0 %, -43.0). So this short run learns to carry the frame forward and a little of
    the motion, but its actions do not depend on the frame yet (at high noise its action
    estimate is uncorrelated with the truth) and the arm barely moves: reading the target from
    pixels needs far longer training than the state-conditioned ``robotics`` policy (76 %).
    With ``steps=5000`` the actions do follow the frame (frame MSE 0.018 sim / 0.012 gt,
    action MSE 0.039), but the closed loop reaches only 2 % success (10 % near).
    """
    modality = RoboticsWorldModality.Config(task="reacher", episodes=200, horizon=8,
                                            future_frames=2, frame_size=16, patch=4)
    return TrainerConfig(
        modalities={"robotics_world": ModalitySpec(
            modality=modality, store="data/reacher-world.zarr", source="expert",
            batch_size=64, scheduler=modality.default_scheduler())},
        backbone=DiT.Config(depth=4, width=96, heads=4),
        teacher=EMATeacher.Config(decay=0.995, warmup=True),
        eval_ema_decay=0.995, eval_ema_warmup=True,  # as the teacher's (short run << 10k)
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05),
        checkpoint=CheckpointConfig(every=500, keep=2),
        sampling=SamplingConfig(count=8, steps=10, method="euler", shift=WORLD_SHIFT,
                                condition_t=0.0),
        tracker=JsonlTracker.Config(),
        steps=WORLD_STEPS, run_dir="runs/reacher-world", log_every=50,
    )


def world_debug_tiny() -> TrainerConfig:
    """A few-second run of the world-model recipe (tests, smoke checks): 6 episodes, chunks of
    4 actions with one future frame (4 steps ahead), the shrunk 4x32 DiT, 40 steps; the same
    schedule, noise augmentation and sampling shift as ``robotics_world``."""
    return shrink(world(), run_dir="runs/reacher-world-tiny",
                  stores={"robotics_world": "data/reacher-world-tiny.zarr"},
                  modality={"robotics_world": {"episodes": 6, "horizon": 4,
                                               "future_frames": 1}},
                  batch_size=32, steps=40, lr=2e-3, samples=4, sample_steps=4)


#: the instructions of held-out episodes 0-7 (``RoboticsLanguageModality.evaluation_prompts(8)``
#: at seed 0): the trainer's sample ``i`` shows episode ``i``'s reset frame with prompt ``i``
LANGUAGE_PROMPTS = ("reach the dim square target at the bottom", "reach the bright round target",
                    "reach the target in the centre", "reach the dim square target in the centre",
                    "reach the dim square target", "reach the target at the top right",
                    "reach the dim square target in the centre", "reach the dim square target")
#: training steps of the instruction-following world model
LANGUAGE_STEPS = 1500


def language() -> TrainerConfig:
    """The world model of :func:`world` following instructions: the frames also show a
    distractor marker (another look, another region of the 3x3 grid, at least 0.1 m from the
    target), and each sample carries 4 instructions naming the simulator's target by its look,
    its region or both (``reach the bright round target at the top left``), read through the
    byte-level text encoder (captions of at most 59 bytes) by a FLUX-style MMDiT (1 double + 3
    single blocks, width 96, 4 heads, RoPE over ``(t, row, col)`` with ``axes_dim = (8, 8,
    8)``). The looks are a fair coin per episode, so only the instruction says which marker is
    real. Otherwise the world model's recipe: 200 episodes, frames at steps 0, 4 and 8, the
    video-like schedule with the conditioning frame noise-augmented at t ~ U[0, 0.2], batch 64,
    lr 1e-3 with warm-up and cosine decay, EMA decay 0.995 with warm-up; caption dropout 0.1
    and guidance 2 against the empty prompt. The trainer scores its samples
    (``sampling.evaluate``: one chunk executed from each held-out reset state); ``selfflow
    evaluate`` does the same for 40 held-out episodes, ``selfflow-robotics-eval`` runs the
    closed loop following instructions (success against the simulator's target, and the
    fraction of episodes ending nearer the named target than the distractor: chance 0.5).

    Measured (1500 steps in 2889 s at 0.3-0.5 it/s, one thread at low priority on a shared
    2-core machine at load 2.5-7.6; final loss 0.057): ``selfflow-robotics-eval`` at the
    defaults (50 rollouts, execute 4 of 8, Euler 10 steps, guidance 2): 0 % success, 4 % near,
    return -12.4, follow 0.44 (arm held still 0.38 on the same episodes; expert 1.00, expert
    sent to the distractor 0.00); ``selfflow evaluate`` (40 held-out prompts): chunk follow
    0.575 (expert's chunks 0.92, sent to the distractor 0.17). As with ``robotics_world`` at
    this budget, the generated actions hardly depend on the conditioning yet (the arm barely
    moves), so neither the frame nor the instruction is followed: no language following is
    measurable after 1500 steps.
    """
    modality = RoboticsLanguageModality.Config(task="reacher", episodes=200, horizon=8,
                                               future_frames=2, frame_size=16, patch=4,
                                               captions=4)
    return TrainerConfig(
        modalities={"robotics_language": ModalitySpec(
            modality=modality, store="data/reacher-language.zarr", source="expert",
            batch_size=64, scheduler=modality.default_scheduler())},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=3, width=96, heads=4,
                              axes_dim=(8, 8, 8)),
        text_encoder=ByteTextEncoder.Config(max_length=60),
        teacher=EMATeacher.Config(decay=0.995, warmup=True),
        eval_ema_decay=0.995, eval_ema_warmup=True,
        optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05),
        checkpoint=CheckpointConfig(every=500, keep=2),
        sampling=SamplingConfig(count=len(LANGUAGE_PROMPTS), steps=10, method="euler",
                                shift=WORLD_SHIFT, condition_t=0.0, cfg_scale=2.0,
                                prompts=LANGUAGE_PROMPTS, evaluate=True),
        tracker=JsonlTracker.Config(),
        steps=LANGUAGE_STEPS, run_dir="runs/reacher-language", log_every=50,
    )


def language_debug_tiny() -> TrainerConfig:
    """A few-second run of the instruction-following recipe (tests, smoke checks): 6 episodes,
    chunks of 4 actions with one future frame, a small MMDiT (1 double + 2 single blocks, width
    32), 40 steps, 4 samples scored as the full preset's."""
    return shrink(language(), run_dir="runs/reacher-language-tiny",
                  stores={"robotics_language": "data/reacher-language-tiny.zarr"},
                  modality={"robotics_language": {"episodes": 6, "horizon": 4,
                                                  "future_frames": 1}},
                  batch_size=32, steps=40, lr=2e-3, samples=4, sample_steps=4,
                  backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=32, heads=4,
                                        axes_dim=(2, 2, 4)))
