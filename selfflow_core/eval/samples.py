"""Generating samples: one modality from a model (`write_samples`, used by the trainer), and from a
checkpoint (or a run directory: its latest one): rebuild the run from the config stored inside,
load the weights (evaluation EMA, else the EMA teacher, else the raw student) and write samples to
a folder of their own.

Every method keeps an evaluation EMA by default (``TrainerConfig.eval_ema_decay``), so vanilla,
DTS, Self-Flow and REPA samples come from the same kind of weights. Each samples folder holds a
``sample_info.json`` (:func:`sample_info`) saying which weights they came from."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch

from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.config.run import TrainerConfig
from selfflow_core.errors import CheckpointError, ConfigError
from selfflow_core.interfaces import TeacherStrategy, TextEncoder, TextEncoding
from selfflow_core.objective import uses_representation
from selfflow_core.plugins.manager import Components
from selfflow_core.prompts import empty_encoding, with_text
from selfflow_core.runtime import checkpoint
from selfflow_core.runtime.assembly import ModalityRuntime, build_modalities, build_model
from selfflow_core.sampling import SamplingConfig, sample

#: the weights samples can come from (``sample_info.json``'s ``weights``), in order of preference,
#: in words
WEIGHTS = {"eval_ema": "evaluation EMA", "ema_teacher": "EMA teacher", "student": "raw student"}
#: the checkpoint entry of each averaged kind of weights
_STATE_KEYS = {"eval_ema": "eval_ema", "ema_teacher": "teacher"}
INFO_FILE = "sample_info.json"
#: each sample's prompt (prompt-conditioned runs), in the samples folder
PROMPTS_FILE = "prompts.json"


def method_of(config: TrainerConfig, teacher: TeacherStrategy) -> str:
    """The run's method: ``"vanilla"`` or ``"dts"`` without a representation loss (single or
    dual timesteps), ``"selfflow"`` with the EMA teacher's, else the teacher's kind (``"repa"``)."""
    if not uses_representation(config.objective, teacher):
        single = all(s.scheduler.kind == "single" for s in config.modalities.values())
        return "vanilla" if single else "dts"
    return "selfflow" if config.teacher.kind == "ema" else config.teacher.kind


def sample_info(config: TrainerConfig, teacher: TeacherStrategy, weights: str, *, step: int,
                updates: int | None, sampling: SamplingConfig,
                checkpoint: Path | None = None) -> dict:
    """What ``sample_info.json`` records: ``weights`` (a key of :data:`WEIGHTS`), their
    ``decay``, ``warmup`` and number of EMA ``updates`` (None for the raw student), the training
    ``step``, the run's ``method`` (:func:`method_of`), the ``sampling`` settings (every field of
    :class:`SamplingConfig`: the sampler's ``method``, ``steps``, ``shift``, ``cfg_scale``,
    ``condition_t``, ``sde_last_step``, ``sde_diffusion_norm``, ...) and the ``checkpoint`` read
    (None: the trainer's own model)."""
    decay, warmup = {"eval_ema": (config.eval_ema_decay, config.eval_ema_warmup),
                     "ema_teacher": (getattr(config.teacher, "decay", None),
                                     getattr(config.teacher, "warmup", None))
                     }.get(weights, (None, None))
    return {"weights": weights, "decay": decay, "warmup": warmup,
            "updates": updates if weights != "student" else None, "step": step,
            "method": method_of(config, teacher), "sampling": to_data(make_converter(), sampling),
            "checkpoint": None if checkpoint is None else str(checkpoint)}


def write_info(out_dir: Path, info: dict) -> Path:
    """``out_dir/sample_info.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INFO_FILE
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: a checkpoint (``step-N.pt`` or ``step-N.dcp``) as it is, a
    run directory or its ``checkpoints/`` folder for its latest one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file() or path.suffix == ".dcp":  # a file, or FSDP2's sharded folder
        return path
    for folder in (path / "checkpoints", path):
        found = checkpoint.latest(folder)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint in {path}: expected a run directory (with "
                          f"checkpoints/step-N.pt), its checkpoints/ folder or a checkpoint file")


def _load(path: Path, components: Components, device: str):
    state = checkpoint.load(path)
    config = structure(make_converter(components), json.loads(state["config"]), TrainerConfig,
                       source=f"config stored in {path}")
    text = config.text_encoder.build() if config.text_encoder is not None else None
    modalities = build_modalities(config, text)
    teacher = config.teacher.build()
    model = build_model(config, modalities, teacher,
                        text=text.spec() if text is not None else None).backbone
    which = next((w for w, key in _STATE_KEYS.items() if state.get(key, {}).get("model")),
                 "student")
    source = state[_STATE_KEYS[which]] if which != "student" else {"model": state["model"]}
    try:
        model.load_state_dict(source["model"])
    except RuntimeError as exc:  # the weights are not of the model its own config describes
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model of its "
                              f"stored config ({first})") from None
    step = int(state["step"])
    info = sample_info(config, teacher, which, step=step, updates=source.get("updates"),
                       sampling=config.sampling, checkpoint=path)
    return config, modalities, model.to(device).eval(), info, text


def load_for_sampling(path: str | Path, components: Components, device: str = "cpu"):
    """(config, modalities, model in eval mode) from a checkpoint (or a run directory: its latest
    one), with the evaluation EMA's weights, else the EMA teacher's, else the raw student's (as
    the trainer's own samples: :meth:`Trainer.eval_model`)."""
    return _load(find_checkpoint(path), components, device)[:3]


@attrs.frozen
class SampleResult:
    """What :func:`sample_run` did: the checkpoint and its step, which weights in words
    (``"evaluation EMA"``, ``"EMA teacher"`` or ``"raw student"``), the sampling settings used,
    the output folder, the files written and what its ``sample_info.json`` says (``info``)."""

    checkpoint: Path
    step: int
    weights: str
    sampling: SamplingConfig
    out_dir: Path
    paths: list[Path]
    info: dict = attrs.field(factory=dict)


def _fresh_dir(samples: Path, step: int) -> Path:
    """A new ``samples/sample-<step>-<n>/`` (the lowest free n), never a folder in use."""
    samples.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        out = samples / f"sample-{step:08d}-{n}"
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1


def _sampling(base: SamplingConfig, changes: dict) -> SamplingConfig:
    """``base`` with ``changes``, through the strict converter: a wrong value or type is a
    :class:`ConfigError` naming the option, not an attrs ``ValueError``."""
    conv = make_converter()
    return structure(conv, {**to_data(conv, base), **changes}, SamplingConfig,
                     source="sampling options")


def sample_run(path: str | Path, components: Components, *, out_dir: str | Path | None = None,
               count: int | None = None, steps: int | None = None, method: str | None = None,
               cfg_scale: float | None = None, seed: int | None = None,
               condition_t: float | None = None, sde_last_step: float | None = None,
               sde_diffusion_norm: float | None = None, prompts: list[str] | None = None,
               device: str = "cpu") -> SampleResult:
    """Write samples of every modality of a run from a checkpoint (``path``: see
    :func:`find_checkpoint`); options left ``None`` keep the run's settings. Without ``out_dir``
    the files go to a new ``<run_dir>/samples/sample-<step>-<n>/``, so the training's own samples
    (``samples/step-N/``) and earlier calls' are never overwritten."""
    changes = {k: v for k, v in dict(count=count, steps=steps, method=method,
                                     cfg_scale=cfg_scale, seed=seed, condition_t=condition_t,
                                     sde_last_step=sde_last_step,
                                     sde_diffusion_norm=sde_diffusion_norm,
                                     prompts=list(prompts) if prompts else None).items()
               if v is not None}
    _sampling(SamplingConfig(), changes)  # a bad option is refused before anything is loaded
    if prompts and "count" not in changes:
        changes["count"] = len(prompts)  # one sample per prompt given
    path = find_checkpoint(path)
    config, modalities, model, info, text = _load(path, components, device)
    if prompts and text is None:
        raise ConfigError([f"prompts: the run of {path} is not prompt-conditioned (its config "
                           "has no text_encoder); sample it without prompts"])
    step, sampling = info["step"], _sampling(config.sampling, changes)
    info = {**info, "sampling": to_data(make_converter(), sampling)}
    # <run_dir>/checkpoints/step-N.pt; a checkpoint elsewhere gets samples/ beside it
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(out_dir) if out_dir else _fresh_dir(run_dir / "samples", step)
    paths = []
    try:
        for m in modalities:
            paths += write_samples(model, m, sampling, out / m.name, null_label=model.num_classes,
                                   device=torch.device(device), text=text)
    except BaseException:
        if not out_dir and not any(out.iterdir()):
            out.rmdir()  # no empty folder left by a failed (or interrupted) call
        raise
    write_info(out, info)
    return SampleResult(path, step, WEIGHTS[info["weights"]], sampling, out, paths, info)


def sample_checkpoint(path: str | Path, components: Components, *, out_dir: str | None = None,
                      count: int | None = None, steps: int | None = None, method: str | None = None,
                      cfg_scale: float | None = None, seed: int | None = None,
                      condition_t: float | None = None, sde_last_step: float | None = None,
                      sde_diffusion_norm: float | None = None, prompts: list[str] | None = None,
                      device: str = "cpu") -> list[Path]:
    """:func:`sample_run`'s files: samples of every modality of the run; options left ``None``
    keep the run's settings."""
    return sample_run(path, components, out_dir=out_dir, count=count, steps=steps, method=method,
                      cfg_scale=cfg_scale, seed=seed, condition_t=condition_t,
                      sde_last_step=sde_last_step, sde_diffusion_norm=sde_diffusion_norm,
                      prompts=prompts, device=device).paths


def prompt_list(cfg: SamplingConfig) -> list[str]:
    """The prompt of each of ``cfg.count`` samples: ``cfg.prompts`` cycled."""
    return [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.count)] if cfg.prompts else []


def generate(model, m: ModalityRuntime, cfg: SamplingConfig, *, null_label: int,
             device: torch.device, labels: torch.Tensor | None = None,
             text: TextEncoder | None = None, empty_text: TextEncoding | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``cfg.count`` generated token sequences of one modality (classes cycled unless
    ``labels`` are given; with the run's ``text`` encoder, ``cfg.prompts`` cycled, guided
    against ``empty_text``, by default the encoder's encoding of ``""``) and their labels, drawn
    with every setting of ``cfg`` (method, steps, shift, guidance, ``condition_t`` and the
    SDE's). Under FSDP2 every rank must call it (the model is sharded); only one saves."""
    gen = torch.Generator(device).manual_seed(cfg.seed)
    prompt = m.adapter.prompt(cfg.count).to(device)
    prompt = attrs.evolve(prompt, modality_ids=prompt.modality_ids + m.id_offset)
    if m.adapter.num_classes and labels is None:
        labels = torch.arange(cfg.count, device=device) % m.adapter.num_classes
    if labels is not None:
        prompt = attrs.evolve(prompt, labels=labels.to(device))
    if text is not None:
        prompt = with_text(prompt, text.encode(prompt_list(cfg)))
        empty_text = empty_text if empty_text is not None else empty_encoding(text)
    was_training = model.training
    model.eval()
    tokens = sample(model, prompt, steps=cfg.steps, method=cfg.method, shift=cfg.shift,
                    cfg_scale=cfg.cfg_scale, null_label=null_label, generator=gen,
                    condition_t=cfg.condition_t, sde_last_step=cfg.sde_last_step,
                    sde_diffusion_norm=cfg.sde_diffusion_norm, empty_text=empty_text)
    model.train(was_training)
    return tokens, labels


def save(m: ModalityRuntime, tokens: torch.Tensor, labels: torch.Tensor | None,
         out_dir: Path, prompts: list[str] | None = None) -> list[Path]:
    """Decode generated tokens and write them with the modality's adapter; the files written.
    With ``prompts`` (one per sample), ``prompts.json`` lists each sample's prompt."""
    latents, labels = m.adapter.detokenize(tokens).cpu(), None if labels is None else labels.cpu()
    paths = (m.adapter.save_prompt_samples(latents, labels, list(prompts), out_dir) if prompts
             else m.adapter.save_samples(latents, labels, out_dir))
    if prompts:
        listing = Path(out_dir) / PROMPTS_FILE
        listing.write_text(json.dumps({f"{i:03d}": p for i, p in enumerate(prompts)}, indent=2,
                                      ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(listing)
    return paths


def write_samples(model, m: ModalityRuntime, cfg, out_dir: Path, *, null_label: int,
                  device: torch.device, labels: torch.Tensor | None = None,
                  text: TextEncoder | None = None) -> list[Path]:
    """:func:`generate` then :func:`save`."""
    tokens, labels = generate(model, m, cfg, null_label=null_label, device=device, labels=labels,
                              text=text)
    return save(m, tokens, labels, out_dir, prompt_list(cfg) if text is not None else None)
