"""``TrainerConfig``: one run, composed from component configs (Python first, TOML second)."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from selfflow_core.builtin.dit import DiT
from selfflow_core.data.blocks import ShuffleConfig
from selfflow_core.interfaces import (
    BackboneConfig,
    ModalityConfig,
    SchedulerConfig,
    TeacherConfig,
    TextEncoderConfig,
    TrackerConfig,
)
from selfflow_core.objective import ObjectiveConfig
from selfflow_core.sampling import SamplingConfig
from selfflow_core.teachers import EMATeacher
from selfflow_core.timesteps import DualTimestep


def _scheduler_or_default(scheduler: SchedulerConfig | None, spec: ModalitySpec
                          ) -> SchedulerConfig:
    """``ModalitySpec.scheduler`` left out (None): the modality's own default."""
    if scheduler is not None:
        return scheduler
    return spec.modality.default_scheduler() or DualTimestep.Config()


@attrs.frozen(kw_only=True)
class ModalitySpec:
    """One modality of a run: its adapter, its zarr store, its timestep plan and its share.

    ``source``: raw data to encode into ``store`` when the store does not exist yet (e.g.
    ``"digits"``); empty means the store must exist. ``scheduler``: left out (or None), the
    modality's paper settings, ``modality.default_scheduler()`` (the core's
    ``DualTimestep.Config()`` where it declares none), filled in when the spec is made, so the
    config's data, ``selfflow config show`` and checkpoints hold the scheduler the run uses.
    ``probability``: share of optimizer steps (paper App. D: each batch holds one modality; all
    ``grad_accum`` micro-batches of a step hold the same one). ``weight``: loss weight.
    ``batch_size``: samples per optimizer step across all ranks and accumulation steps.
    ``shuffle_on_write``: the seed of a random order the store is written in (None: the
    source's order), so that a block-shuffled read of a source given sorted mixes like a full
    shuffle (:mod:`selfflow_core.data.order`).
    """

    modality: ModalityConfig
    store: str
    source: str = ""
    scheduler: SchedulerConfig = attrs.field(
        default=None, converter=attrs.Converter(_scheduler_or_default, takes_self=True))
    batch_size: int = attrs.field(default=64, validator=v.ge(1))
    probability: float = attrs.field(default=1.0, validator=v.gt(0))
    weight: float = attrs.field(default=1.0, validator=v.ge(0))
    shuffle_on_write: int | None = None


@attrs.frozen(kw_only=True)
class OptimConfig:
    """AdamW with grad-norm clipping, linear warm-up, then a constant or cosine schedule."""

    lr: float = attrs.field(default=1e-4, validator=v.gt(0))
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = attrs.field(default=0.0, validator=v.ge(0))
    eps: float = attrs.field(default=1e-8, validator=v.gt(0))
    grad_clip: float = attrs.field(default=1.0, validator=v.gt(0))
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """Write a checkpoint every ``every`` steps (and at the end); keep the last ``keep``."""

    every: int = attrs.field(default=500, validator=v.ge(1))
    keep: int = attrs.field(default=3, validator=v.ge(1))


@attrs.frozen(kw_only=True)
class DiagnosticsConfig:
    """Representation diagnostics logged to the tracker while training
    (:mod:`selfflow_core.eval.diagnostics`), on the raw student, on a fixed set of the first
    ``samples`` stored samples of each modality: per block ``probe_acc`` (linear probe, where the
    data has class labels), ``erank`` and ``feat_std`` (collapse monitors), and the flow loss in
    ``timestep_buckets`` buckets of t. Metric names: ``diag/<modality>/<name>``. They only read
    the model (no grad, their own RNG): training is unchanged. ``every = 0`` turns them off."""

    every: int = attrs.field(default=0, validator=v.ge(0))
    samples: int = attrs.field(default=512, validator=v.ge(4))
    #: the noise level the features are read at (0: clean data)
    t: float = attrs.field(default=0.25, validator=[v.ge(0), v.le(1)])
    timestep_buckets: int = attrs.field(default=5, validator=v.ge(0))


@attrs.frozen(kw_only=True)
class TrainerConfig:
    """A whole run. ``modalities`` maps a name to its :class:`ModalitySpec`; one entry is a
    single-modality run, several make a composite trainer over one shared backbone."""

    modalities: dict[str, ModalitySpec] = attrs.field(validator=v.min_len(1))
    backbone: BackboneConfig = attrs.field(factory=DiT.Config)
    teacher: TeacherConfig = attrs.field(factory=EMATeacher.Config)
    objective: ObjectiveConfig = attrs.field(factory=ObjectiveConfig)
    optim: OptimConfig = attrs.field(factory=OptimConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    diagnostics: DiagnosticsConfig = attrs.field(factory=DiagnosticsConfig)
    #: None: the installed default tracker (aim with ``selfflow-aim``, else jsonl lines)
    tracker: TrackerConfig | None = None
    steps: int = attrs.field(default=1000, validator=v.ge(1))
    grad_accum: int = attrs.field(default=1, validator=v.ge(1))
    label_dropout: float = attrs.field(default=0.1, validator=[v.ge(0), v.le(1)])
    #: prompt conditioning: the run's text encoder (None: no prompts; class labels as before)
    #: and the probability a sample's prompt is replaced by the empty one (guidance), drawn with
    #: the label dropout's draw and seen by student and teacher alike
    text_encoder: TextEncoderConfig | None = None
    caption_dropout: float = attrs.field(default=0.1, validator=[v.ge(0), v.le(1)])
    #: the evaluation EMA of the student: what samples come from, for every method alike
    #: (vanilla, DTS, Self-Flow, REPA), in the trainer and in ``selfflow sample``. With
    #: ``eval_ema_warmup`` its decay at update n is ``min(decay, (1 + n) / (10 + n))``, as the
    #: EMA teacher's ``warmup`` (a run shorter than ~1 / (1 - decay) steps would otherwise sample
    #: an average still mostly of its random initialisation; for paper-length runs it is the
    #: plain 0.9999 after ~90k steps). None: no evaluation EMA, samples then come from the EMA
    #: teacher if the run has one, else the raw student. Neither changes training: both may
    #: change on resume (an EMA added then starts from the resumed student).
    eval_ema_decay: float | None = 0.9999
    eval_ema_warmup: bool = True
    #: 0 <= seed < 2**32: data order and noise are seeded by ``(seed, step)`` pairs
    seed: int = attrs.field(default=0, validator=[v.ge(0), v.lt(2**32)])
    run_dir: str = "runs/selfflow"
    log_every: int = attrs.field(default=25, validator=v.ge(1))
    #: a NaN/Inf loss: ``"stop"`` at the next read-back of the step losses (log, checkpoint,
    #: sample or stop steps; no host sync in between) before any checkpoint of its weights, or
    #: ``"skip"`` the batch (checked before every optimizer step: a host sync per step)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped: int = attrs.field(default=10, validator=v.ge(0))
    num_workers: int = attrs.field(default=0, validator=v.ge(0))
    #: the loader's epoch order: ``kind="full"`` (default) a permutation of each whole store, or
    #: ``kind="block"`` for stores larger than RAM: permuted chunk-aligned blocks shuffled within
    #: windows of ``window_blocks`` blocks (docs/store.md, "Which reader")
    shuffle: ShuffleConfig = attrs.field(factory=ShuffleConfig)
    #: intra-op torch threads of a run on a CPU device (``torch.set_num_threads`` when the
    #: trainer is built: for the whole process, and left so after the run; no effect on a GPU).
    #: ``None``: half the cores this process may use (``os.sched_getaffinity``, shared among
    #: torchrun's local processes), at least 1 and never above torch's current count; torch's
    #: count as it is when ``OMP_NUM_THREADS`` is set. Half (1 on 2 cores), because measured on
    #: a 2-core CPU, 2 threads ran the image preset 2x slower than 1 with one busy process per
    #: core and 6-15x slower on a machine shared with other jobs (a thread sharing its core
    #: stalls every step), while on the idle machine they were only 1.2-1.4x faster
    #: (benchmarks/RESULTS.md, "CPU threads"): set it to the cores of a machine you have to
    #: yourself. May change on resume.
    threads: int | None = attrs.field(default=None, validator=v.optional(v.ge(1)))
    #: scan every stored value (NaN/Inf, damaged chunks) before training
    verify_stores: bool = True
    #: the share of each field's chunks that scan reads (seeded by ``seed``; the last, partly
    #: filled chunk always among them): 1 reads all, less is a sampled check for large stores
    #: (every chunk file is still looked for; every read verifies its chunk's checksum anyway).
    #: See docs/store.md, "Verifying large stores". May change on resume.
    verify_fraction: float = attrs.field(default=1.0, validator=[v.gt(0), v.le(1)])
    device: str = "auto"
    #: ``torch.compile`` each backbone block (``block.compile()``: parameter names unchanged)
    compile: bool = False
    #: how the model is spread over ``torchrun`` processes: ``"ddp"`` replicates it, ``"fsdp"``
    #: shards it (FSDP2, per block; the EMA teacher sharded alike; DCP checkpoint directories).
    #: One process ignores it. See docs/scale.md.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    #: recompute each block's activations in the backward pass (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False
