"""Every cross-field rule of a run config in one place, and what may differ on resume.

Single fields are checked when a config is structured (types, ranges: attrs validators and the
strict converter); :func:`validate` checks what needs several fields, the installed plugins, or
the number of processes, and raises one :class:`ConfigError` listing every problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfflow_core.config.converter import make_converter, to_data
from selfflow_core.config.run import TrainerConfig
from selfflow_core.errors import ConfigError
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.plugins.manager import Components
from selfflow_core.timesteps import PerKindTimestep

__all__ = ["ADDED_KEYS", "RESUMABLE_CHANGES", "config_data", "config_drift", "problems",
           "validate"]


def problems(config: TrainerConfig, components: Components, *, world_size: int = 1
             ) -> list[str]:
    """Everything wrong with ``config`` that no single field can tell, each with its path."""
    out = []
    depth = config.backbone.depth
    if depth is not None:
        try:
            config.objective.layers(depth)
        except ValueError as exc:
            out.append(f"$.objective: {exc}")
    if config.eval_ema_decay is not None and not 0 <= config.eval_ema_decay < 1:
        out.append(f"$.eval_ema_decay: must be in [0, 1): {config.eval_ema_decay}")
    # a component config may check what its fields alone cannot (e.g. that a file exists)
    for path, component in (("teacher", config.teacher), ("backbone", config.backbone)):
        out += [f"$.{path}.{p}" for p in component.problems()]
    if config.text_encoder is not None:
        out += [f"$.text_encoder.{p}" for p in config.text_encoder.problems()]
        if config.backbone.kind == "dit":
            out.append("$.backbone: the dit backbone has no text stream; a run with a "
                       "text_encoder needs one that reads prompts (kind 'mmdit')")
        if not config.sampling.prompts:
            out.append("$.sampling.prompts: a run with a text_encoder samples from prompts; "
                       "give at least one")
    for name, spec in config.modalities.items():
        where = f"$.modalities.{name}"
        per = spec.batch_size / (world_size * config.grad_accum)
        if per != int(per):
            out.append(f"{where}.batch_size: {spec.batch_size} is not divisible by "
                       f"world size {world_size} x grad_accum {config.grad_accum}")
        if spec.modality.kind not in components.modalities:
            out.append(f"{where}.modality: unknown modality {spec.modality.kind!r}; "
                       f"installed: {components.modalities.describe()}")
            continue
        own = spec.modality.problems()
        out += [f"{where}.modality.{p}" for p in own]
        if spec.source and not own:
            out += [f"{where}.source: {p}" for p in source_problems(spec.modality, spec.source)]
        if isinstance(spec.scheduler, PerKindTimestep.Config) and not own:
            groups = len(spec.modality.build().token_dims)
            if len(spec.scheduler.kinds) != groups:
                out.append(f"{where}.scheduler.kinds: {len(spec.scheduler.kinds)} schedulers for "
                           f"{groups} kind(s) of token of modality {spec.modality.kind!r} (one "
                           f"per entry of its token_dims, in order)")
    return out


def source_problems(modality: ModalityConfig, source: str) -> list[str]:
    """A ``source`` must be one of the modality's built-in sources (its catalog) or an existing
    path (a typo lists what exists)."""
    names = tuple(modality.build().sources())
    if source in names or Path(source).expanduser().exists():
        return []
    return [f"unknown source {source!r} of modality {modality.kind!r}: not a built-in source "
            f"({', '.join(names) or 'none'}) nor an existing file or folder"]


def validate(config: TrainerConfig, components: Components, *, world_size: int = 1,
             source: str | None = None) -> None:
    """Raise one :class:`ConfigError` with every problem of :func:`problems` (naming ``source``,
    the file or preset the config came from, when given)."""
    found = problems(config, components, world_size=world_size)
    if found:
        raise ConfigError(found, source)


def config_data(config: TrainerConfig, components: Components) -> dict[str, Any]:
    """The config as plain data: recorded in every checkpoint and logged as hyper-parameters."""
    return to_data(make_converter(components), config)


#: keys that may change between a checkpoint and the run resuming from it
RESUMABLE_CHANGES = {"steps", "run_dir", "log_every", "checkpoint", "sampling", "tracker",
                     "num_workers", "threads", "device", "compile", "activation_checkpointing",
                     "on_nonfinite", "max_skipped", "verify_stores", "verify_fraction",
                     # evaluation only: an EMA added on resume starts from the student
                     "eval_ema_decay", "eval_ema_warmup"}


#: keys newer than some checkpoints, with the value that such a checkpoint's run had
ADDED_KEYS = {"parallel": "ddp", "text_encoder": None, "caption_dropout": 0.1,
              "shuffle": {"kind": "full", "block_chunks": 1, "window_blocks": 256}}


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if saved.get(k, ADDED_KEYS.get(k)) != current.get(k))

