"""The core's presets: a toy run that needs no modality plugin, and a composite run built from
the installed modality plugins' presets."""

import attrs

from selfflow_core.backbone import DiT
from selfflow_core.sampling import SamplingConfig
from selfflow_core.teachers import EMATeacher
from selfflow_core.toy import ToyModality
from selfflow_core.trainer_config import CheckpointConfig, ModalitySpec, OptimConfig, TrainerConfig


def toy() -> TrainerConfig:
    """200 Self-Flow steps on the toy waves (seconds on a CPU).

    Short-run settings: lr 1e-3 with 20 warm-up steps (1e-4 barely moves in 200 steps) and an
    EMA teacher of decay 0.99 with warm-up (0.9999 averages over ~10k steps: far longer than
    the run, so the teacher would stay at its random initialisation).
    """
    return TrainerConfig(
        modalities={"toy": ModalitySpec(modality=ToyModality.Config(), store="data/toy.zarr",
                                        source="waves", batch_size=32)},
        backbone=DiT.Config(depth=4, width=64, heads=4),
        teacher=EMATeacher.Config(decay=0.99, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=20),
        checkpoint=CheckpointConfig(every=100, keep=2),
        sampling=SamplingConfig(count=16, steps=20),
        steps=200, run_dir="runs/toy", log_every=20,
    )


#: modality -> (its tiny preset, share of batches); paper App. D mixes image/video/audio 57/30/13 %
MULTIMODAL_PARTS = {"image": ("image_debug_tiny", 0.45), "video": ("video_debug_tiny", 0.25),
                    "audio": ("audio_debug_tiny", 0.15), "robotics": ("robotics_debug_tiny", 0.15)}


def multimodal_tiny() -> TrainerConfig:
    """Image + video + audio + robotics in one composite Self-Flow run on CPU (seconds per step).

    Composed from the installed modality plugins' own ``*_debug_tiny`` presets (the core imports
    no plugin): each modality keeps its store, batch size and timestep scheduler (its mask ratio),
    gets a share of the batches, and all share one backbone with per-modality projections.
    """
    from selfflow_core.plugins import Components

    presets = Components().presets
    missing = [p for p, _ in MULTIMODAL_PARTS.values() if p not in presets]
    if missing:
        raise ValueError(f"multimodal_tiny needs the presets {missing} of the image, video, audio "
                         f"and robotics plugins; installed presets: {presets.describe()}")
    modalities = {name: attrs.evolve(presets.get(preset)().modalities[name], probability=share)
                  for name, (preset, share) in MULTIMODAL_PARTS.items()}
    return TrainerConfig(
        modalities=modalities, backbone=DiT.Config(depth=4, width=64, heads=4),
        teacher=EMATeacher.Config(decay=0.99, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        checkpoint=CheckpointConfig(every=50, keep=2),
        sampling=SamplingConfig(count=10, steps=10),
        steps=60, run_dir="runs/multimodal-tiny", log_every=10)
