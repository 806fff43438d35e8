"""Turning a validated ``TrainerConfig`` into live objects (adapters, stores, model, optimizer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from selfflow_core.config import ConfigError, make_converter, to_data
from selfflow_core.interfaces import ModalityAdapter, TimestepScheduler
from selfflow_core.objective import SelfFlowObjective
from selfflow_core.plugins import Components
from selfflow_core.trainer_config import OptimConfig, TrainerConfig


@attrs.define
class ModalityRuntime:
    name: str
    spec: Any
    adapter: ModalityAdapter
    scheduler: TimestepScheduler
    id_offset: int


def check(config: TrainerConfig, components: Components, *, world_size: int = 1,
          source: str | None = None) -> None:
    """Registered kinds and cross-field rules; raises one :class:`ConfigError` with every
    problem (naming ``source``, the file or preset the config came from, when given)."""
    problems = config.problems(world_size=world_size)
    # a component config may check what its fields alone cannot (e.g. that a file exists):
    # ``problems() -> list[str]``, each "field: message"
    for path, component in (("teacher", config.teacher), ("backbone", config.backbone)):
        own = getattr(component, "problems", None)
        if callable(own):
            problems += [f"$.{path}.{p}" for p in own()]
    for name, spec in config.modalities.items():
        if spec.modality.kind not in components.modalities:
            problems.append(f"$.modalities.{name}.modality: unknown modality "
                            f"{spec.modality.kind!r}; "
                            f"installed: {components.modalities.describe()}")
    if problems:
        raise ConfigError(problems, source)


def build_modalities(config: TrainerConfig) -> list[ModalityRuntime]:
    out, offset = [], 0
    for name, spec in config.modalities.items():
        adapter = spec.modality.build()
        out.append(ModalityRuntime(name, spec, adapter, spec.scheduler.build(), offset))
        offset += len(token_dims(adapter))
    return out


def token_dims(adapter: ModalityAdapter) -> tuple[int, ...]:
    return tuple(getattr(adapter, "token_dims", (adapter.token_dim,)))


class StudentWithHead(nn.Module):
    """The trainable part (backbone + projection head) as one module, so DDP sees one forward."""

    def __init__(self, backbone: nn.Module, objective: SelfFlowObjective) -> None:
        super().__init__()
        self.backbone, self.objective = backbone, objective

    def forward(self, teacher, batch, plan, noise):
        return self.objective(self.backbone, teacher, batch, plan, noise)


def build_model(config: TrainerConfig, modalities: list[ModalityRuntime],
                teacher) -> StudentWithHead:
    dims = [d for m in modalities for d in token_dims(m.adapter)]
    classes = max(m.adapter.num_classes for m in modalities)
    backbone = config.backbone.build(token_dims=dims, num_classes=classes)
    target_width = getattr(teacher, "feature_dim", None)
    objective = SelfFlowObjective(config.objective, depth=backbone.depth, width=backbone.width,
                                  target_width=target_width)
    return StudentWithHead(backbone, objective)


def build_optimizer(cfg: OptimConfig, params, total_steps: int, device: torch.device):
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def config_data(config: TrainerConfig, components: Components) -> dict[str, Any]:
    return to_data(make_converter(components), config)


#: keys that may change between a checkpoint and the run resuming from it
RESUMABLE_CHANGES = {"steps", "run_dir", "log_every", "checkpoint", "sampling", "tracker",
                     "num_workers", "device", "compile", "activation_checkpointing",
                     "on_nonfinite", "max_skipped", "verify_stores"}


#: keys newer than some checkpoints, with the value that such a checkpoint's run had
ADDED_KEYS = {"parallel": "ddp"}


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if saved.get(k, ADDED_KEYS.get(k)) != current.get(k))


def store_path(spec) -> str:
    return str(Path(spec.store).expanduser()) if "://" not in spec.store else spec.store
