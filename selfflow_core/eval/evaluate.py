"""Prompt following, measured: ``selfflow evaluate CKPT``.

For every modality of a prompt-conditioned run whose adapter has a prompt evaluator
(:meth:`~selfflow_core.interfaces.ModalityAdapter.evaluation_prompts` /
:meth:`~selfflow_core.interfaces.ModalityAdapter.prompt_metrics`, e.g. the image modality's
OCR reader on held-out words), samples are drawn from the evaluation prompts with the run's
sampling settings (from the weights samples come from: the evaluation EMA by default) and
scored by the adapter's fixed evaluator.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from selfflow_core.errors import ConfigError
from selfflow_core.eval.samples import _load, find_checkpoint, generate, save, write_info
from selfflow_core.plugins.manager import Components

RESULTS_FILE = "evaluation.json"


def prompt_metrics(adapter, tokens: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """The adapter's metrics of generated ``tokens`` against their ``prompts``."""
    latents = adapter.detokenize(tokens).detach().cpu()
    return {k: float(v) for k, v in adapter.prompt_metrics(latents, list(prompts)).items()}


def evaluate_run(path: str | Path, components: Components, *, count: int = 40,
                 prompts: Sequence[str] | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int | None = None,
                 out_dir: str | Path | None = None, device: str = "cpu") -> dict:
    """``{"checkpoint", "step", "weights", "modalities": {name: {"prompts": n, metric: value}}}``
    for the run at ``path`` (see :func:`~selfflow_core.eval.samples.find_checkpoint`).
    ``prompts`` replace the adapters' evaluation prompts; ``out_dir`` also keeps the samples
    (with ``prompts.json``) and ``evaluation.json``."""
    path = find_checkpoint(path)
    config, modalities, model, info, text = _load(path, components, device)
    if text is None:
        raise ConfigError([f"the run of {path} is not prompt-conditioned (its config has no "
                           "text_encoder): there is nothing to evaluate prompts against"])
    changes = {k: v for k, v in dict(steps=steps, cfg_scale=cfg_scale, seed=seed).items()
               if v is not None}
    results = {}
    for m in modalities:
        chosen = list(prompts) if prompts else list(m.adapter.evaluation_prompts(count))
        if not chosen:
            continue
        sampling = attrs.evolve(config.sampling, prompts=tuple(chosen), count=len(chosen),
                                **changes)
        tokens, labels = generate(model, m, sampling, null_label=model.num_classes,
                                  device=torch.device(device), text=text)
        results[m.name] = {"prompts": len(chosen),
                           **prompt_metrics(m.adapter, tokens, chosen)}
        if out_dir is not None:
            save(m, tokens, labels, Path(out_dir) / m.name, chosen)
    if not results:
        raise ConfigError([f"no modality of the run of {path} has a prompt evaluator"])
    out = {"checkpoint": str(path), "step": info["step"], "weights": info["weights"],
           "modalities": results}
    if out_dir is not None:
        write_info(Path(out_dir), info)
        (Path(out_dir) / RESULTS_FILE).write_text(json.dumps(out, indent=2) + "\n",
                                                  encoding="utf-8")
    return out
