"""The Self-Flow trainer. ``train_step`` is the paper's algorithm; the rest is bookkeeping:
checkpoints (atomic, exact resume), signals, non-finite losses, DDP or FSDP2 (``parallel``),
tracking and samples."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import attrs
import torch

from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.config.run import TrainerConfig
from selfflow_core.config.validate import config_data, config_drift, validate
from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.store import open_store
from selfflow_core.data.writer import encode_store
from selfflow_core.errors import CheckpointError, ConfigError, NonFiniteLossError
from selfflow_core.eval.diagnostics import DiagnosticsHook, stored_batch
from selfflow_core.eval.evaluate import prompt_metrics
from selfflow_core.eval.samples import generate, prompt_list, sample_info, write_info
from selfflow_core.eval.samples import save as save_samples
from selfflow_core.interfaces import TextEncoding
from selfflow_core.plugins.manager import Components
from selfflow_core.prompts import (
    CAPTIONS,
    EMPTY_PROMPT,
    drop_prompts,
    empty_encoding,
    encoding_from_record,
    has_text,
)
from selfflow_core.runtime import checkpoint
from selfflow_core.runtime.assembly import (
    ModalityRuntime,
    build_modalities,
    build_model,
    drop_unused_head,
    store_path,
)
from selfflow_core.runtime.dist import Dist, setup
from selfflow_core.runtime.guard import StopSignals, lock_run_dir
from selfflow_core.runtime.metrics import LOSS_HISTORY, StepLosses, _finite
from selfflow_core.runtime.optim import build_optimizer
from selfflow_core.runtime.parallel import make_parallel
from selfflow_core.runtime.progress import Progress
from selfflow_core.runtime.threads import apply_threads
from selfflow_core.teachers import EMA
from selfflow_core.types import LossTerms, TokenBatch

CHECKPOINT_FORMAT = 1


class Trainer:
    def __init__(self, config: TrainerConfig, *, components: Components | None = None,
                 dist: Dist | None = None, progress: bool = True) -> None:
        self.components = components or Components()
        self.dist = dist or setup(config.device)
        validate(config, self.components, world_size=self.dist.world_size)
        self.config, self.device = config, self.dist.device
        # CPU: torch's intra-op threads for the whole process (None on a GPU); see
        # TrainerConfig.threads
        self.threads = apply_threads(config.threads, self.device)
        self.run_dir = Path(config.run_dir)
        self.config_data = config_data(config, self.components)
        # a checkpoint this config would refuse is refused now: before any store is encoded and
        # before the tracker opens (and so changes) the run's tracking
        self._refuse_drifted_checkpoint()
        #: the run's text encoder (prompt-conditioned runs; None otherwise)
        self.text_encoder = config.text_encoder.build() if config.text_encoder else None
        self.modalities = build_modalities(config, self.text_encoder)
        stores = [self._open_store(m) for m in self.modalities]
        if self.text_encoder is not None:
            self._check_captions(stores)
        #: what caption dropout gives a sample: the text encoder's encoding of "" (a frozen
        #: encoder's, from the store schema, made when the store was)
        self.empty_text = self._empty_text(stores)
        self.loader = build_loader(
            [LoaderSource(store=store, tokenize=m.adapter.tokenize, text=self.text_encoder,
                          probability=m.spec.probability,
                          batch_size=m.spec.batch_size
                          // (self.dist.world_size * config.grad_accum))
             for m, store in zip(self.modalities, stores)],
            seed=config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            num_workers=config.num_workers, group=config.grad_accum,  # 1 modality per step
            shuffle=config.shuffle)
        self.teacher = config.teacher.build()
        # initial weights from ``config.seed`` alone (not the process's global RNG), so the same
        # config gives the same run in any process; the global RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(config, self.modalities, self.teacher,
                                     text=self.text_encoder.spec() if self.text_encoder else None)
        self.model = self.model.to(self.device)
        self.backbone = self.model.backbone
        self.teacher.attach(self.backbone)
        # what samples come from, for every method alike (see TrainerConfig.eval_ema_decay)
        self.eval_ema = (EMA(self.backbone, config.eval_ema_decay, config.eval_ema_warmup)
                         if config.eval_ema_decay is not None else None)
        # per-block compile / activation checkpointing, then DDP or FSDP2 (the EMA copies are
        # sharded like the student): see selfflow_core.runtime.parallel
        self.parallel = make_parallel(config.parallel, self.dist)
        self.trained = self.parallel.prepare(
            self.model, [m for m in (self.teacher.model, self.eval_ema and self.eval_ema.model)
                         if isinstance(m, type(self.backbone))],
            compile=config.compile, activation_checkpointing=config.activation_checkpointing,
            find_unused=len(self.modalities) > 1)
        self.optimizer, self.lr_schedule = build_optimizer(
            config.optim, self.model.parameters(), config.steps, self.device)
        d = config.diagnostics
        self.diagnostics = {m.name: DiagnosticsHook(
            stored_batch(store, m.adapter, d.samples, id_offset=m.id_offset, device=self.device),
            every=d.every, t=d.t, timestep_buckets=d.timestep_buckets)
            for m, store in zip(self.modalities, stores)} if d.every else {}
        self.step, self.skipped = 0, 0
        self.step_losses = StepLosses(self.dist)
        self.batches = iter(self.loader)
        self.stop = StopSignals()
        tracker = config.tracker or self.components.trackers.get(self.components.trackers.default)()
        self.tracker = tracker.build(run_dir=self.run_dir) if self.dist.is_main else NullTracker()
        self.progress = Progress(config.steps, 0, enabled=progress and self.dist.is_main,
                                 every=config.log_every)

    # -- data ----------------------------------------------------------------------------------
    def _open_store(self, m: ModalityRuntime):
        path = store_path(m.spec)
        # a store complete already is read by encode_store (all of it, or the sampled share):
        # once is enough
        verified, fraction, seed = 0.0, self.config.verify_fraction, self.config.seed
        if m.spec.source and self.dist.is_main:
            verified = encode_store(
                m.adapter, m.spec.source, path, verify=self.config.verify_stores,
                verify_fraction=fraction, verify_seed=seed,
                adapter_config=self.config_data["modalities"][m.name]["modality"],
                progress=True).verified_fraction
        self.dist.barrier()
        return open_store(path, adapter=m.adapter,
                          verify=self.config.verify_stores and verified < fraction,
                          verify_fraction=fraction, verify_seed=seed)

    def _draw(self, batch: TokenBatch, m: ModalityRuntime, gen: torch.Generator):
        """Plan, noise and label dropout for the *global* batch, sliced to this rank's rows, so
        the numbers do not depend on how many processes share the batch. The scheduler sees the
        adapter's own modality ids; the batch returned has them offset into the backbone's
        table."""
        w, r = self.dist.world_size, self.dist.rank
        full = batch if w == 1 else batch.repeat_samples(w)
        plan = m.scheduler.plan(full, generator=gen)
        batch = attrs.evolve(batch, modality_ids=batch.modality_ids + m.id_offset)
        noise = torch.randn(full.tokens.shape, generator=gen, device=self.device)
        drop = torch.rand(full.tokens.shape[0], generator=gen, device=self.device)
        rows = slice(r, None, w)
        plan = attrs.evolve(plan, **{f.name: getattr(plan, f.name)[rows]
                                     for f in attrs.fields(type(plan))})
        if batch.labels is not None and self.config.label_dropout > 0:
            null = torch.full_like(batch.labels, self.backbone.num_classes)
            batch = attrs.evolve(batch, labels=torch.where(
                drop[rows] < self.config.label_dropout, null, batch.labels))
        if has_text(batch) and self.config.caption_dropout > 0:  # to the empty prompt
            batch = drop_prompts(batch, drop[rows] < self.config.caption_dropout,
                                 self.empty_text)
        return batch, plan, noise[rows]

    def _empty_text(self, stores) -> TextEncoding | None:
        if self.text_encoder is None:
            return None
        if self.text_encoder.trainable:
            return empty_encoding(self.text_encoder)
        length = self.text_encoder.spec().max_length
        records = [store.schema[EMPTY_PROMPT] for store in stores]
        if any(r != records[0] for r in records[1:]):  # one encoder, one encoding of ""
            names = [m.spec.store for m in self.modalities]
            raise ConfigError([f"$.text_encoder: the stores {names} hold different encodings "
                               "of the empty prompt; re-encode them with one text encoder"])
        return encoding_from_record(records[0], length)

    def _check_captions(self, stores) -> None:
        """A prompt-conditioned run reads captions: every store must hold them."""
        missing = [m.spec.store for m, store in zip(self.modalities, stores)
                   if CAPTIONS not in store.fields]
        if missing:
            raise ConfigError([f"$.text_encoder: the store {path} holds no {CAPTIONS!r} field; "
                               "a run with a text_encoder needs a captioned store (a modality "
                               "source with captions)" for path in missing])

    def _next_batch(self) -> tuple[ModalityRuntime, TokenBatch]:
        """The next batch (of one modality) on the device, as its adapter made it."""
        source, batch = next(self.batches)
        m = self.modalities[source]
        self.current_modality = m.name
        return m, batch.to(self.device)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed((self.config.seed << 32) + step)

    # -- the algorithm -------------------------------------------------------------------------
    def train_step(self) -> LossTerms:
        """One optimizer step of Self-Flow over ``grad_accum`` micro-batches (all of one
        modality, drawn once per step by the loader): per micro-batch the timestep plan (t, s,
        mask) and one noise draw, then the objective (student at the mixed times, EMA teacher at
        the cleaner ``min(t, s)``, flow + gamma * representation loss); then clip, AdamW, and the
        teacher's EMA update."""
        step = self.step + 1
        gen = self._generator(step)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.config.grad_accum
        for micro in range(accum):
            m, batch = self._next_batch()
            batch, plan, noise = self._draw(batch, m, gen)
            sync = nullcontext() if micro == accum - 1 else self.parallel.no_sync(self.trained)
            with sync, self._autocast():
                terms = self.trained(self.teacher, batch, plan, noise)  # student, target, loss
                if self.config.on_nonfinite == "skip" and not self._finite(terms, step):
                    for _ in range(accum - micro - 1):  # the step's other micro-batches go
                        next(self.batches)              # too: the next starts a new group
                    return terms
                (terms.total * (m.spec.weight / accum)).backward()
        grad_norm = self.parallel.clip_grad_norm_(self.model.parameters(),
                                                  self.config.optim.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.teacher.update(self.backbone, step=step)
        if self.eval_ema is not None:
            self.eval_ema.update(self.backbone)
        self.step = step
        self._last_plan = plan
        self.step_losses.record(step, terms, m.name)
        return attrs.evolve(terms, metrics={**terms.metrics, "grad_norm": grad_norm.detach(),
                                            "lr": torch.tensor(self.lr_schedule.get_last_lr()[0])})

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def losses(self) -> list[float]:
        """The loss of each recent step (mean over ranks), up to the last read-back."""
        return self.step_losses.history

    def _finite(self, terms: LossTerms, step: int) -> bool:
        """``on_nonfinite="skip"``: is this micro-batch's loss finite on every rank (a host sync
        per micro-step, the price of deciding before the optimizer step)? Every rank takes the
        same branch (a rank that skipped alone would leave the others waiting in DDP's
        all-reduce)."""
        finite = bool(torch.isfinite(terms.total.detach()))
        if not self.dist.any(not finite):
            return True
        local = {k: float(getattr(terms, k).detach()) for k in ("total", "flow", "rep")}
        message = self._nonfinite_message(step, local)
        if self.skipped < self.config.max_skipped:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.message(
                f"{message}; batch skipped ({self.skipped}/{self.config.max_skipped})")
            return False
        raise NonFiniteLossError(message + "; the last checkpoint in "
                                 f"{self.run_dir / 'checkpoints'} is intact")

    def _nonfinite_message(self, step: int, local: dict[str, float]) -> str:
        if not _finite(local["total"]):
            bad = [k for k in ("flow", "rep") if not _finite(local[k])] or ["total"]
            return f"non-finite loss at step {step}: " + ", ".join(f"{k}={local[k]}" for k in bad)
        return (f"non-finite loss at step {step}: on another rank (rank {self.dist.rank}'s loss "
                f"is finite)")

    def _read_back(self) -> None:
        """Bring the pending step losses to the host (one sync); stop on a non-finite one before
        anything is written from the weights it produced."""
        bad = self.step_losses.flush()
        if bad is not None:
            step, local, _ = bad
            raise NonFiniteLossError(self._nonfinite_message(step, local) + "; the last checkpoint "
                                     f"in {self.run_dir / 'checkpoints'} is intact")

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        lock = lock_run_dir(self.run_dir) if self.dist.is_main else None
        try:
            return self._fit()
        finally:
            try:
                # stop the loader's threads here, where a second Ctrl-C is an ordinary
                # KeyboardInterrupt, not in the generator's finalizer at interpreter exit
                # ("Exception ignored in: <generator LatentLoader.__iter__>"); a later fit()
                # continues from the same batch (the loader keeps its position)
                self.batches.close()
                self.batches = iter(self.loader)
            finally:
                if lock is not None:
                    lock.release()

    def _fit(self) -> dict:
        self.resume()
        hooks = self.components.pm.hook
        self.tracker.log_hparams(self.config_data)
        hooks.selfflow_on_train_start(trainer=self)
        t0, s0 = time.perf_counter(), self.step
        try:
            # the signal handlers stay until the last checkpoint is written: a SIGTERM arriving
            # then lets it finish instead of killing the process half-way through
            with self.stop:
                reason = self._loop(hooks)
                if not self.parallel.checkpoint_path(self.run_dir / "checkpoints",
                                                     self.step).exists():
                    self.save()
                samples = self.write_samples() if reason == "done" else []
        except BaseException:
            hooks.selfflow_on_train_end(trainer=self, step=self.step, reason="error")
            self.tracker.close()
            raise
        self.progress.close()
        if reason == "signal":
            self.progress.message(f"stopped by {self.stop.received} after step {self.step}; "
                                  f"checkpoint written to {self.run_dir / 'checkpoints'}")
        hooks.selfflow_on_train_end(trainer=self, step=self.step, reason=reason)
        self.tracker.close()
        elapsed = time.perf_counter() - t0
        return {"step": self.step, "reason": reason, "seconds": elapsed,
                "steps_per_s": (self.step - s0) / max(elapsed, 1e-9),
                "final_loss": self.losses[-1] if self.losses else None,
                "start_step": s0, "steps_run": self.step - s0,  # 0: a finished run, re-sampled
                "samples_dir": str(self.samples_dir()) if samples else None}

    def _loop(self, hooks) -> str:
        """Train until ``config.steps`` ("done") or a stop signal ("signal")."""
        while self.step < self.config.steps:
            before = self.step
            terms = self.train_step()
            if self.step == before:  # skipped batch
                continue
            hooks.selfflow_on_step_end(trainer=self, step=self.step, terms=terms)
            self._diagnose()
            log = self.step % self.config.log_every == 0 or self.step == self.config.steps
            save = self.step % self.config.checkpoint.every == 0
            sample = self.config.sampling.every and self.step % self.config.sampling.every == 0
            stop = self.dist.any(self.stop.received is not None)
            metrics = None
            if log or save or sample or stop:  # the only device->host reads of the loop
                self._read_back()
                metrics = self._global_metrics(terms.metrics) if log else None
                if metrics is not None and len(self.modalities) > 1:  # which modality learns
                    metrics.update(self.step_losses.take_by_modality())
            self.progress.update(self.step, metrics)
            if metrics is not None and self.step % self.config.log_every == 0:
                metrics["samples_per_s"] = self._throughput()
                self.tracker.log_metrics(metrics, step=self.step)
                self.tracker.log_distribution(
                    "timesteps/student", self._last_plan.student_t.flatten().cpu().numpy(),
                    step=self.step)
            if save:
                self.save()
            if sample:
                self.write_samples()
            if stop:
                return "signal"
        return "done"

    def _diagnose(self) -> None:
        """``config.diagnostics`` of the raw student, every ``every`` steps (every rank computes
        them, so a sharded model works; the main rank logs them)."""
        every = self.config.diagnostics.every
        if not every or self.step % every:
            return
        metrics = {f"diag/{name}/{k}": v for name, hook in self.diagnostics.items()
                   for k, v in hook.report(self.backbone).items()}
        self.tracker.log_metrics(metrics, step=self.step)

    def _global_metrics(self, metrics) -> dict[str, float]:
        """Metrics averaged over ranks (each rank's are of its share of the batch), so logs and
        ``losses`` do not depend on the number of processes and agree on every rank."""
        names = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(self.device)
                              for k in names])
        return dict(zip(names, self.dist.mean(values).tolist()))

    def _throughput(self) -> float:
        batch = sum(m.spec.batch_size * m.spec.probability for m in self.modalities) / sum(
            m.spec.probability for m in self.modalities)
        return self.progress.rate(self.step) * batch

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "skipped": self.skipped,
            "config": json.dumps(self.config_data, sort_keys=True),
            "model": self.backbone.state_dict(), "head": self.model.objective.state_dict(),
            "teacher": self.teacher.state_dict(),
            "eval_ema": self.eval_ema.state_dict() if self.eval_ema else {},
            "optimizer": self.parallel.optimizer_state_dict(self.model, self.optimizer),
            "lr_schedule": self.lr_schedule.state_dict(),
            "loader": self.loader.state_dict(), "losses": list(self.losses[-LOSS_HISTORY:]),
            "rng": checkpoint.rng_state(),
        }

    def save(self) -> Path | None:
        # rank 0 writes a file, or (FSDP2) every rank writes its shards of a checkpoint directory
        path = self.parallel.save(self.state_dict, self.run_dir / "checkpoints", self.step,
                                  keep=self.config.checkpoint.keep)
        if not self.dist.is_main:
            return None
        self.components.pm.hook.selfflow_on_checkpoint(trainer=self, step=self.step, path=path)
        return path

    def _drift_error(self, path: Path, drift: list[str]) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} was written by a different config (differs in: "
            f"{', '.join(drift)}): to train this config, give it a run directory of its own "
            f"(override run_dir=<new dir>), or delete {path.parent} to train it in "
            f"{self.run_dir} from step 0; to resume, use the config the checkpoint was "
            f"written with")

    def _refuse_drifted_checkpoint(self) -> None:
        """The :class:`CheckpointError` of :meth:`resume` for a config that differs from the run's
        latest checkpoint, raised from ``__init__`` (reading only the checkpoint's config; one
        that cannot be read is left for :meth:`resume` to name)."""
        path = checkpoint.latest(self.run_dir / "checkpoints")
        saved = checkpoint.saved_config(path) if path is not None else None
        drift = config_drift(saved, self.config_data) if saved is not None else []
        if drift:
            checkpoint.load_meta(path)  # damaged rather than different: that error instead
            raise self._drift_error(path, drift)

    def resume(self, path: Path | None = None) -> bool:
        """Load ``path`` or the run's latest checkpoint; False when there is none."""
        if self.dist.is_main:  # what checkpoint writes killed mid-way left behind
            checkpoint.remove_stale_temps(self.run_dir / "checkpoints")
        path = path or checkpoint.latest(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = self.parallel.load(path)
        drift = config_drift(json.loads(state["config"]), self.config_data)
        if drift:
            raise self._drift_error(path, drift)
        if state["head"] and self.model.objective.head is None:  # an older run's unused head
            state = drop_unused_head(state)
        saved_ema = bool(state["eval_ema"])  # an evaluation EMA may be added on resume
        template = self.state_dict if saved_ema else lambda: {**self.state_dict(), "eval_ema": {}}
        state = self.parallel.load_shards(path, state, template)  # FSDP2: own shards
        self.backbone.load_state_dict(state["model"])
        self.model.objective.load_state_dict(state["head"])
        self.teacher.load_state_dict(state["teacher"])
        if self.eval_ema and saved_ema:
            self.eval_ema.load_state_dict(state["eval_ema"])
        elif self.eval_ema:
            self.eval_ema.restart(self.backbone)
        self.parallel.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        # the checkpoint is rank 0's; the loader position (batches given overall and per store)
        # is the same on every rank, so each rank continues its own shard from it
        try:
            self.loader.load_state_dict({**state["loader"], "rank": self.dist.rank})
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        self.batches = iter(self.loader)
        self.step, self.skipped = state["step"], state["skipped"]
        self.step_losses.history = list(state["losses"])
        checkpoint.set_rng_state(state["rng"])
        self.progress = Progress(self.config.steps, self.step, enabled=self.progress.enabled,
                                 every=self.config.log_every)
        self.progress.message(f"resumed from {path} at step {self.step}")
        return True

    # -- samples -------------------------------------------------------------------------------
    def eval_weights(self) -> str:
        """Which weights samples come from (a key of ``eval.samples.WEIGHTS``): the evaluation
        EMA (every method's by default), else the EMA teacher, else the raw student."""
        if self.eval_ema is not None:
            return "eval_ema"
        return "ema_teacher" if self.teacher.model is not None else "student"

    def eval_model(self):
        """The model samples come from (:meth:`eval_weights`)."""
        weights = self.eval_weights()
        if weights == "eval_ema":
            return self.eval_ema.model
        return self.teacher.model if weights == "ema_teacher" else self.backbone

    def sample_info(self) -> dict:
        """What the samples of this step come from (the samples folder's ``sample_info.json``)."""
        weights = self.eval_weights()
        updates = (self.eval_ema.updates if weights == "eval_ema" else
                   self.teacher.state_dict().get("updates") if weights == "ema_teacher" else None)
        return sample_info(self.config, self.teacher, weights, step=self.step, updates=updates,
                           sampling=self.config.sampling)

    def samples_dir(self) -> Path:
        """Where :meth:`write_samples` writes the current step's samples (one folder each)."""
        return self.run_dir / "samples" / f"step-{self.step:08d}"

    def write_samples(self) -> list[Path]:
        if not self.dist.is_main and not self.parallel.samples_on_every_rank:
            return []  # under FSDP2 every rank runs the (sharded) model; rank 0 saves
        paths = []
        for m in self.modalities:
            out = self.samples_dir() / m.name
            tokens, labels = generate(self.eval_model(), m, self.config.sampling,
                                      null_label=self.backbone.num_classes, device=self.device,
                                      text=self.text_encoder, empty_text=self.empty_text)
            if self.dist.is_main:
                prompts = prompt_list(self.config.sampling) if self.text_encoder else None
                paths += save_samples(m, tokens, labels, out, prompts)
                if prompts and self.config.sampling.evaluate and m.adapter.evaluation_prompts(1):
                    scores = prompt_metrics(m.adapter, tokens, prompts)
                    self.tracker.log_metrics({f"eval/{m.name}/{k}": v for k, v in scores.items()},
                                             step=self.step)
        if self.dist.is_main:  # which weights they came from
            write_info(self.samples_dir(), self.sample_info())
        self.tracker.log_images("samples", paths, step=self.step)
        return paths
