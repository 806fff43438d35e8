"""The optimizer and its learning-rate schedule: AdamW (fused on CUDA), linear warm-up, then
constant or cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math

import torch

from selfflow_core.config.run import OptimConfig

__all__ = ["build_optimizer"]


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

