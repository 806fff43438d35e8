"""Convergence of the four methods: FD and per-layer linear probes against training steps.

Methods differ only in config and all run through the same ``Trainer``:

    vanilla   SingleTimestep + NoTeacher          (flow matching)
    dts       DualTimestep   + NoTeacher          (Dual-Timestep Scheduling alone)
    selfflow  DualTimestep   + EMATeacher         (Self-Flow)
    repa      SingleTimestep + REPATeacher        (REPA; gamma = 0.5, the REPA paper's lambda)

and, on request (``--methods ...,repa_label_free``), ``repa_label_free``: REPA with a frozen encoder
trained without labels (a masked autoencoder of the same architecture, initialisation and steps).
The default ``repa`` encoder is a classifier of this data, trained with its labels: the strongest
teacher at hand, and the one the recorded results used; the difference between the two is what
the labels add to REPA's lead (REPA's own DINOv2 is self-supervised). REPA's projector is REPA's
three-layer MLP of hidden width ``--repa-hidden`` (2048, REPA's; at the 4x64 size it has ~13x the
backbone's parameters and dominates a REPA step's CPU time, so a smaller width is the cheap
look, not REPA's setting).

Modalities (``--modality``): ``image`` (sklearn digits), ``audio`` (espeak-ng spoken digits) and
``video`` (moving digits). Fixed evaluators per modality (:mod:`evaluators`), trained once, stored
under ``--assets/<modality>`` and reused by every later run (their SHA-256 goes into every
result): the FD feature extractor (``mlp`` for images and video, the translation-robust ``conv``
for audio) and REPA's frozen external encoder. The video evaluators classify held-out clips
barely above chance (a digit moving in 2-D needs a 2-D/3-D convolution over pixels, not built),
so video FD says little; audio is the second modality whose numbers mean something.

Evaluation (``--evals`` points of each main run, on the raw student weights, or with ``--eval-ema``
on an EMA of them, alike for every method): FD between
``--samples`` class-conditional samples (classes cycled, Euler, ``--sample-steps`` steps, no CFG,
sampling seed fixed: all runs share the initial noise) and all real samples, in the extractor's
features; generated tokens are clamped to the real data's range first. Linear probe per block
(:func:`selfflow_core.eval.diagnostics.probe_layers`: null-class features at ``t = --probe-t``, mean
pooled, ridge probe, 30 % held out), effective rank, and the flow loss in 5 buckets of t.

Sweeps (``--sweeps``, ``--sweep-seeds`` seeds per point; a point equal to a main run reuses it):
``size`` (vanilla and Self-Flow at each depth x width of ``--sizes``), ``length`` (vanilla and
Self-Flow for ``--long-steps``, evaluated along the way: with the constant LR the model at step s
of a long run is the model of an s-step run, so one curve is FD against training length),
``ema`` (Self-Flow's teacher decay with and without warm-up), ``mask`` (``--mask-ratios``).
Sweep-only runs are evaluated at their last step (``--sweep-evals``). Results go to
``--out/<name>.json`` and, with matplotlib (the ``bench`` extra), ``<name>.png`` and
``<name>_sweeps.png``.

    python benchmarks/convergence.py --resume              # the CPU run of RESULTS.md: 74 runs,
        # 4x64 DiT, 600 steps, 5 seeds (--resume skips runs an interrupted invocation with the
        # same settings finished)
    python benchmarks/convergence.py --modality audio --resume
    python benchmarks/convergence.py --sweeps none --seeds 1 --steps 100 --size 3x48  # a look
    python benchmarks/convergence.py --steps 20000 --evals 20 --samples 5000 --batch 256 \\
        --size 8x256 --sizes 4x128,8x256,12x384 --jobs 1      # a larger run (GPU or patience)
"""

from __future__ import annotations

import argparse
import hashlib
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
    print_table,
    run_jobs,
    steps_to_reach,
    summarize_sweep,
    write_json,
)
from evaluators import LABEL_FREE_FILE, LABEL_FREE_KEY, REPA_FEATURES, build_assets
from plots import plot_convergence

from selfflow_core.plugins.hookspecs import hookimpl

# ---- modalities --------------------------------------------------------------------------------

@attrs.frozen
class Setup:
    """What the benchmark fixes per modality: the data, Self-Flow's mask ratio and p(t) (the
    paper's setting for the modality), and the FD extractor's architecture."""

    modality: object
    source: str
    mask_ratio: float
    distribution: object
    extractor: str
    asset_noise: float = 0.05


def modality_setup(name: str, video_count: int) -> Setup:
    from selfflow_core.timesteps import LogitNormal, Uniform

    if name == "image":
        from selfflow_image.adapter import ImageModality
        return Setup(ImageModality.Config(patch=2, size=8, channels=1, classes=10), "digits",
                     0.25, Uniform.Config(), "mlp")
    if name == "audio":
        from selfflow_audio.adapter import AudioModality
        # 320 espeak-ng clips of ~1 s: 64 log-mel frames x 16 mels -> 32 tokens of 2 frames
        return Setup(AudioModality.Config(classes=10, frames_per_token=2, n_mels=16, hop=256,
                                          frames=64),
                     "spoken_digits", 0.5, LogitNormal.Config(shift=1.0), "conv")
    if name == "video":
        from selfflow_video.adapter import VideoModality
        return Setup(VideoModality.Config(size=16, frames=8, patch=4, temporal_patch=2,
                                          classes=10, count=video_count),
                     "moving_digits", 0.1, LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                     "mlp")  # weak: ~17 % held out (conv along the token order: ~23 %)
    raise SystemExit(f"--modality {name!r}: this benchmark knows image, audio and video "
                     f"(robotics has conditioning tokens and no class labels to probe)")


def real_batch(mod_cfg, source: str):
    adapter = mod_cfg.build()
    raw = adapter.open_source(source)
    arrays = adapter.encode(raw.read(0, len(raw)))
    return adapter.tokenize({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


# ---- one run -----------------------------------------------------------------------------------

class Evaluator:
    """Plugin object: at each step in ``at``, FD and probes of ``trainer.backbone``."""

    def __init__(self, at, real, real_stats, extractor_path, args, null_label) -> None:
        from selfflow_repa.teacher import load_encoder

        self.at, self.real, self.args = set(at), real, args
        self.mu, self.cov = real_stats
        self.extractor = load_encoder(extractor_path)
        self.null_label = null_label
        self.clamp = (float(real.tokens.min()), float(real.tokens.max()))
        self.rows: list[dict] = []

    def fd(self, backbone, adapter) -> float:
        from metrics import frechet_distance_from_stats, gaussian_stats

        from selfflow_core.sampling import sample

        a = self.args
        gen = torch.Generator().manual_seed(a.sample_seed)
        prompt = adapter.prompt(a.samples)
        labels = torch.arange(a.samples) % adapter.num_classes
        prompt = attrs.evolve(prompt, labels=labels)
        was = backbone.training
        backbone.eval()
        tokens = sample(backbone, prompt, steps=a.sample_steps, method="euler",
                        null_label=self.null_label, generator=gen)
        backbone.train(was)
        with torch.no_grad():
            feats = self.extractor(tokens.clamp(*self.clamp)).double().numpy()
        return frechet_distance_from_stats(*gaussian_stats(feats), self.mu, self.cov)

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        now = time.perf_counter()
        if step == 1:
            self.t_first, self.eval_total = now, 0.0
        self.t_last = now
        if step not in self.at:
            return
        from selfflow_core.eval.diagnostics import loss_by_timestep, probe_layers

        # the raw student, or with --eval-ema its EMA (the same kind of weights for every method)
        backbone = trainer.eval_ema.model if trainer.eval_ema is not None else trainer.backbone
        row = {"step": step, "fd": self.fd(backbone, trainer.modalities[0].adapter)}
        row.update(probe_layers(backbone, self.real, t=self.args.probe_t))
        if step == max(self.at):
            row.update(loss_by_timestep(backbone, self.real, buckets=5))
        row["train_loss"] = float(np.mean(trainer.losses[-20:]))
        row["eval_s"] = time.perf_counter() - now
        self.eval_total += row["eval_s"]
        self.rows.append(row)
        self.t_last = time.perf_counter()

    def train_s_per_step(self, steps: int) -> float:
        """Training time per step between the ends of step 1 and the last, evaluations excluded."""
        return (self.t_last - self.t_first - self.eval_total) / max(1, steps - 1)


def make_config(job: dict):
    from selfflow_repa import REPATeacher
    from selfflow_repa.projector import REPA_HIDDEN

    from selfflow_core.builtin.dit import DiT
    from selfflow_core.builtin.trackers import NullTracker
    from selfflow_core.config.run import (
        CheckpointConfig,
        ModalitySpec,
        OptimConfig,
        TrainerConfig,
    )
    from selfflow_core.objective import ObjectiveConfig
    from selfflow_core.sampling import SamplingConfig
    from selfflow_core.teachers import EMATeacher, NoTeacher
    from selfflow_core.timesteps import DualTimestep, SingleTimestep

    method, setup = job["method"], job["setup"]
    dist = setup.distribution
    scheduler = (DualTimestep.Config(distribution=dist, mask_ratio=job["mask_ratio"])
                 if method in ("dts", "selfflow") else SingleTimestep.Config(distribution=dist))
    gamma = 0.8
    if method == "selfflow":
        teacher = EMATeacher.Config(decay=job["ema_decay"], warmup=job["ema_warmup"])
    elif method in REPA_METHODS:
        which = "encoder" if method == "repa" else "encoder_label_free"
        teacher = REPATeacher.Config(encoder=job[which], feature_dim=REPA_FEATURES,
                                     sha256=job[f"{which}_sha256"],
                                     projector_hidden=job["args"].get("repa_hidden", REPA_HIDDEN))
        gamma = 0.5  # REPA's lambda (the core's default 0.8 is Self-Flow's gamma)
    else:
        teacher = NoTeacher.Config()
    depth, width = job["size"]
    layers = {} if depth >= 3 else {"student_layer": 1, "teacher_layer": depth}  # 0.3/0.7 collide
    return TrainerConfig(
        modalities={"data": ModalitySpec(modality=setup.modality, store=job["store"], source="",
                                         scheduler=scheduler, batch_size=job["batch"])},
        backbone=DiT.Config(depth=depth, width=width, heads=4),
        teacher=teacher, objective=ObjectiveConfig(gamma=gamma, **layers),
        optim=OptimConfig(lr=job["lr"], warmup_steps=20, schedule="constant"),
        checkpoint=CheckpointConfig(every=10 ** 9, keep=1),
        sampling=SamplingConfig(count=10, steps=2), tracker=NullTracker.Config(),
        steps=job["steps"], seed=job["seed"], run_dir=job["run_dir"], log_every=10 ** 9,
        # no warm-up: the recorded results were measured with a plain EMA of the student
        eval_ema_decay=job["args"]["eval_ema"] or None, eval_ema_warmup=False)


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

    args = argparse.Namespace(**job["args"])
    ev = Evaluator(eval_steps(job["steps"], job["evals"]), job["real"], job["real_stats"],
                   job["extractor"], args, null_label=job["setup"].modality.classes)
    config = make_config(job)
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
            "final_loss": summary["final_loss"]}


# ---- the runs ----------------------------------------------------------------------------------

def plan_runs(args, base: dict, sweeps: set[str]) -> dict[str, dict]:
    """Every run the invocation needs, once: a sweep point equal to a main run (same method,
    seed and settings) reuses it and is listed under both groups."""
    jobs: dict[str, dict] = {}
    main_size = parse_size(args.size)

    def add(method, seed, group, variant="", *, steps=None, size=None, ema_decay=None,
            ema_warmup=True, mask_ratio=None):
        sf, dual = method == "selfflow", method in ("dts", "selfflow")
        job = {**base, "method": method, "seed": seed, "steps": steps or args.steps,
               "size": size or main_size,
               "ema_decay": (args.ema_decay if ema_decay is None else ema_decay) if sf else None,
               "ema_warmup": ema_warmup if sf else None,
               "mask_ratio": (base["setup"].mask_ratio if mask_ratio is None else mask_ratio)
               if dual else None}
        key = json.dumps([method, seed, job["steps"], list(job["size"]), job["ema_decay"],
                          job["ema_warmup"], job["mask_ratio"]])
        evals = {"main": args.evals, "length": args.evals * job["steps"] // args.steps}.get(
            group, args.sweep_evals)
        if key not in jobs:
            jobs[key] = {**job, "key": key, "run_dir": str(Path(args.work) / f"run-{len(jobs)}"),
                         "groups": {}, "evals": evals}
        jobs[key]["evals"] = max(jobs[key]["evals"], evals)
        jobs[key]["groups"][group] = variant

    for seed in range(args.seeds):
        for m in args.methods:
            add(m, seed, "main")
    seeds = range(args.sweep_seeds)
    pair = ("vanilla", "selfflow")
    if "size" in sweeps:
        for s in args.sizes.split(","):
            for m in pair:
                for seed in seeds:
                    add(m, seed, "size", variant=s, size=parse_size(s))
    if "length" in sweeps:
        long_steps = args.long_steps or 4 * args.steps
        for m in pair:
            for seed in seeds:
                add(m, seed, "length", variant=f"{long_steps} steps", steps=long_steps)
    if "ema" in sweeps:
        for warm, decays in ((True, args.ema_decays), (False, args.ema_decays_no_warmup)):
            for d in (float(x) for x in decays.split(",") if x):
                for seed in seeds:
                    add("selfflow", seed, "ema",
                        variant=f"decay {d}, {'warm-up' if warm else 'no warm-up'}",
                        ema_decay=d, ema_warmup=warm)
    if "mask" in sweeps:
        for r in (float(x) for x in args.mask_ratios.split(",")):
            for seed in seeds:
                add("selfflow", seed, "mask", variant=f"mask {r}", mask_ratio=r)
    return jobs


# ---- aggregation -------------------------------------------------------------------------------

def summarize(results: list[dict], args) -> dict:
    main = [r for r in results if "main" in r["groups"]]
    by_method = {m: [r for r in main if r["method"] == m] for m in args.methods}
    out: dict = {"methods": {}}
    vanilla_curve = curve_mean(by_method.get("vanilla", []), "fd")
    target = vanilla_curve[-1][1] if vanilla_curve else None
    for m, runs in by_method.items():
        if not runs:
            continue
        fd_curve = curve_mean(runs, "fd")
        layers = sorted({int(k.split("layer")[1]) for run in runs for r in run["curve"]
                         for k in r if k.startswith("probe_acc/")})
        probes = {f"layer{i}": curve_mean(runs, f"probe_acc/layer{i}") for i in layers}
        reach = steps_to_reach(fd_curve, target) if target is not None else None
        out["methods"][m] = {
            "seeds": len(runs), "fd_curve": fd_curve, "probe_curves": probes,
            "erank_curves": {f"layer{i}": curve_mean(runs, f"erank/layer{i}") for i in layers},
            "flow_t_final": {k: mean_spread([run["curve"][-1][k] for run in runs])
                             for k in runs[0]["curve"][-1] if k.startswith("flow_t/")},
            "steps_to_vanilla_final_fd": reach,
            "speedup_vs_vanilla": (vanilla_curve[-1][0] / reach) if reach else None,
            "train_s_per_step": mean_spread([r["train_s_per_step"] for r in runs]),
        }
    out["vanilla_final_fd"] = target
    groups: dict[str, list] = {}
    for r in results:
        for g, variant in r["groups"].items():
            if g != "main":
                groups.setdefault(g, []).append((variant, r))
    out["sweeps"] = {g: summarize_sweep(points) for g, points in groups.items()}
    return out


# ---- main --------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    d, w = text.lower().split("x")
    return int(d), int(w)


def ms(pair) -> str:
    return f"{pair[0]:.2f} ± {pair[1]:.2f}"


def print_report(summary: dict, args, floor: list[float], n_floor: int) -> None:
    print(f"\nFD vs steps (mean ± std over {args.seeds} seeds; vanilla's final FD "
          f"{summary['vanilla_final_fd']:.2f}; real-vs-real FD at n={n_floor}: "
          f"{statistics.fmean(floor):.2f})")
    first = next(iter(summary["methods"].values()))
    rows = []
    for m, s in summary["methods"].items():
        rows.append([m] + [ms(c[1:]) for c in s["fd_curve"]] + [
            "—" if s["speedup_vs_vanilla"] is None else f"{s['speedup_vs_vanilla']:.2f}x",
            f"{s['train_s_per_step'][0] * 1e3:.0f}"])
    print_table(["method"] + [f"step {c[0]}" for c in first["fd_curve"]]
                + ["vs vanilla", "ms/step"], rows)
    print("\nlinear probe accuracy at the last step, per block (mean ± std)")
    print_table(["method"] + list(first["probe_curves"]), [
        [m] + [f"{c[-1][1]:.3f} ± {c[-1][2]:.3f}" for c in s["probe_curves"].values()]
        for m, s in summary["methods"].items()])
    print("\nflow loss by t bucket at the last step (mean over seeds)")
    buckets = list(first["flow_t_final"])
    print_table(["method"] + [b.split("/")[1] for b in buckets], [
        [m] + [s["flow_t_final"][b][0] for b in buckets] for m, s in summary["methods"].items()])
    for g, rows_ in summary["sweeps"].items():
        print(f"\nsweep: {g} (mean ± std over seeds; gap: Self-Flow - vanilla, paired by seed)")
        print_table(["variant", "method", "params", "steps", "seeds", "final FD", "gap",
                     "best probe"], [
            [r["variant"], r["method"], r["params"], r["steps"], len(r["seeds"]),
             ms(r["final_fd"]), ms(r["fd_gap_vs_vanilla"]) if "fd_gap_vs_vanilla" in r else "",
             f"{r['best_probe'][0]:.3f} ± {r['best_probe'][1]:.3f}"] for r in rows_])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="image", choices=["image", "audio", "video"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the main runs")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--evals", type=int, default=6, help="evaluation points per main run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", default="4x64", help="depth x width of the main runs (4 heads)")
    ap.add_argument("--samples", type=int, default=1000, help="generated samples per FD")
    ap.add_argument("--sample-steps", type=int, default=16)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--probe-t", type=float, default=0.25)
    ap.add_argument("--eval-ema", type=float, default=0.0,
                    help="evaluate an EMA of the student of this decay (0: the raw student)")
    ap.add_argument("--ema-decay", type=float, default=0.99,
                    help="Self-Flow's EMA decay outside the ema sweep (with warm-up)")
    ap.add_argument("--sweeps", default="size,length,ema,mask",
                    help="comma list of size, length, ema, mask; or none")
    ap.add_argument("--sweep-seeds", type=int, default=3, help="seeds per sweep point")
    ap.add_argument("--sweep-evals", type=int, default=1,
                    help="evaluation points of sweep-only runs (1: the final step)")
    ap.add_argument("--sizes", default="2x32,3x48,4x64,6x96,8x128")
    ap.add_argument("--long-steps", type=int, default=0, help="length sweep (default 4 x steps)")
    ap.add_argument("--ema-decays", default="0.9,0.99,0.999", help="EMA sweep, with warm-up")
    ap.add_argument("--ema-decays-no-warmup", default="0.99,0.999,0.9999",
                    help="EMA sweep, without warm-up")
    ap.add_argument("--mask-ratios", default="0.1,0.25,0.4,0.5")
    ap.add_argument("--repa-hidden", type=int, default=2048,
                    help="hidden width of REPA's three-layer projector (2048: REPA's)")
    ap.add_argument("--video-count", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "selfflow-convergence"))
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON and PNG results")
    ap.add_argument("--assets", default=str(RESULTS / "convergence_assets"),
                    help="folder of the fixed evaluators (one subfolder per modality)")
    ap.add_argument("--name", default="", help="result name (default convergence[_modality])")
    ap.add_argument("--resume", action="store_true",
                    help="skip runs an interrupted invocation with the same settings finished")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if unknown := set(args.methods) - {*METHODS, LABEL_FREE}:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from "
                 f"{', '.join((*METHODS, LABEL_FREE))}")
    sweeps = set() if args.sweeps == "none" else set(args.sweeps.split(","))
    if unknown := sweeps - {"size", "length", "ema", "mask"}:
        ap.error(f"--sweeps: unknown {sorted(unknown)}; choose from size, length, ema, mask")
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    from metrics import frechet_distance, gaussian_stats
    from selfflow_repa.teacher import load_encoder

    from selfflow_core.config.converter import make_converter, to_data
    from selfflow_core.data.writer import encode_store
    from selfflow_core.plugins.manager import Components

    setup = modality_setup(args.modality, args.video_count)
    real = real_batch(setup.modality, setup.source)
    folder = Path(args.assets) / args.modality
    meta = build_assets(folder, {"modality": args.modality, "source": setup.source},
                        real.tokens, real.labels, extractor=setup.extractor,
                        noise=setup.asset_noise, label_free=LABEL_FREE in args.methods)
    extractor = load_encoder(folder / "fd_extractor.pt")
    with torch.no_grad():
        real_feats = extractor(real.tokens.float()).double().numpy()
    real_stats = gaussian_stats(real_feats)
    rng = np.random.default_rng(0)
    # the FD of real samples against the whole real set: the floor (half the set when --samples
    # would take all of it, which would give exactly 0)
    n_floor = args.samples if args.samples < len(real_feats) else len(real_feats) // 2
    floor = [frechet_distance(real_feats[rng.choice(len(real_feats), n_floor, replace=False)],
                              real_feats) for _ in range(3)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"{args.modality}.zarr"
    components = Components()
    encode_store(setup.modality.build(), setup.source, store, progress=False,
                 adapter_config=to_data(make_converter(components), setup.modality))

    base = {"setup": setup, "store": str(store), "batch": args.batch, "lr": args.lr,
            "encoder": str(folder / "repa_encoder.pt"),
            "encoder_sha256": meta["repa_encoder"]["sha256"],
            "encoder_label_free": str(folder / LABEL_FREE_FILE),
            "encoder_label_free_sha256": meta.get(LABEL_FREE_KEY, {}).get("sha256", ""),
            "extractor": str(folder / "fd_extractor.pt"), "real": real,
            "real_stats": real_stats, "args": vars(args)}
    jobs = plan_runs(args, base, sweeps)
    todo = sorted(jobs.values(), key=lambda j: -j["steps"] * j["size"][0] * j["size"][1] ** 2)
    print(f"{len(todo)} runs ({args.modality}, {args.jobs} parallel, 1 thread each); assets in "
          f"{folder}; FD extractor held-out acc {meta['fd_extractor']['heldout_acc']:.3f}, "
          f"REPA encoder held-out acc {meta['repa_encoder']['heldout_acc']:.3f}"
          + (f"; label-free REPA encoder: ridge-probe held-out acc "
             f"{meta[LABEL_FREE_KEY]['probe_heldout_acc']:.3f} (the label-trained one's "
             f"{meta[LABEL_FREE_KEY]['probe_heldout_acc_label_trained']:.3f})"
             if LABEL_FREE_KEY in meta else ""), flush=True)
    weak = [k for k in ("fd_extractor", "repa_encoder") if meta[k]["heldout_acc"] < 0.5]
    if weak:
        print(f"WARNING: {', '.join(weak)} classify held-out data poorly (< 50 %): FD and REPA "
              f"results of this modality say little", flush=True)
    # finished runs are appended to a partial file; --resume skips them (same evaluation settings)
    fixed = {k: getattr(args, k) for k in ("modality", "batch", "lr", "samples", "sample_steps",
                                           "sample_seed", "probe_t", "video_count", "eval_ema",
                                           "repa_hidden")}
    tag = hashlib.sha256(json.dumps([fixed, meta["fd_extractor"]["sha256"]], sort_keys=True)
                         .encode()).hexdigest()[:12]
    partial = work / f"partial-{tag}.jsonl"
    results, _ = run_jobs(
        jobs, todo, run_one, partial, resume=args.resume, workers=args.jobs,
        evals_of=lambda j: len(eval_steps(j["steps"], j["evals"])),
        describe=lambda res: (
            f"{res['method']:8s} seed {res['seed']} {res['groups']}: FD "
            f"{res['curve'][-1]['fd']:.2f} in {res['seconds']:.0f}s "
            f"({res['train_s_per_step'] * 1e3:.0f} ms/step, "
            f"{sum(c['eval_s'] for c in res['curve']):.0f}s evaluating)"))
    summary = summarize(results, args)
    wall = time.perf_counter() - t_start
    print_report(summary, args, floor, n_floor)

    name = args.name or ("convergence" if args.modality == "image"
                         else f"convergence_{args.modality}")
    protocol = {
        "fd": {"sampler": "euler", "sample_steps": args.sample_steps, "samples": args.samples,
               "cfg_scale": 1.0, "labels": "cycled 0..classes-1", "sample_seed": args.sample_seed,
               "reference": f"all {len(real_feats)} real samples",
               "clamp": [float(real.tokens.min()), float(real.tokens.max())],
               "extractor": str(folder / "fd_extractor.pt"),
               "extractor_architecture": setup.extractor,
               "extractor_sha256": meta["fd_extractor"]["sha256"],
               "extractor_heldout_acc": meta["fd_extractor"]["heldout_acc"],
               "real_vs_real_fd_at_n": floor, "real_vs_real_n": n_floor,
               "evaluated_weights": (f"EMA of the student, decay {args.eval_ema}" if args.eval_ema
                                     else "raw student (no EMA)")},
        "probe": {"t": args.probe_t, "labels_to_model": "null class", "pooling": "mean",
                  "probe": "closed-form ridge 1e-2 on standardised features", "holdout": 0.3,
                  "samples": len(real_feats)},
        "repa": {"encoder": str(folder / "repa_encoder.pt"),
                 "encoder_sha256": meta["repa_encoder"]["sha256"], "gamma": 0.5,
                 "feature_dim": REPA_FEATURES,
                 "encoder_heldout_acc": meta["repa_encoder"]["heldout_acc"],
                 "encoder_training": "classifier of the data (labels)",
                 "projector": f"Linear(d, {args.repa_hidden}) - SiLU - Linear({args.repa_hidden}, "
                              f"{args.repa_hidden}) - SiLU - Linear({args.repa_hidden}, "
                              f"{REPA_FEATURES})",
                 **({"label_free_encoder": str(folder / LABEL_FREE_FILE),
                     "label_free_encoder_sha256": meta[LABEL_FREE_KEY]["sha256"],
                     "label_free_encoder_training": meta[LABEL_FREE_KEY]["objective"],
                     "label_free_encoder_probe_heldout_acc":
                         meta[LABEL_FREE_KEY]["probe_heldout_acc"]}
                    if LABEL_FREE_KEY in meta else {})},
        "training": {"batch": args.batch, "lr": args.lr, "warmup": 20, "schedule": "constant",
                     "selfflow_ema": f"decay {args.ema_decay} with warm-up",
                     "mask_ratio": setup.mask_ratio, "gamma_selfflow": 0.8,
                     "layers": "0.3 / 0.7 of depth", "size": args.size,
                     "time_distribution": to_data(make_converter(components),
                                                  setup.distribution)},
    }
    out = Path(args.out)
    payload = {"args": dict(vars(args)), "protocol": protocol, "assets": meta, "wall_s": wall,
               "summary": summary, "runs": results}
    write_json(name, payload, folder=out)
    plots = plot_convergence(summary, out, name)
    print(f"wall time {wall:.0f}s" + (f"; plots: {[str(p) for p in plots]}" if plots else ""))
    return payload


if __name__ == "__main__":
    main()
