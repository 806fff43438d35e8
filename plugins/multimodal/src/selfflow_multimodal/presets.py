"""``multimodal_tiny``: one composite Self-Flow run built from the installed modality plugins'
presets."""

from __future__ import annotations

import attrs

from selfflow_core import (
    CheckpointConfig,
    Components,
    ConfigError,
    DiT,
    EMATeacher,
    OptimConfig,
    SamplingConfig,
    TrainerConfig,
)

#: modality -> (its tiny preset, share of batches); paper App. D mixes image/video/audio 57/30/13 %
MULTIMODAL_PARTS = {"image": ("image_debug_tiny", 0.45), "video": ("video_debug_tiny", 0.25),
                    "audio": ("audio_debug_tiny", 0.15), "robotics": ("robotics_debug_tiny", 0.15)}


def multimodal_tiny() -> TrainerConfig:
    """Image + video + audio + robotics in one composite Self-Flow run on CPU (seconds per step).

    Each modality keeps its store, batch size and timestep scheduler (its mask ratio), gets a
    share of the batches, and all share one backbone with per-modality projections.
    """
    presets = Components().presets
    missing = [p for p, _ in MULTIMODAL_PARTS.values() if p not in presets]
    if missing:
        raise ConfigError([f"multimodal_tiny needs the presets {missing} of the image, video, "
                           f"audio and robotics plugins; installed presets: "
                           f"{presets.describe()}"], "preset 'multimodal_tiny'")
    modalities = {name: attrs.evolve(presets.get(preset)().modalities[name], probability=share)
                  for name, (preset, share) in MULTIMODAL_PARTS.items()}
    return TrainerConfig(
        modalities=modalities, backbone=DiT.Config(depth=4, width=64, heads=4),
        teacher=EMATeacher.Config(decay=0.99, warmup=True),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        checkpoint=CheckpointConfig(every=50, keep=2),
        sampling=SamplingConfig(count=10, steps=10),
        steps=60, run_dir="runs/multimodal-tiny", log_every=10)
