"""Generating samples: one modality from a model (`write_samples`, used by the trainer), and from a
checkpoint: rebuild the run from the config stored inside, load the weights
(evaluation EMA, else the EMA teacher, else the raw student) and write samples."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch

from selfflow_core.config.converter import make_converter, structure
from selfflow_core.config.run import TrainerConfig
from selfflow_core.errors import CheckpointError
from selfflow_core.plugins.manager import Components
from selfflow_core.runtime import checkpoint
from selfflow_core.runtime.assembly import ModalityRuntime, build_modalities, build_model
from selfflow_core.sampling import sample


def load_for_sampling(path: str | Path, components: Components, device: str = "cpu"):
    """(config, modalities, model in eval mode) from a checkpoint."""
    state = checkpoint.load(Path(path))
    config = structure(make_converter(components), json.loads(state["config"]), TrainerConfig,
                       source=f"config stored in {path}")
    modalities = build_modalities(config)
    model = build_model(config, modalities, config.teacher.build()).backbone
    weights = (state["eval_ema"].get("model") or state["teacher"].get("model") or state["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # the weights are not of the model its own config describes
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model of its "
                              f"stored config ({first})") from None
    return config, modalities, model.to(device).eval()


def sample_checkpoint(path: str | Path, components: Components, *, out_dir: str | None = None,
                      count: int | None = None, steps: int | None = None, method: str | None = None,
                      cfg_scale: float | None = None, seed: int | None = None,
                      device: str = "cpu") -> list[Path]:
    """Write samples of every modality of the run; options left ``None`` keep the run's settings."""
    config, modalities, model = load_for_sampling(path, components, device)
    changes = {k: v for k, v in dict(count=count, steps=steps, method=method,
                                     cfg_scale=cfg_scale, seed=seed).items() if v is not None}
    sampling = attrs.evolve(config.sampling, **changes)
    out = Path(out_dir) if out_dir else Path(path).parent.parent / "samples" / Path(path).stem
    paths = []
    for m in modalities:
        paths += write_samples(model, m, sampling, out / m.name, null_label=model.num_classes,
                               device=torch.device(device))
    return paths


def generate(model, m: ModalityRuntime, cfg, *, null_label: int, device: torch.device,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cfg.count`` generated token sequences of one modality (classes cycled unless
    ``labels`` are given) and their labels. Under FSDP2 every rank must call it (the model is
    sharded); only one saves."""
    gen = torch.Generator(device).manual_seed(cfg.seed)
    prompt = m.adapter.prompt(cfg.count).to(device)
    prompt = attrs.evolve(prompt, modality_ids=prompt.modality_ids + m.id_offset)
    if m.adapter.num_classes and labels is None:
        labels = torch.arange(cfg.count, device=device) % m.adapter.num_classes
    if labels is not None:
        prompt = attrs.evolve(prompt, labels=labels.to(device))
    was_training = model.training
    model.eval()
    tokens = sample(model, prompt, steps=cfg.steps, method=cfg.method, shift=cfg.shift,
                    cfg_scale=cfg.cfg_scale, null_label=null_label, generator=gen)
    model.train(was_training)
    return tokens, labels


def save(m: ModalityRuntime, tokens: torch.Tensor, labels: torch.Tensor | None,
         out_dir: Path) -> list[Path]:
    """Decode generated tokens and write them with the modality's adapter; the files written."""
    return m.adapter.save_samples(m.adapter.detokenize(tokens).cpu(),
                                  None if labels is None else labels.cpu(), out_dir)


def write_samples(model, m: ModalityRuntime, cfg, out_dir: Path, *, null_label: int,
                  device: torch.device, labels: torch.Tensor | None = None) -> list[Path]:
    """:func:`generate` then :func:`save`."""
    tokens, labels = generate(model, m, cfg, null_label=null_label, device=device, labels=labels)
    return save(m, tokens, labels, out_dir)
