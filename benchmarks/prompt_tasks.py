"""Prompt following against training steps: text rendering and text to speech, four methods.

Does Self-Flow learn to follow prompts faster than vanilla flow matching, DTS and REPA? Every
run starts from the task's preset (so a change of the recipe reaches the benchmark), then sets
the method, seed, steps, model size, batch and run folder (no tracker, no checkpoints but the
trainer's last). Methods differ only in config and all run through the same ``Trainer``:

    vanilla   SingleTimestep + NoTeacher          (flow matching)
    dts       the preset's DualTimestep + NoTeacher (Dual-Timestep Scheduling alone)
    selfflow  the preset's DualTimestep + its EMATeacher (Self-Flow: the preset as it is)
    repa      SingleTimestep + REPATeacher        (REPA; gamma 0.5, the REPA paper's lambda)

and, on request (``--methods ...,repa_label_free``), REPA with a frozen encoder trained without
labels (:mod:`evaluators`: a masked autoencoder of the same architecture). The default REPA
encoder is a classifier of the task's training data, trained once by
:func:`evaluators.build_assets` and reused (its SHA-256 goes into every result): of the spoken
word's index for speech, of the rendered word's *letters* (multi-hot) for text rendering, whose
160 words with ~25 renders each a small network cannot tell apart from one render (held-out
accuracy at chance) while their letters recur across words (``Task.targets``). For text
rendering both the REPA encoder and the FD extractor are 2-D convolutional networks over the
image the tokens were cut from (the image adapter's own ``unpatchify``); the encoder's feature
of token ``i`` is read from the conv map at token ``i``'s patch (``Task.encoder``).

Tasks (``--task``):

- ``t2i_words``: preset ``t2i_words`` (selfflow_image): renders of 160 training words; the
  evaluation prompts are the adapter's ``evaluation_prompts(n)``: captions of the 40 held-out
  words, never rendered for training. Metrics (the adapter's ``prompt_metrics``, the fixed OCR
  reader :mod:`selfflow_image.ocr`): ``exact_match`` and ``char_accuracy``.
- ``t2a_words``: preset ``t2a_words`` (selfflow_audio): 30 spoken words, each word's one
  (pitch, speed) combination of four held out; the evaluation prompts ask for those held-out
  triples. Metrics (the fixed spoken-word evaluator :mod:`selfflow_audio.evaluator`):
  ``word_acc``, ``pitch_acc``, ``speed_acc``.

Evaluation (``--evals`` points of each main run), always on the run's evaluation EMA
(``trainer.eval_ema.model``, the preset's decay and warm-up): the same kind of weights for every
method. ``--samples`` samples, one per evaluation prompt, drawn with the preset's sampler,
steps, shift and guidance (or ``--sample-method`` / ``--sample-steps`` / ``--cfg``) from one
fixed sampling seed (every run starts from the same noise); then

- the prompt metrics above;
- FD of the samples against ``--reference`` real renders / clips of the held-out source, in the
  features of a fixed extractor trained once on the training data (``build_assets``; its SHA-256
  recorded); generated tokens are clamped to the real range first;
- a linear probe per block of the latent stream (:func:`selfflow_core.eval.diagnostics.
  probe_layers`: ``--probe-samples`` training samples with the empty prompt, so the probe reads
  what the network inferred from the data rather than the prompt; the word index as the label
  (text rendering: the word's first letter); at
  ``t = --probe-t``; 30 % held out) and the features' effective rank;
- at the last step, the flow loss in 5 buckets of t on the held-out reference with its captions.

Reported: mean ± std over seeds of every curve, the gap to vanilla paired by seed, and the steps
each method takes to reach vanilla's final value of each metric (interpolated on the mean curve;
higher is better for the accuracies, lower for FD) with the ``x fewer steps`` ratio. The
evaluator's ceiling (its scores of the real held-out renders / clips against the very evaluation
prompts) and a chance level (the same real data against the prompts of *other* words; 0.5 for
the binary pitch and speed) go into the JSON.

Sweeps (``--sweeps``, ``--sweep-seeds`` seeds per point, methods ``--sweep-methods``; a point
equal to a main run reuses it): ``size`` (every ``--sizes`` MMDiT shape, written
``DOUBLE+SINGLExWIDTH``, heads and RoPE axes as the preset's) and ``length`` (``--long-steps``,
4 x the main steps by default, ``--length-evals`` points along the way; the preset's LR schedule
spans the whole run, so a long run is its own run, not a continuation of a short one).
Sweep-only runs are evaluated at their last step (``--sweep-evals``). Results:
``--out/<name>.json``; with matplotlib ``<name>.png`` (metrics against steps with their spread,
probes), ``<name>_sweeps.png`` and ``<name>_samples.png`` (the same held-out prompts for each
method at equal steps, seed 0, from the adapter's ``save_prompt_samples``, whose files stay in
``<name>_samples/<method>/``).

    python benchmarks/prompt_tasks.py --task t2i_words --resume    # the main comparison (5 seeds
        # x 4 methods, the preset's 2000 steps) and the sweeps (3 seeds, vanilla and Self-Flow:
        # 4 sizes; 8000 steps): 44 runs (--resume skips the runs an interrupted invocation with
        # the same settings finished)
    python benchmarks/prompt_tasks.py --task t2a_words --resume    # the same for speech
    python benchmarks/prompt_tasks.py --task t2i_words --sweeps none --resume  # main runs only
    python benchmarks/prompt_tasks.py --task t2i_words --sweeps none --seeds 1 --steps 40 \
        --evals 2 --samples 40 --sample-steps 8 --reference 200 --evaluator small   # a look

Cost (t2i_words, one thread, measured on a 2-core machine shared with other jobs; CPU seconds,
about the wall time of an idle core), measured on the preset as it was before its 3+2x128 MMDiT
(a Self-Flow step of its 3+2x128 MMDiT took ~1.1 s at one thread, two jobs at a time, and its
default sizes are now 1+1x32 to 4+4x192): a training step of that preset (batch 32, 1+4x64 MMDiT)
~0.25 s (vanilla, DTS), ~0.37 s (Self-Flow), ~1.1 s (REPA: its 2048-wide projector is ~8x the
backbone; ``--repa-hidden`` makes it cheaper, not REPA's setting); one evaluation ~0.8 s per
sample (Heun 40 steps with guidance: 79 model calls on a doubled batch) plus ~12 s (probes, flow
loss). A main run of 2000 steps with 5 evaluations of 120 samples: ~17 min (vanilla) to ~45 min
(REPA).

The fixed evaluators (``--evaluator default``: the modalities' own, trained once and cached
under ``$SELFFLOW_CACHE``, ~5 min for the OCR reader) are fitted in the main process before any
run starts; ``small`` and ``tiny`` are smaller ones for looks and tests (their numbers are not
comparable with the default's; the settings and SHA-256 of the one used are in the JSON).
So are the FD extractor and REPA encoder (``--assets``, one folder per preset; for t2i_words
~75 s and ~85 s at the default 600 ``--asset-steps``, one thread); their held-out and
training-split accuracy (Jaccard of the letters for text rendering) and training time are
printed before the runs and kept in the JSON (``assets``, ``protocol.fd``, ``protocol.repa``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    LABEL_FREE,
    METHODS,
    REPA_METHODS,
    RESULTS,
    curve_mean,
    eval_steps,
    mean_spread,
    paired_gaps,
    print_table,
    run_jobs,
    steps_to_reach,
    summarize_sweep,
    write_json,
)
from evaluators import LABEL_FREE_FILE, LABEL_FREE_KEY, REPA_FEATURES, build_assets
from plots import plot_prompt_tasks, plot_sample_grid

from selfflow_core.plugins.hookspecs import hookimpl

EVALUATOR_SIZES = ("default", "small", "tiny")


# ---- tasks ---------------------------------------------------------------------------------------

@attrs.frozen
class Task:
    """What the benchmark fixes per task: the preset (module and function), the held-out source,
    the prompt metrics (all higher-is-better; ``primary`` leads the figures and sweeps), which
    of them are about the word (their chance level is measured) and which are binary (chance
    0.5), the default sweep sizes and the FD extractor's and REPA encoder's architectures
    (:data:`evaluators.EXTRACTORS`, :data:`evaluators.ENCODERS`)."""

    name: str
    module: str
    preset: str
    heldout_source: str
    metrics: tuple[str, ...]
    primary: str
    word_metrics: tuple[str, ...]
    binary_metrics: tuple[str, ...]
    sizes: str
    extractor: str = "conv"
    encoder: str = "token"
    asset_noise: float = 0.05
    #: the targets the FD extractor, REPA's encoder and the probes are trained on, from the
    #: store's labels (the word index): ``"word"`` itself, or ``"letters"``, the 26 letters of
    #: the word (multi-hot; the probes: its first letter). Rendered words are too many, with too
    #: few renders each, for a small network to tell apart from one render (held-out accuracy at
    #: chance), while their letters recur across words.
    targets: str = "word"


def letters_of(labels: np.ndarray) -> np.ndarray:
    """Word indices of the text-rendering vocabulary -> multi-hot ``[B, 26]`` of their letters."""
    from selfflow_image.words import VOCABULARY

    out = np.zeros((len(labels), 26), dtype=np.float32)
    for i, w in enumerate(np.asarray(labels).reshape(-1)):
        out[i, [ord(ch) - ord("a") for ch in VOCABULARY[int(w)]]] = 1.0
    return out


def asset_targets(task: Task, labels: np.ndarray) -> torch.Tensor:
    """What the fixed FD extractor and REPA's encoder learn to predict (see ``Task.targets``)."""
    return torch.from_numpy(letters_of(labels) if task.targets == "letters"
                            else np.asarray(labels).astype(np.int64))


def probe_targets(task: Task, labels: np.ndarray) -> torch.Tensor:
    """The class each probed sample is probed for: the word, or its first letter."""
    if task.targets == "letters":
        from selfflow_image.words import VOCABULARY

        return torch.tensor([ord(VOCABULARY[int(w)][0]) - ord("a") for w in labels])
    return torch.from_numpy(np.asarray(labels).astype(np.int64))


TASKS = {
    "t2i_words": Task("t2i_words", "selfflow_image.presets", "t2i_words", "words_heldout",
                      ("exact_match", "char_accuracy"), "char_accuracy",
                      ("exact_match", "char_accuracy"), (),
                      "1+1x32,2+1x64,3+2x128,4+4x192", extractor="image_conv",
                      encoder="image_conv", targets="letters"),
    "t2a_words": Task("t2a_words", "selfflow_audio.presets", "t2a_words", "spoken_words_heldout",
                      ("word_acc", "pitch_acc", "speed_acc"), "word_acc", ("word_acc",),
                      ("pitch_acc", "speed_acc"), "1+1x48,1+2x64,1+2x96,2+4x128"),
}


def preset_config(task: Task, preset: str = ""):
    """The task's preset (``preset``: another preset function of the same module, e.g. its
    ``*_debug_tiny`` twin)."""
    return getattr(importlib.import_module(task.module), preset or task.preset)()


def only_modality(config) -> tuple[str, object]:
    if len(config.modalities) != 1:
        raise SystemExit(f"prompt_tasks: the preset has {len(config.modalities)} modalities; "
                         f"this benchmark runs single-modality prompt presets")
    return next(iter(config.modalities.items()))


def parse_size(text: str) -> tuple[int, int, int]:
    """``"1+4x64"`` -> (double blocks, single blocks, width)."""
    blocks, width = text.lower().split("x")
    double, single = blocks.split("+")
    return int(double), int(single), int(width)


def size_text(size) -> str:
    return f"{size[0]}+{size[1]}x{size[2]}"


def preset_size(config) -> tuple[int, int, int]:
    b = config.backbone
    if b.kind != "mmdit":
        raise SystemExit(f"prompt_tasks: the preset's backbone is {b.kind!r}; sizes are MMDiT "
                         f"shapes")
    return b.double_blocks, b.single_blocks, b.width


def mmdit_of(base, size):
    """The preset's MMDiT at ``size``: its heads and number of RoPE axes, the head dim split
    evenly over the axes."""
    double, single, width = size
    head, axes = width // base.heads, len(base.axes_dim)
    if width % base.heads or head % axes or (head // axes) % 2:
        raise SystemExit(f"size {size_text(size)}: width {width} / {base.heads} heads = head dim "
                         f"{head} does not split into {axes} even RoPE axes")
    return attrs.evolve(base, double_blocks=double, single_blocks=single, width=width,
                        axes_dim=(head // axes,) * axes)


# ---- the fixed prompt evaluators -----------------------------------------------------------------

#: smaller evaluators than the modalities' defaults: ``small`` are the modality tests' settings
#: (tens of seconds to fit), ``tiny`` a few seconds (the harness's own tests; barely reads)
READERS = {"small": dict(steps=600, renders_per_word=16, width=8, lr=5e-3, eval_renders=400),
           "tiny": dict(steps=30, renders_per_word=1, width=4, eval_renders=40)}
CLASSIFIERS = {"small": dict(clips_per_triple=4, steps=300, width=24, eval_clips=120),
               "tiny": dict(clips_per_triple=2, steps=20, width=8, eval_clips=30)}


def pin_evaluator(task: Task, size: str, adapter) -> dict:
    """Load (fitting and caching it first if needed) the fixed evaluator the adapter's
    ``prompt_metrics`` scores with, and make it the one it uses in this process (for ``small``
    / ``tiny``: in place of the modality's default). Returns its record (settings, SHA-256,
    its own ceiling)."""
    if task.name == "t2i_words":
        from selfflow_image import ocr

        config = ocr.ReaderConfig(size=adapter.config.size, look=adapter.config.words,
                                  **READERS.get(size, {}))
        reader = ocr.load_reader(config)
        ocr.default_reader = lambda look=None: reader  # what the adapter's read_words uses
        return {"kind": "OCR reader (selfflow_image.ocr)", "size": size, **reader.info}
    from selfflow_audio import evaluator

    config = attrs.evolve(adapter.evaluator_config(), **CLASSIFIERS.get(size, {}))
    clf = evaluator.load_classifier(config)
    wanted = adapter.evaluator_config()

    def classifier_for(cfg):  # what the adapter's prompt_metrics looks its evaluator up with
        if cfg != wanted:
            raise RuntimeError(f"prompt_tasks pinned the spoken-word evaluator of {wanted}, "
                               f"asked for {cfg}")
        return clf

    evaluator.classifier_for = classifier_for
    return {"kind": "spoken-word evaluator (selfflow_audio.evaluator)", "size": size,
            **clf.info}


def chance_and_ceiling(task: Task, adapter, latents: torch.Tensor, prompts: list[str]) -> dict:
    """The evaluator on the real held-out data whose prompt ``i`` is ``prompts[i]`` (the ceiling:
    what a model that renders / speaks perfectly scores), and on the same data against the next
    sample's prompt (``prompts`` cycle the held-out words, so never the same word): the chance
    level of the word metrics; the binary ones have 0.5."""
    ceiling = {k: float(v) for k, v in adapter.prompt_metrics(latents, prompts).items()}
    shifted = prompts[1:] + prompts[:1]
    mismatched = {k: float(v) for k, v in adapter.prompt_metrics(latents, shifted).items()}
    chance = {k: mismatched[k] for k in task.word_metrics if k in mismatched}
    chance.update({k: 0.5 for k in task.binary_metrics})
    return {"ceiling": ceiling, "chance": chance,
            "chance_method": "real held-out data scored against the next sample's prompt "
                             "(another word); binary metrics: 0.5",
            "samples": len(prompts)}


# ---- one run -------------------------------------------------------------------------------------

def numeric(fields: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in fields.items() if k != "captions"}


class PromptEvaluator:
    """Plugin object: at each step in ``at``, prompt metrics, FD, probes (and at the last, the
    flow loss by t) of the run's evaluation EMA."""

    def __init__(self, job: dict) -> None:
        from selfflow_repa.teacher import load_encoder

        self.job = job
        self.at = set(eval_steps(job["steps"], job["evals"]))
        self.extractor = load_encoder(job["extractor"])
        self.rows: list[dict] = []
        self.batches = None
        self.grid: list[str] = []

    def _batches(self, trainer):
        """The probe set (training samples, empty prompt) and the held-out loss set (with each
        sample's first caption), built on first use with the run's text encoder."""
        from selfflow_core.data.store import open_store
        from selfflow_core.prompts import with_text

        adapter, text, device = trainer.modalities[0].adapter, trainer.text_encoder, trainer.device
        train = open_store(self.job["store"], adapter=adapter).read(self.job["probe_index"])
        probe = adapter.tokenize(numeric(train))
        probe = with_text(probe, text.encode([""] * len(train["labels"])))
        held = open_store(self.job["heldout_store"], adapter=adapter).read(
            np.arange(self.job["loss_samples"]))
        loss = adapter.tokenize(numeric(held))
        loss = with_text(loss, text.encode([str(c) for c in held["captions"][:, 0]]))
        return (probe.to(device), probe_targets(TASKS[self.job["task"]], train["labels"]),
                loss.to(device))

    def sample(self, trainer, model):
        from selfflow_core.eval.samples import generate

        job = self.job
        sampling = attrs.evolve(job["sampling"], prompts=tuple(job["prompts"]),
                                count=len(job["prompts"]))
        tokens, _ = generate(model, trainer.modalities[0], sampling,
                             null_label=model.num_classes, device=trainer.device,
                             text=trainer.text_encoder)
        return tokens

    def fd(self, tokens) -> float:
        from metrics import frechet_distance_from_stats, gaussian_stats

        with torch.no_grad():
            feats = self.extractor(tokens.detach().cpu().float().clamp(*self.job["clamp"]))
        return frechet_distance_from_stats(*gaussian_stats(feats.double().numpy()),
                                           *self.job["reference_stats"])

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        now = time.perf_counter()
        if step == 1:
            self.t_first, self.eval_total = now, 0.0
        self.t_last = now
        if step not in self.at:
            return
        from selfflow_core.eval.diagnostics import loss_by_timestep, probe_layers
        from selfflow_core.eval.evaluate import prompt_metrics
        from selfflow_core.eval.samples import save

        if trainer.eval_ema is None:
            raise RuntimeError("the preset keeps no evaluation EMA (eval_ema_decay): every "
                               "method is evaluated on its evaluation EMA")
        model = trainer.eval_ema.model  # the same kind of weights for every method
        if self.batches is None:
            self.batches = self._batches(trainer)
        probe, labels, loss = self.batches
        m, prompts = trainer.modalities[0], list(self.job["prompts"])
        tokens = self.sample(trainer, model)
        row = {"step": step, **prompt_metrics(m.adapter, tokens, prompts),
               "fd": self.fd(tokens)}
        row.update(probe_layers(model, probe, labels, t=self.job["probe_t"]))
        if step == max(self.at):
            row.update(loss_by_timestep(model, loss, buckets=5))
            if self.job.get("grid_dir"):
                k = self.job["grid"]
                paths = save(m, tokens[:k], None, Path(self.job["grid_dir"]), prompts[:k])
                self.grid = [str(p) for p in paths]
        row["step_loss"] = float(terms.total.detach())  # this step's training loss
        row["eval_s"] = time.perf_counter() - now
        self.eval_total += row["eval_s"]
        self.rows.append(row)
        self.t_last = time.perf_counter()

    def train_s_per_step(self, steps: int) -> float:
        """Training time per step between the ends of step 1 and the last, evaluations excluded."""
        return (self.t_last - self.t_first - self.eval_total) / max(1, steps - 1)


def make_config(job: dict):
    """The run's config: the task's preset with this run's method, seed, steps, size, batch and
    run folder; no tracker, no checkpoint but the trainer's last, one thread."""
    from selfflow_repa import REPATeacher
    from selfflow_repa.projector import REPA_HIDDEN

    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.config.run import CheckpointConfig, DiagnosticsConfig
    from selfflow_core.teachers import NoTeacher
    from selfflow_core.timesteps import SingleTimestep

    task = TASKS[job["task"]]
    preset = preset_config(task, job["preset"])
    name, spec = only_modality(preset)
    method = job["method"]
    if spec.scheduler.kind != "dual" or preset.teacher.kind != "ema":
        raise SystemExit(f"prompt_tasks: the preset {job['preset'] or task.preset} is not "
                         f"Self-Flow (dual timesteps + EMA teacher); selfflow is the preset as "
                         f"it is")
    scheduler = (spec.scheduler if method in ("dts", "selfflow")
                 else SingleTimestep.Config(distribution=spec.scheduler.distribution))
    objective = preset.objective
    if method == "selfflow":
        teacher = preset.teacher
    elif method in REPA_METHODS:
        which = "encoder" if method == "repa" else "encoder_label_free"
        teacher = REPATeacher.Config(encoder=job[which], feature_dim=REPA_FEATURES,
                                     sha256=job[f"{which}_sha256"],
                                     projector_hidden=job["repa_hidden"] or REPA_HIDDEN)
        objective = attrs.evolve(objective, gamma=0.5)  # REPA's lambda
    else:
        teacher = NoTeacher.Config()
    backbone = mmdit_of(preset.backbone, job["size"])
    if backbone.depth < 3:  # 0.3 / 0.7 of the depth collide
        objective = attrs.evolve(objective, student_layer=1, teacher_layer=backbone.depth)
    optim = attrs.evolve(preset.optim, lr=job["lr"]) if job["lr"] else preset.optim
    return attrs.evolve(
        preset,
        modalities={name: attrs.evolve(spec, store=job["store"], source="", scheduler=scheduler,
                                       batch_size=job["batch"] or spec.batch_size)},
        backbone=backbone, teacher=teacher, objective=objective, optim=optim,
        checkpoint=CheckpointConfig(every=10 ** 9, keep=1),
        # the trainer's own samples at the end: one, cheap (the evaluation draws its own)
        sampling=attrs.evolve(preset.sampling, count=1, steps=1, every=0, evaluate=False),
        diagnostics=DiagnosticsConfig(every=0), tracker=NullTracker.Config(),
        steps=job["steps"], seed=job["seed"], run_dir=job["run_dir"], log_every=10 ** 9,
        threads=1, verify_stores=False,  # the main process verified the store
        device=job.get("device") or preset.device)


def run_one(job: dict) -> dict:
    try:
        return _run_one(job)
    except Exception:  # noqa: BLE001 - a plain message crosses the process boundary intact
        import traceback
        raise RuntimeError(f"run {job['key']} failed:\n{traceback.format_exc()}") from None


def _run_one(job: dict) -> dict:
    torch.set_num_threads(1)
    from selfflow_core.plugins.manager import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    config = make_config(job)
    pin_evaluator(TASKS[job["task"]], job["evaluator"],
                  only_modality(config)[1].modality.build())
    ev = PromptEvaluator(job)
    t0 = time.perf_counter()
    trainer = Trainer(config, components=Components(make_plugin_manager([ev])), progress=False)
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    shutil.rmtree(job["run_dir"], ignore_errors=True)
    return {"key": job["key"], "method": job["method"], "seed": job["seed"],
            "groups": job["groups"], "steps": job["steps"], "size": list(job["size"]),
            "curve": ev.rows, "seconds": seconds,
            "train_s_per_step": ev.train_s_per_step(job["steps"]),
            "params": sum(p.numel() for p in trainer.backbone.parameters()),
            "final_loss": summary["final_loss"], "grid": ev.grid}


# ---- the runs ------------------------------------------------------------------------------------

def plan_runs(args, base: dict, sweeps: set[str], main_size) -> dict[str, dict]:
    """Every run the invocation needs, once: a sweep point equal to a main run (same method,
    seed, steps and size) reuses it and is listed under both groups."""
    jobs: dict[str, dict] = {}

    def add(method, seed, group, variant="", *, steps=None, size=None):
        steps, size = steps or args.steps, tuple(size or main_size)
        key = json.dumps([method, seed, steps, list(size)])
        evals = {"main": args.evals, "length": args.length_evals}.get(group, args.sweep_evals)
        if key not in jobs:
            jobs[key] = {**base, "method": method, "seed": seed, "steps": steps, "size": size,
                         "key": key, "run_dir": str(Path(args.work) / f"run-{len(jobs)}"),
                         "groups": {}, "evals": evals, "grid_dir": None}
        job = jobs[key]
        job["evals"] = max(job["evals"], evals)
        job["groups"][group] = variant
        if group == "main" and seed == 0 and args.grid:
            job["grid_dir"] = str(Path(args.out) / f"{args.name}_samples" / method)

    for seed in range(args.seeds):
        for m in args.methods:
            add(m, seed, "main")
    seeds = range(args.sweep_seeds)
    if "size" in sweeps:
        for s in args.sizes.split(","):
            for m in args.sweep_methods:
                for seed in seeds:
                    add(m, seed, "size", variant=size_text(parse_size(s)), size=parse_size(s))
    if "length" in sweeps:
        long_steps = args.long_steps or 4 * args.steps
        for m in args.sweep_methods:
            for seed in seeds:
                add(m, seed, "length", variant=f"{long_steps} steps", steps=long_steps)
    return jobs


# ---- aggregation ---------------------------------------------------------------------------------

def higher_is_better(metric: str) -> bool:
    return metric != "fd"


def final(run: dict, key: str) -> float | None:
    return run["curve"][-1].get(key)


def summarize(results: list[dict], args, metrics: list[str]) -> dict:
    """Per method over the main runs: each metric's curve (mean ± std), its gap to vanilla
    paired by seed (per evaluation step and at the last), the steps to reach vanilla's final
    value on the mean curve and the ratio to the run's length (``x fewer steps``), the same per
    seed against that seed's vanilla run, the probes, the flow loss by t, the time per step;
    and the sweeps (:func:`common.summarize_sweep`)."""
    main = [r for r in results if "main" in r["groups"]]
    by_method = {m: sorted([r for r in main if r["method"] == m], key=lambda r: r["seed"])
                 for m in args.methods}
    vanilla = by_method.get("vanilla", [])
    targets = {k: (curve_mean(vanilla, k)[-1][1] if vanilla else None) for k in metrics}
    out: dict = {"metrics": metrics, "primary": args.primary, "methods": {},
                 "vanilla_final": targets}
    for m, runs in by_method.items():
        if not runs:
            continue
        last = runs[0]["curve"][-1]["step"]
        s: dict = {"seeds": len(runs), "curves": {}, "gap_vs_vanilla": {},
                   "gap_curves_vs_vanilla": {}, "steps_to_vanilla_final": {},
                   "fewer_steps_vs_vanilla": {}, "reached_at_first_eval": {},
                   "fewer_steps_per_seed": {}}
        for k in metrics:
            curve = curve_mean(runs, k)
            s["curves"][k] = curve
            hib = higher_is_better(k)
            if vanilla and m != "vanilla":
                g = paired_gaps(runs, vanilla, lambda r, k=k: final(r, k))
                s["gap_vs_vanilla"][k] = g
                s["gap_curves_vs_vanilla"][k] = [
                    (step, *paired_gaps(runs, vanilla, lambda r, k=k, step=step: next(
                        (c.get(k) for c in r["curve"] if c["step"] == step), None)))
                    for step, *_ in curve]
            target = targets[k]
            if target is None or not np.isfinite(target):
                continue
            reach = steps_to_reach(curve, target, higher_is_better=hib)
            s["steps_to_vanilla_final"][k] = reach
            s["fewer_steps_vs_vanilla"][k] = last / reach if reach else None
            # reached at the first point already: the ratio is only a bound
            s["reached_at_first_eval"][k] = reach is not None and reach == curve[0][0]
            base = {r["seed"]: final(r, k) for r in vanilla}
            ratios = []
            for r in runs:
                if base.get(r["seed"]) is None:
                    continue
                own = [(c["step"], c[k]) for c in r["curve"] if k in c]
                got = steps_to_reach(own, base[r["seed"]], higher_is_better=hib)
                ratios.append(last / got if got else None)
            s["fewer_steps_per_seed"][k] = {
                "ratio": mean_spread(ratios), "reached": sum(x is not None for x in ratios),
                "seeds": len(ratios)}
        layers = sorted({int(k.split("layer")[1]) for run in runs for r in run["curve"]
                         for k in r if k.startswith("probe_acc/")})
        s["probe_curves"] = {f"layer{i}": curve_mean(runs, f"probe_acc/layer{i}") for i in layers}
        s["erank_curves"] = {f"layer{i}": curve_mean(runs, f"erank/layer{i}") for i in layers}
        s["probe_chance"] = mean_spread([final(r, "probe_chance") for r in runs])
        s["flow_t_final"] = {k: mean_spread([r["curve"][-1][k] for r in runs])
                             for k in runs[0]["curve"][-1] if k.startswith("flow_t/")}
        s["train_s_per_step"] = mean_spread([r["train_s_per_step"] for r in runs])
        s["params"] = runs[0]["params"]
        out["methods"][m] = s
    groups: dict[str, list] = {}
    for r in results:
        for g, variant in r["groups"].items():
            if g != "main":
                groups.setdefault(g, []).append((variant, r))
    out["sweeps"] = {g: summarize_sweep(points, metrics=metrics) for g, points in groups.items()}
    return out


# ---- report --------------------------------------------------------------------------------------

def ms(pair, digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def print_report(summary: dict, args, evaluation: dict, floor: list[float]) -> None:
    methods = summary["methods"]
    first = next(iter(methods.values()))
    for k in summary["metrics"]:
        d = 2 if k == "fd" else 3
        bound = ("" if k == "fd" else
                 f"; ceiling {evaluation['ceiling'].get(k, float('nan')):.3f}, chance "
                 f"{evaluation['chance'].get(k, float('nan')):.3f}")
        extra = f"; real-vs-real FD {statistics.fmean(floor):.2f}" if k == "fd" else ""
        print(f"\n{k} vs steps (mean ± std over seeds{bound}{extra}; vanilla's final "
              f"{summary['vanilla_final'][k]:.{d}f})")
        rows = []
        for m, s in methods.items():
            reach = s["steps_to_vanilla_final"].get(k)
            ratio = s["fewer_steps_vs_vanilla"].get(k)
            gap = s["gap_vs_vanilla"].get(k)
            rows.append([m] + [ms(c[1:], d) for c in s["curves"][k]] + [
                "—" if gap is None else f"{gap[0]:+.{d}f} ± {gap[1]:.{d}f} (n={gap[2]})",
                "—" if reach is None else f"{reach:.0f}",
                "—" if ratio is None else
                (f"≥ {ratio:.2f}x (at the 1st eval)" if s["reached_at_first_eval"][k]
                 else f"{ratio:.2f}x")])
        print_table(["method"] + [f"step {c[0]}" for c in first["curves"][k]]
                    + ["gap vs vanilla", "steps to vanilla final", "fewer steps"], rows)
    print("\nlinear probe accuracy at the last step, per block (mean ± std; word index, "
          "empty prompt)")
    print_table(["method"] + list(first["probe_curves"]) + ["chance"], [
        [m] + [ms(c[-1][1:]) for c in s["probe_curves"].values()] + [f"{s['probe_chance'][0]:.3f}"]
        for m, s in methods.items()])
    print("\nflow loss by t bucket at the last step (held-out, with captions; mean over seeds)")
    buckets = list(first["flow_t_final"])
    print_table(["method"] + [b.split("/")[1] for b in buckets] + ["params", "ms/step"], [
        [m] + [s["flow_t_final"][b][0] for b in buckets]
        + [s["params"], f"{s['train_s_per_step'][0] * 1e3:.0f}"] for m, s in methods.items()])
    p = summary["primary"]
    for g, rows_ in summary["sweeps"].items():
        print(f"\nsweep: {g} (mean ± std over seeds; gap: method - vanilla, paired by seed)")
        print_table(["variant", "method", "params", "steps", "seeds", f"final {p}", "gap",
                     "final FD", "best probe"], [
            [r["variant"], r["method"], r["params"], r["steps"], len(r["seeds"]),
             ms(r[f"final_{p}"]), ms(r[f"{p}_gap_vs_vanilla"]) if f"{p}_gap_vs_vanilla" in r
             else "", ms(r["final_fd"], 2), ms(r["best_probe"])] for r in rows_])


# ---- main ----------------------------------------------------------------------------------------

def asset_quality(info: dict) -> str:
    """An FD extractor's or REPA encoder's record as printed: its held-out and training-split
    accuracy (Jaccard for multi-hot targets) and, when recorded, its training time."""
    took = f" in {info['seconds']:.0f}s" if "seconds" in info else ""
    return f"held-out acc {info['heldout_acc']:.3f} (train {info['train_acc']:.3f}{took})"


def read_all(store) -> dict:
    return store.read(np.arange(len(store)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="t2i_words", choices=sorted(TASKS))
    ap.add_argument("--preset", default="", help="another preset of the task's module (e.g. "
                    "t2i_words_debug_tiny); default the task's")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the main runs")
    ap.add_argument("--steps", type=int, default=0, help="steps of a main run (0: the preset's)")
    ap.add_argument("--evals", type=int, default=5, help="evaluation points per main run")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's)")
    ap.add_argument("--lr", type=float, default=0.0, help="peak LR (0: the preset's)")
    ap.add_argument("--size", default="", help="MMDiT of the main runs, DOUBLE+SINGLExWIDTH "
                    "(default: the preset's)")
    ap.add_argument("--samples", type=int, default=120,
                    help="samples per evaluation: one per evaluation prompt (t2i: 3 per "
                         "held-out word; t2a: 4 per held-out triple)")
    ap.add_argument("--sample-method", default="", help="sampler (default: the preset's)")
    ap.add_argument("--sample-steps", type=int, default=0, help="(0: the preset's)")
    ap.add_argument("--cfg", type=float, default=0.0, help="guidance scale (0: the preset's)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--reference", type=int, default=1000,
                    help="real held-out samples: the FD reference (>= --samples)")
    ap.add_argument("--probe-samples", type=int, default=2048,
                    help="training samples of the probes (evenly spread over the store)")
    ap.add_argument("--loss-samples", type=int, default=500,
                    help="held-out samples of the flow loss by t")
    ap.add_argument("--probe-t", type=float, default=0.25)
    ap.add_argument("--grid", type=int, default=16,
                    help="samples in the sample grid of each method (0: none)")
    ap.add_argument("--evaluator", default="default", choices=EVALUATOR_SIZES,
                    help="the fixed prompt evaluator: the modality's default, or a smaller one")
    ap.add_argument("--asset-steps", type=int, default=600,
                    help="training steps of the FD extractor and the REPA encoders")
    ap.add_argument("--repa-hidden", type=int, default=0,
                    help="hidden width of REPA's projector (0: REPA's 2048)")
    ap.add_argument("--sweeps", default="size,length", help="comma list of size, length; or none")
    ap.add_argument("--sweep-methods", default="vanilla,selfflow")
    ap.add_argument("--sweep-seeds", type=int, default=3, help="seeds per sweep point")
    ap.add_argument("--sweep-evals", type=int, default=1,
                    help="evaluation points of sweep-only runs (1: the final step)")
    ap.add_argument("--sizes", default="", help="size sweep, comma list of DOUBLE+SINGLExWIDTH "
                    "(default: the task's four)")
    ap.add_argument("--long-steps", type=int, default=0, help="length sweep (default 4 x steps)")
    ap.add_argument("--length-evals", type=int, default=5,
                    help="evaluation points of the length sweep's runs")
    ap.add_argument("--primary", default="", help="the metric of the figures and sweep tables "
                    "(default: the task's)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="parallel runs (one thread each; 1: in this process)")
    ap.add_argument("--device", default="", help="the runs' device (default: the preset's)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temp folder per task)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON and PNG results")
    ap.add_argument("--assets", default=str(RESULTS / "prompt_tasks_assets"),
                    help="folder of the fixed FD extractor and REPA encoders (one per preset)")
    ap.add_argument("--name", default="", help="result name (default prompt_tasks_<task>)")
    ap.add_argument("--resume", action="store_true",
                    help="skip runs an interrupted invocation with the same settings finished")
    args = ap.parse_args(argv)
    task = TASKS[args.task]
    args.methods = [m for m in args.methods.split(",") if m]
    args.sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    known = {*METHODS, LABEL_FREE}
    if unknown := (set(args.methods) | set(args.sweep_methods)) - known:
        ap.error(f"--methods / --sweep-methods: unknown {sorted(unknown)}; choose from "
                 f"{', '.join((*METHODS, LABEL_FREE))}")
    sweeps = set() if args.sweeps == "none" else set(args.sweeps.split(","))
    if unknown := sweeps - {"size", "length"}:
        ap.error(f"--sweeps: unknown {sorted(unknown)}; choose from size, length")
    if args.reference < max(args.samples, 4):
        ap.error("--reference must be at least --samples (and 4): the ceiling scores the real "
                 "held-out sample of every evaluation prompt")
    args.primary = args.primary or task.primary
    if args.primary not in (*task.metrics, "fd"):
        ap.error(f"--primary: {args.primary!r} is not a metric of {task.name} "
                 f"({', '.join(task.metrics)}, fd)")
    args.name = args.name or f"prompt_tasks_{task.name}"
    args.work = args.work or os.path.join(tempfile.gettempdir(), f"selfflow-{args.name}")
    args.sizes = args.sizes or task.sizes
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    from metrics import frechet_distance, gaussian_stats
    from selfflow_repa.teacher import load_encoder

    from selfflow_core.config.converter import make_converter, to_data
    from selfflow_core.data.store import open_store
    from selfflow_core.data.writer import encode_store
    from selfflow_core.plugins.manager import Components

    preset = preset_config(task, args.preset)
    mod_name, spec = only_modality(preset)
    preset_name = args.preset or task.preset
    args.steps = args.steps or preset.steps
    main_size = parse_size(args.size) if args.size else preset_size(preset)
    for s in [size_text(main_size), *args.sizes.split(",")]:  # refused before anything runs
        mmdit_of(preset.backbone, parse_size(s))
    sampling = attrs.evolve(
        preset.sampling, seed=args.sample_seed,
        **{k: v for k, v in dict(method=args.sample_method, steps=args.sample_steps,
                                 cfg_scale=args.cfg).items() if v})
    components = Components()
    conv = make_converter(components)
    adapter = spec.modality.build()
    prompts = list(adapter.evaluation_prompts(args.samples))
    if len(prompts) != args.samples:
        raise SystemExit(f"{preset_name}: the adapter gives {len(prompts)} evaluation prompts, "
                         f"not {args.samples}")

    # the data: the training store (what every run reads) and the held-out reference
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / f"{preset_name}.zarr"
    encode_store(adapter, spec.source, store_path, progress=False,
                 adapter_config=to_data(conv, spec.modality))
    held_cfg = attrs.evolve(spec.modality, count=args.reference)
    held_path = work / f"{preset_name}-heldout-{args.reference}.zarr"
    encode_store(held_cfg.build(), task.heldout_source, held_path, progress=False,
                 adapter_config=to_data(conv, held_cfg))
    train = read_all(open_store(store_path, adapter=adapter))
    held = read_all(open_store(held_path, adapter=adapter))
    train_tokens = adapter.tokenize(numeric(train)).tokens
    held_tokens = adapter.tokenize(numeric(held)).tokens

    # the fixed evaluators: the FD extractor and REPA's encoders (trained on Task.targets), the
    # prompt evaluator (fitted here, once, before any run needs it)
    folder = Path(args.assets) / preset_name
    meta = build_assets(folder, {"task": task.name, "preset": preset_name,
                                 "source": spec.source},
                        train_tokens, asset_targets(task, train["labels"]),
                        extractor=task.extractor, encoder=task.encoder, steps=args.asset_steps,
                        noise=task.asset_noise, unpatchify=adapter.unpatchify,
                        label_free=LABEL_FREE in {*args.methods, *args.sweep_methods})
    evaluator = pin_evaluator(task, args.evaluator, adapter)
    evaluation = chance_and_ceiling(task, adapter,
                                    torch.from_numpy(held["latents"][:args.samples]), prompts)
    extractor = load_encoder(folder / "fd_extractor.pt")
    with torch.no_grad():
        ref_feats = extractor(held_tokens.float()).double().numpy()
    reference_stats = gaussian_stats(ref_feats)
    rng = np.random.default_rng(0)
    n_floor = args.samples if args.samples < len(ref_feats) else len(ref_feats) // 2
    floor = [frechet_distance(ref_feats[rng.choice(len(ref_feats), n_floor, replace=False)],
                              ref_feats) for _ in range(3)]
    clamp = (float(train_tokens.min()), float(train_tokens.max()))
    n_probe = min(args.probe_samples, len(train["labels"]))
    probe_index = np.unique(np.linspace(0, len(train["labels"]) - 1, n_probe).round()
                            .astype(np.int64))
    del train, held, train_tokens, held_tokens

    base = {"task": task.name, "preset": args.preset, "store": str(store_path),
            "heldout_store": str(held_path), "batch": args.batch, "lr": args.lr,
            "repa_hidden": args.repa_hidden, "evaluator": args.evaluator,
            "encoder": str(folder / "repa_encoder.pt"),
            "encoder_sha256": meta["repa_encoder"]["sha256"],
            "encoder_label_free": str(folder / LABEL_FREE_FILE),
            "encoder_label_free_sha256": meta.get(LABEL_FREE_KEY, {}).get("sha256", ""),
            "extractor": str(folder / "fd_extractor.pt"), "reference_stats": reference_stats,
            "clamp": clamp, "probe_index": probe_index, "probe_t": args.probe_t,
            "loss_samples": min(args.loss_samples, args.reference), "prompts": prompts,
            "sampling": sampling, "grid": args.grid, "device": args.device}
    targets = {"letters": "the word's letters: multi-hot, held-out accuracy as Jaccard",
               "word": "the word index"}[task.targets]
    jobs = plan_runs(args, base, sweeps, main_size)
    todo = sorted(jobs.values(), key=lambda j: -j["steps"] * (j["size"][0] + j["size"][1])
                  * j["size"][2] ** 2)
    print(f"{len(todo)} runs ({task.name}, preset {preset_name}, {args.jobs} parallel, 1 thread "
          f"each); evaluator ({args.evaluator}) SHA-256 {evaluator['sha256'][:12]}: ceiling "
          f"{evaluation['ceiling']}, chance {evaluation['chance']}; FD extractor "
          f"({task.extractor}) {asset_quality(meta['fd_extractor'])}, REPA encoder "
          f"({task.encoder}) {asset_quality(meta['repa_encoder'])} ({targets})", flush=True)
    # finished runs are appended to a partial file; --resume skips them (same settings: the
    # preset's whole config, the evaluation and the evaluators)
    fixed = {k: getattr(args, k) for k in ("task", "preset", "batch", "lr", "samples",
                                           "sample_seed", "reference", "probe_samples",
                                           "loss_samples", "probe_t", "repa_hidden", "grid",
                                           "evaluator", "asset_steps", "device")}
    tag = hashlib.sha256(json.dumps(
        [fixed, to_data(conv, preset), to_data(conv, sampling), meta["fd_extractor"]["sha256"],
         meta["repa_encoder"]["sha256"], evaluator["sha256"]], sort_keys=True,
        default=str).encode()).hexdigest()[:12]
    partial = work / f"partial-{tag}.jsonl"
    p = args.primary
    results, trained = run_jobs(
        jobs, todo, run_one, partial, resume=args.resume, workers=args.jobs,
        evals_of=lambda j: len(eval_steps(j["steps"], j["evals"])),
        describe=lambda res: (
            f"{res['method']:8s} seed {res['seed']} {res['groups']}: {p} "
            f"{res['curve'][-1][p]:.3f}, FD {res['curve'][-1]['fd']:.2f} in "
            f"{res['seconds']:.0f}s ({res['train_s_per_step'] * 1e3:.0f} ms/step, "
            f"{sum(c['eval_s'] for c in res['curve']):.0f}s evaluating)"))
    metrics = [*task.metrics, "fd"]
    summary = summarize(results, args, metrics)
    wall = time.perf_counter() - t_start
    print_report(summary, args, evaluation, floor)

    ema = (preset.eval_ema_decay, preset.eval_ema_warmup)
    protocol = {
        "evaluated_weights": f"the evaluation EMA of every run (trainer.eval_ema.model; the "
                             f"preset's decay {ema[0]}, warm-up {ema[1]}): the same kind of "
                             f"weights for every method",
        "prompts": {"source": f"{type(adapter).__name__}.evaluation_prompts({args.samples})",
                    "count": len(prompts), "first": prompts[:8],
                    "held_out": "t2i: words never rendered for training; t2a: (word, pitch, "
                                "speed) triples never spoken for training"},
        "sampling": {**to_data(conv, sampling), "count": len(prompts),
                     "note": "one sample per prompt; fixed seed: every run starts from the "
                             "same noise"},
        "prompt_metrics": {"via": f"{type(adapter).__name__}.prompt_metrics",
                           "metrics": list(task.metrics), "higher_is_better": True,
                           "evaluator": {k: evaluator.get(k) for k in
                                         ("kind", "size", "sha256", "settings", "ceiling")},
                           **evaluation},
        "fd": {"samples": len(prompts), "reference": f"{args.reference} real samples of the "
                                                     f"held-out source {task.heldout_source}",
               "clamp": list(clamp), "extractor": str(folder / "fd_extractor.pt"),
               "extractor_architecture": task.extractor,
               "extractor_sha256": meta["fd_extractor"]["sha256"],
               "extractor_heldout_acc": meta["fd_extractor"]["heldout_acc"],
               "extractor_train_acc": meta["fd_extractor"]["train_acc"],
               "extractor_training": "classifier of the training data: " + targets,
               "real_vs_real_fd_at_n": floor, "real_vs_real_n": n_floor},
        "probe": {"t": args.probe_t, "prompt_to_model": "empty prompt",
                  "labels": "first letter" if task.targets == "letters" else "word index",
                  "pooling": "mean over the latent stream", "holdout": 0.3,
                  "probe": "closed-form ridge 1e-2 on standardised features",
                  "samples": int(len(probe_index)), "data": "training store, evenly spread"},
        "flow_loss_by_t": {"buckets": 5, "samples": base["loss_samples"],
                           "data": "held-out reference with each sample's first caption",
                           "at": "the last step"},
        "steps_to_reach": "first step where the mean curve (linearly interpolated) reaches "
                          "vanilla's final mean (>= for the accuracies, <= for FD); "
                          "'fewer steps' = run steps / that step; per seed: against the same "
                          "seed's vanilla run",
        "repa": {"encoder": base["encoder"], "encoder_sha256": base["encoder_sha256"],
                 "gamma": 0.5, "feature_dim": REPA_FEATURES,
                 "encoder_architecture": task.encoder,
                 "encoder_heldout_acc": meta["repa_encoder"]["heldout_acc"],
                 "encoder_train_acc": meta["repa_encoder"]["train_acc"],
                 "encoder_training": "classifier of the training data: " + targets,
                 "projector_hidden": args.repa_hidden or 2048,
                 **({"label_free_encoder_sha256": meta[LABEL_FREE_KEY]["sha256"],
                     "label_free_encoder_training": meta[LABEL_FREE_KEY]["objective"]}
                    if LABEL_FREE_KEY in meta else {})},
        "training": {"preset": preset_name, "steps": args.steps,
                     "size": size_text(main_size), "changed_from_preset": {
                         "method": "scheduler / teacher / gamma per method", "seed": "per run",
                         "batch": args.batch or "preset's", "lr": args.lr or "preset's",
                         "checkpoints": "off (one at the end)", "tracker": "none",
                         "threads": 1},
                     "preset_config": to_data(conv, preset)},
    }
    grid = {m: next((g for g in r["grid"] if Path(g).name in ("samples.png", "spectrograms.png")),
                    None)
            for m in args.methods for r in results
            if r["method"] == m and "main" in r["groups"] and r["seed"] == 0 and r["grid"]}
    out = Path(args.out)
    payload = {"args": dict(vars(args)), "protocol": protocol, "assets": meta,
               "evaluator": evaluator, "wall_s": wall, "runs_trained_now": trained,
               "summary": summary, "runs": results, "sample_grid": grid}
    write_json(args.name, payload, folder=out)
    plots = plot_prompt_tasks(summary, out, args.name, evaluation)
    if grid:
        plots += plot_sample_grid({m: p for m, p in grid.items() if p}, out / f"{args.name}"
                                  f"_samples.png", f"{task.name}: the same held-out prompts, "
                                  f"step {args.steps}, seed 0")
    print(f"wall time {wall:.0f}s" + (f"; plots: {[str(p) for p in plots]}" if plots else ""))
    return payload


if __name__ == "__main__":
    main()
