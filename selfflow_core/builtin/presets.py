"""The core's preset: a toy run that needs no modality plugin."""


from selfflow_core import (
    CheckpointConfig,
    DiT,
    EMATeacher,
    ModalitySpec,
    OptimConfig,
    SamplingConfig,
    ToyModality,
    TrainerConfig,
)


def toy() -> TrainerConfig:
    """200 Self-Flow steps on the toy waves (seconds on a CPU).

    Short-run settings: lr 1e-3 with 20 warm-up steps (1e-4 barely moves in 200 steps) and an
    EMA teacher of decay 0.99 with warm-up (0.9999 averages over ~10k steps: far longer than
    the run, so the teacher would stay at its random initialisation). Samples come from the
    evaluation EMA, of the teacher's decay 0.99 with warm-up for the same reason (for Self-Flow
    the very weights of the teacher; vanilla or DTS runs of this preset get the same average).
    """
    return TrainerConfig(
        modalities={"toy": ModalitySpec(modality=ToyModality.Config(), store="data/toy.zarr",
                                        source="waves", batch_size=32)},
        backbone=DiT.Config(depth=4, width=64, heads=4),
        teacher=EMATeacher.Config(decay=0.99, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=20),
        checkpoint=CheckpointConfig(every=100, keep=2),
        sampling=SamplingConfig(count=16, steps=20),
        eval_ema_decay=0.99, eval_ema_warmup=True,  # 200 steps: 0.9999 would stay at the init
        steps=200, run_dir="runs/toy", log_every=20,
    )

