"""Helpers for writing presets (functions ``() -> TrainerConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from selfflow_core.builtin.dit import DiT
from selfflow_core.config.run import CheckpointConfig, OptimConfig, TrainerConfig
from selfflow_core.sampling import SamplingConfig
from selfflow_core.teachers import EMATeacher

__all__ = ["shrink"]


def shrink(config: TrainerConfig, *, run_dir: str, stores: Mapping[str, str],
           modality: Mapping[str, Any] | None = None, batch_size: int = 16, steps: int = 20,
           lr: float = 1e-3, samples: int = 10, sample_steps: int = 5,
           **changes: Any) -> TrainerConfig:
    """The ``*_debug_tiny`` twin of a preset: the same recipe (modalities, schedulers, objective,
    sampler settings) at a size that trains in seconds on a CPU, for tests and smoke checks.

    Each modality gets its store from ``stores`` (a tiny store must not share the full one's
    path: the store records what it holds) and ``batch_size``; ``modality`` (name -> field
    changes) shrinks the data itself; a change given as a mapping to a field holding an attrs
    config changes that config's fields in turn (``{"video": {"frames": 4}}`` keeps the nested
    video config but for its frames). The run: a 4x32 DiT, an EMA teacher and an evaluation
    EMA of decay 0.9 with warm-up (a 20-step run would never leave 0.999's initial average; the
    same for both, so every method samples the teacher's kind of weights), ``lr`` with 5 warm-up
    steps, ``steps`` steps with a log line every quarter, a checkpoint at half-way and at the end,
    and ``samples`` samples of ``sample_steps`` steps (keeping the preset's shift,
    ``condition_t``, prompts and ``evaluate``). ``changes`` override any ``TrainerConfig``
    field (a prompt-conditioned preset passes a small text-reading ``backbone``).
    """
    modality = modality or {}
    unknown = sorted((set(stores) | set(modality)) - set(config.modalities))
    if unknown:
        raise ValueError(f"shrink: no modality {unknown} in the preset "
                         f"(it has {sorted(config.modalities)})")
    specs = {name: attrs.evolve(
        spec, batch_size=batch_size, store=stores.get(name, spec.store),
        modality=_evolve(spec.modality, modality.get(name, {})))
        for name, spec in config.modalities.items()}
    s = config.sampling
    run = dict(
        modalities=specs, backbone=DiT.Config(depth=4, width=32, heads=4),
        teacher=EMATeacher.Config(decay=0.9, warmup=True),
        optim=OptimConfig(lr=lr, warmup_steps=5), steps=steps, log_every=max(1, steps // 4),
        checkpoint=CheckpointConfig(every=max(1, steps // 2), keep=2),
        sampling=SamplingConfig(count=samples, steps=sample_steps, shift=s.shift,
                                condition_t=s.condition_t, prompts=s.prompts,
                                evaluate=s.evaluate),
        run_dir=run_dir, eval_ema_decay=0.9, eval_ema_warmup=True)
    return attrs.evolve(config, **{**run, **changes})


def _evolve(config: Any, changes: Mapping[str, Any]) -> Any:
    """``attrs.evolve(config, **changes)``, descending into nested attrs configs where a change
    is a mapping."""
    resolved = {}
    for key, value in changes.items():
        current = getattr(config, key, None)
        if isinstance(value, Mapping) and attrs.has(type(current)):
            value = _evolve(current, value)
        resolved[key] = value
    return attrs.evolve(config, **resolved)
