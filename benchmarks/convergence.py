"""Convergence of the four methods: FD and per-layer linear probes against training steps.

Methods differ only in config and all run through the same ``Trainer``:

    vanilla   SingleTimestep + NoTeacher          (flow matching)
    dts       DualTimestep   + NoTeacher          (Dual-Timestep Scheduling alone)
    selfflow  DualTimestep   + EMATeacher         (Self-Flow)
    repa      SingleTimestep + REPATeacher        (REPA; gamma = 0.5, the REPA paper's lambda)

Fixed per modality, built once and stored under ``benchmarks/results/convergence_assets/<modality>``
(reused by every later run; their SHA-256 goes into every result):

- ``fd_extractor.pt``: the FD feature extractor, a small MLP classifier trained on the real data's
  tokens (80 % split; held-out accuracy in ``assets.json``); FD uses its 64-d penultimate features.
- ``repa_encoder.pt``: REPA's frozen external encoder, a one-block token transformer trained to
  classify the same data (per-token features, 32-d). Another architecture and seed than the FD
  extractor, so REPA is not aligned to the very features it is scored with.

Evaluation (every ``--evals`` points of each run, on the raw student weights, no EMA): FD between
``--samples`` class-conditional samples (classes cycled, Euler, ``--sample-steps`` steps, no CFG,
sampling seed fixed: all runs share the initial noise) and all real samples, in the extractor's
features; generated tokens are clamped to the data's [-1, 1] first. Linear probe per block
(:func:`selfflow_core.diagnostics.probe_layers`: null-class features at ``t = --probe-t``, mean
pooled, ridge probe, 30 % held out), effective rank, and the flow loss in 5 buckets of t.

Sweeps (``--sweeps``; seed 0, Self-Flow against vanilla where it makes sense): ``size`` (depth x
width in ``--sizes``), ``length`` (vanilla and Self-Flow at ``--long-steps`` total steps; with the
constant LR schedule the curve of the main runs already is FD vs training length), ``ema`` (teacher
decay in ``--ema-decays``, and the middle one without warm-up), ``mask`` (``--mask-ratios``).
The default is ``size,ema,mask``. Sweep-only runs are evaluated at their last step only
(``--sweep-evals``), and the runs of the length sweep at ``--evals`` points.

    python benchmarks/convergence.py --resume              # the small CPU run: 21 runs of a 3x48
        # DiT, 200 steps, batch 64 (about 13 min on 2 shared cores with 2 jobs; --resume skips
        # runs an interrupted invocation with the same settings finished)
    python benchmarks/convergence.py --sweeps none --seeds 1 --steps 100     # a quick look
    python benchmarks/convergence.py --modality video --sweeps none --seeds 1 --steps 100
    python benchmarks/convergence.py --steps 3000 --evals 10 --samples 2000 --batch 128 \\
        --sizes 4x64,6x128,8x192 --jobs 1                  # a larger run (GPU or patience)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_json

from selfflow_core.hookspecs import hookimpl

ASSETS = RESULTS / "convergence_assets"
ASSET_VERSION = 1
METHODS = ("vanilla", "dts", "selfflow", "repa")
REPA_FEATURES = 32


# ---- modalities --------------------------------------------------------------------------------

def modality_setup(name: str, video_count: int):
    """(modality config, source, DualTimestep mask ratio, time distribution config)."""
    from selfflow_core.timesteps import LogitNormal, Uniform

    if name == "image":
        from selfflow_image.adapter import ImageModality
        return (ImageModality.Config(patch=2, size=8, channels=1, classes=10), "digits", 0.25,
                Uniform.Config())
    if name == "video":
        from selfflow_video.adapter import VideoModality
        return (VideoModality.Config(size=16, frames=8, patch=4, temporal_patch=2, classes=10,
                                     count=video_count),
                "moving_digits", 0.1, LogitNormal.Config(shift=2.95, tail_fraction=0.05))
    raise SystemExit(f"--modality {name!r}: this benchmark knows image and video (robotics has "
                     f"conditioning tokens and no class labels to probe)")


def real_batch(mod_cfg, source: str):
    adapter = mod_cfg.build()
    raw = adapter.open_source(source)
    arrays = adapter.encode(raw.read(0, len(raw)))
    return adapter.tokenize({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


# ---- the fixed feature extractors -------------------------------------------------------------

class FDExtractor(nn.Module):
    """Flattened tokens -> 128 -> 64 (the FD features; a linear head classifies them in
    training)."""

    def __init__(self, n: int, c: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(n * c, 128), nn.GELU(),
                                  nn.Linear(128, 64), nn.GELU())
        self.head = nn.Linear(64, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(tokens)


class TokenEncoder(nn.Module):
    """REPA's external encoder: tokens -> width-32 embedding + learned positions -> one pre-norm
    transformer block (2 heads) -> LayerNorm -> per-token features [B, N, 32]."""

    def __init__(self, n: int, c: int, classes: int, d: int = REPA_FEATURES) -> None:
        super().__init__()
        self.inp = nn.Linear(c, d)
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.norm1, self.norm2, self.out_norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads = 2
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.inp(tokens) + self.pos
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        h = h + self.mlp(self.norm2(h))
        return self.out_norm(h)


def _train_classifier(net: nn.Module, features_of, x: torch.Tensor, y: torch.Tensor, seed: int,
                      steps: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (128,), generator=g)]
        # small noise: smoother features
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net.head(features_of(xb)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        def acc(s):
            return float((net.head(features_of(x[s])).argmax(1) == y[s]).float().mean())

        return {"train_acc": acc(train), "heldout_acc": acc(test), "train_samples": len(train),
                "heldout_samples": n_test, "steps": steps, "seed": seed, "optimizer":
                "AdamW lr 2e-3 wd 1e-4, batch 128, input noise 0.05"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_assets(modality: str, mod_cfg, source: str, real) -> dict:
    """Train (once) and export the FD extractor and the REPA encoder; reuse them afterwards."""
    from selfflow_repa import save_encoder

    folder = ASSETS / modality
    meta_path = folder / "assets.json"
    spec = {"version": ASSET_VERSION, "modality": modality, "source": source,
            "tokens": list(real.tokens.shape)}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        ok = meta.get("spec") == spec and all(
            (folder / f).is_file() and sha256(folder / f) == meta[k]["sha256"]
            for f, k in (("fd_extractor.pt", "fd_extractor"), ("repa_encoder.pt", "repa_encoder")))
        if ok:
            return meta
        raise SystemExit(f"{folder} holds assets that do not match this benchmark "
                         f"(spec or hash differ); delete the folder to rebuild them")
    folder.mkdir(parents=True, exist_ok=True)
    x, y = real.tokens.float(), real.labels.long()
    _, n, c = x.shape
    classes = int(y.max()) + 1
    torch.manual_seed(1234)
    fd = FDExtractor(n, c, classes)
    fd_info = _train_classifier(fd, fd, x, y, seed=1234, steps=600)
    torch.manual_seed(4321)
    enc = TokenEncoder(n, c, classes)
    enc_info = _train_classifier(enc, lambda t: enc(t).mean(1), x, y, seed=4321, steps=600)
    fd_info["sha256"] = save_encoder(fd, folder / "fd_extractor.pt")
    enc_info["sha256"] = save_encoder(enc, folder / "repa_encoder.pt")
    fd_info["features"], enc_info["features"] = 64, REPA_FEATURES
    meta = {"spec": spec, "fd_extractor": fd_info, "repa_encoder": enc_info,
            "note": "trained once by benchmarks/convergence.py; fixed across runs"}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ---- one run -----------------------------------------------------------------------------------

class Evaluator:
    """Plugin object: at each step in ``at``, FD and probes of ``trainer.backbone``."""

    def __init__(self, at, real, real_stats, extractor_path, args, null_label) -> None:
        from selfflow_repa.teacher import load_encoder

        self.at, self.real, self.args = set(at), real, args
        self.mu, self.cov = real_stats
        self.extractor = load_encoder(extractor_path)
        self.null_label = null_label
        self.rows: list[dict] = []

    def fd(self, backbone, adapter) -> float:
        from selfflow_core.metrics import frechet_distance_from_stats, gaussian_stats
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
            feats = self.extractor(tokens.clamp(-1, 1)).double().numpy()
        return frechet_distance_from_stats(*gaussian_stats(feats), self.mu, self.cov)

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        now = time.perf_counter()
        if step == 1:
            self.t_first, self.eval_total = now, 0.0
        self.t_last = now
        if step not in self.at:
            return
        from selfflow_core.diagnostics import loss_by_timestep, probe_layers

        backbone = trainer.backbone
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

    from selfflow_core.backbone import DiT
    from selfflow_core.objective import ObjectiveConfig
    from selfflow_core.sampling import SamplingConfig
    from selfflow_core.teachers import EMATeacher, NoTeacher
    from selfflow_core.timesteps import DualTimestep, SingleTimestep
    from selfflow_core.trackers import NullTracker
    from selfflow_core.trainer_config import (
        CheckpointConfig,
        ModalitySpec,
        OptimConfig,
        TrainerConfig,
    )

    method, mod_cfg, dist = job["method"], job["mod_cfg"], job["distribution"]
    mask = job.get("mask_ratio", job["default_mask"])
    scheduler = (DualTimestep.Config(distribution=dist, mask_ratio=mask)
                 if method in ("dts", "selfflow") else SingleTimestep.Config(distribution=dist))
    gamma = 0.8
    if method == "selfflow":
        teacher = EMATeacher.Config(decay=job.get("ema_decay", 0.99),
                                    warmup=job.get("ema_warmup", True))
    elif method == "repa":
        teacher = REPATeacher.Config(encoder=job["encoder"], feature_dim=REPA_FEATURES,
                                     sha256=job["encoder_sha256"])
        gamma = 0.5  # REPA's lambda (the core's default 0.8 is Self-Flow's gamma)
    else:
        teacher = NoTeacher.Config()
    depth, width = job["size"]
    layers = {} if depth >= 3 else {"student_layer": 1, "teacher_layer": 2}  # 0.3/0.7 collide
    return TrainerConfig(
        modalities={"data": ModalitySpec(modality=mod_cfg, store=job["store"], source="",
                                         scheduler=scheduler, batch_size=job["batch"])},
        backbone=DiT.Config(depth=depth, width=width, heads=4),
        teacher=teacher, objective=ObjectiveConfig(gamma=gamma, **layers),
        optim=OptimConfig(lr=job["lr"], warmup_steps=20, schedule="constant"),
        checkpoint=CheckpointConfig(every=10 ** 9, keep=1),
        sampling=SamplingConfig(count=10, steps=2), tracker=NullTracker.Config(),
        steps=job["steps"], seed=job["seed"], run_dir=job["run_dir"], log_every=10 ** 9)


def run_one(job: dict) -> dict:
    try:
        return _run_one(job)
    except Exception:  # noqa: BLE001 - a plain message crosses the process boundary intact
        import traceback
        raise RuntimeError(f"run {job['key']} failed:\n{traceback.format_exc()}") from None


def _run_one(job: dict) -> dict:
    torch.set_num_threads(1)
    from selfflow_core.plugins import Components, make_plugin_manager
    from selfflow_core.trainer import Trainer

    args = argparse.Namespace(**job["args"])
    real = job["real"]
    evals = job["evals"]
    at = sorted({max(1, round(job["steps"] * (i + 1) / evals)) for i in range(evals)})
    ev = Evaluator(at, real, job["real_stats"], job["extractor"], args,
                   null_label=job["mod_cfg"].classes)
    config = make_config(job)
    t0 = time.perf_counter()
    trainer = Trainer(config, components=Components(make_plugin_manager([ev])), progress=False)
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    shutil.rmtree(job["run_dir"], ignore_errors=True)
    return {"key": job["key"], "method": job["method"], "seed": job["seed"],
            "groups": job["groups"], "steps": job["steps"],
            "size": list(job["size"]), "curve": ev.rows, "seconds": seconds,
            "train_s_per_step": ev.train_s_per_step(job["steps"]),
            "params": sum(p.numel() for p in trainer.backbone.parameters()),
            "final_loss": summary["final_loss"]}


# ---- aggregation -------------------------------------------------------------------------------

def mean_spread(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def curve_mean(runs: list[dict], key: str) -> list[tuple[int, float, float]]:
    steps = sorted({r["step"] for run in runs for r in run["curve"]})
    out = []
    for s in steps:
        m, sd = mean_spread([r[key] for run in runs for r in run["curve"]
                             if r["step"] == s and key in r])
        out.append((s, m, sd))
    return out


def steps_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """First step where the (linearly interpolated) mean FD curve reaches ``target``."""
    prev = None
    for s, m, _ in curve:
        if m <= target:
            if prev is None or prev[1] == m:
                return float(s)
            s0, m0 = prev
            return s0 + (s - s0) * (m0 - target) / (m0 - m)
        prev = (s, m)
    return None


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
    sweeps: dict = {}
    for r in results:
        for g, variant in r["groups"].items():
            if g != "main":
                sweeps.setdefault(g, []).append((variant, r))
    out["sweeps"] = {g: [{"variant": variant, "method": r["method"], "size": r["size"],
                          "steps": r["steps"], "params": r["params"],
                          "final_fd": r["curve"][-1]["fd"],
                          "best_probe": max(v for k, v in r["curve"][-1].items()
                                            if k.startswith("probe_acc/")),
                          "fd_curve": [(c["step"], c["fd"]) for c in r["curve"]]}
                         for variant, r in rs] for g, rs in sweeps.items()}
    return out


# ---- plots (optional) --------------------------------------------------------------------------

def plot(summary: dict, name: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (the JSON has every number)")
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, s in summary["methods"].items():
        st = [c[0] for c in s["fd_curve"]]
        mu = np.array([c[1] for c in s["fd_curve"]])
        sd = np.array([c[2] for c in s["fd_curve"]])
        axes[0].plot(st, mu, label=m)
        axes[0].fill_between(st, mu - sd, mu + sd, alpha=0.2)
        final = {k: v[-1][1] for k, v in s["probe_curves"].items()}
        axes[1].plot([int(k[5:]) for k in final], list(final.values()), marker="o", label=m)
    axes[0].set(xlabel="step", ylabel="FD (lower is better)", title="FD vs steps")
    axes[1].set(xlabel="block", ylabel="linear-probe accuracy", title="probe at the last step")
    for ax in axes:
        ax.legend()
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [str(path)]


# ---- main --------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    d, w = text.lower().split("x")
    return int(d), int(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="image", choices=["image", "video"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--evals", type=int, default=4, help="evaluation points per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", default="3x48", help="depth x width of the main runs (4 heads)")
    ap.add_argument("--samples", type=int, default=300, help="generated samples per FD")
    ap.add_argument("--sample-steps", type=int, default=16)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--probe-t", type=float, default=0.25)
    ap.add_argument("--sweeps", default="size,ema,mask",
                    help="comma list of size, length, ema, mask; or none")
    ap.add_argument("--sweep-evals", type=int, default=1,
                    help="evaluation points of sweep-only runs (1: the final step)")
    ap.add_argument("--sizes", default="2x32,3x48,4x64")
    ap.add_argument("--long-steps", type=int, default=0, help="length sweep (default 2 x steps)")
    ap.add_argument("--ema-decays", default="0.9,0.99,0.999")
    ap.add_argument("--mask-ratios", default="0.1,0.25,0.5")
    ap.add_argument("--video-count", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "selfflow-convergence"))
    ap.add_argument("--name", default="", help="result name (default convergence[_video])")
    ap.add_argument("--resume", action="store_true",
                    help="skip runs an interrupted invocation with the same settings finished")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    sweeps = set() if args.sweeps == "none" else set(args.sweeps.split(","))
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    from selfflow_repa.teacher import load_encoder

    from selfflow_core.config import make_converter, to_data
    from selfflow_core.metrics import frechet_distance, gaussian_stats
    from selfflow_core.plugins import Components
    from selfflow_core.store import encode_store

    mod_cfg, source, default_mask, dist = modality_setup(args.modality, args.video_count)
    real = real_batch(mod_cfg, source)
    meta = build_assets(args.modality, mod_cfg, source, real)
    folder = ASSETS / args.modality
    extractor = load_encoder(folder / "fd_extractor.pt")
    with torch.no_grad():
        real_feats = extractor(real.tokens.float()).double().numpy()
    real_stats = gaussian_stats(real_feats)
    rng = np.random.default_rng(0)
    floor = [frechet_distance(real_feats[rng.choice(len(real_feats), args.samples, replace=False)],
                              real_feats) for _ in range(3)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"{args.modality}.zarr"
    components = Components()
    encode_store(mod_cfg.build(), source, store, adapter_config=to_data(make_converter(components),
                                                                          mod_cfg), progress=False)

    base = {"mod_cfg": mod_cfg, "distribution": dist, "default_mask": default_mask,
            "store": str(store), "batch": args.batch, "lr": args.lr, "steps": args.steps,
            "size": parse_size(args.size), "encoder": str(folder / "repa_encoder.pt"),
            "encoder_sha256": meta["repa_encoder"]["sha256"],
            "extractor": str(folder / "fd_extractor.pt"), "real": real,
            "real_stats": real_stats, "args": vars(args)}
    jobs: dict[str, dict] = {}

    def add(method, seed, group, variant="", **changes):
        """One run per distinct setting; a sweep point equal to a main run reuses it."""
        job = {**base, "method": method, "seed": seed, **changes}
        sf, dual = method == "selfflow", method in ("dts", "selfflow")
        key = json.dumps([method, seed, job["steps"], list(job["size"]),
                          job.get("ema_decay", 0.99) if sf else None,
                          job.get("ema_warmup", True) if sf else None,
                          job.get("mask_ratio", default_mask) if dual else None])
        if key not in jobs:
            evals = args.evals if group in ("main", "length") else args.sweep_evals
            jobs[key] = {**job, "key": key, "run_dir": str(work / f"run-{len(jobs)}"),
                         "group": group, "groups": {}, "evals": evals}
        jobs[key]["groups"][group] = variant

    for seed in range(args.seeds):
        for m in args.methods:
            add(m, seed, "main")
    if "size" in sweeps:
        for s in args.sizes.split(","):
            for m in ("vanilla", "selfflow"):
                add(m, 0, "size", variant=s, size=parse_size(s))
    if "length" in sweeps:
        long_steps = args.long_steps or 2 * args.steps
        for m in ("vanilla", "selfflow"):
            add(m, 0, "length", variant=f"{long_steps} steps", steps=long_steps)
    if "ema" in sweeps:
        decays = [float(d) for d in args.ema_decays.split(",")]
        for d in decays:
            add("selfflow", 0, "ema", variant=f"decay {d}, warm-up", ema_decay=d)
        mid = decays[len(decays) // 2]
        add("selfflow", 0, "ema", variant=f"decay {mid}, no warm-up", ema_decay=mid,
            ema_warmup=False)
    if "mask" in sweeps:
        for r in (float(x) for x in args.mask_ratios.split(",")):
            add("selfflow", 0, "mask", variant=f"mask {r}", mask_ratio=r)
    todo = sorted(jobs.values(), key=lambda j: -j["steps"] * j["size"][0] * j["size"][1] ** 2)
    print(f"{len(todo)} runs ({args.modality}, {args.jobs} parallel, 1 thread each); assets in "
          f"{folder}; FD extractor held-out acc {meta['fd_extractor']['heldout_acc']:.3f}, "
          f"REPA encoder held-out acc {meta['repa_encoder']['heldout_acc']:.3f}", flush=True)
    weak = [k for k in ("fd_extractor", "repa_encoder") if meta[k]["heldout_acc"] < 0.5]
    if weak:
        print(f"WARNING: {', '.join(weak)} classify held-out data poorly (< 50 %): FD and REPA "
              f"results of this modality say little", flush=True)
    # finished runs are appended to a partial file; --resume skips them (same evaluation settings)
    fixed = {k: getattr(args, k) for k in ("modality", "batch", "lr", "evals", "samples",
                                           "sample_steps", "sample_seed", "probe_t", "video_count")}
    tag = hashlib.sha256(json.dumps([fixed, meta["fd_extractor"]["sha256"]], sort_keys=True)
                         .encode()).hexdigest()[:12]
    partial = work / f"partial-{tag}.jsonl"
    results = []
    if args.resume and partial.is_file():
        done = {json.loads(line)["key"]: json.loads(line)
                for line in partial.read_text().splitlines()}
        results = [done[j["key"]] for j in todo if j["key"] in done]
        for r in results:
            r["groups"] = jobs[r["key"]]["groups"]
        todo = [j for j in todo if j["key"] not in done]
        print(f"resuming: {len(results)} runs already done ({partial})")
    elif partial.exists():
        partial.unlink()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool, partial.open("a") as log:
        for res in pool.imap_unordered(run_one, todo):
            log.write(json.dumps(res) + "\n")
            log.flush()
            results.append(res)
            print(f"  [{len(results)}/{len(jobs)}] {res['method']:8s} seed {res['seed']} "
                  f"{res['groups']}: FD {res['curve'][-1]['fd']:.2f} "
                  f"in {res['seconds']:.0f}s ({res['train_s_per_step'] * 1e3:.0f} ms/step, "
                  f"{sum(c['eval_s'] for c in res['curve']):.0f}s evaluating)", flush=True)
    summary = summarize(results, args)
    wall = time.perf_counter() - t_start

    # ---- tables ----
    print(f"\nFD vs steps (mean ± std over {args.seeds} seeds; vanilla's final FD "
          f"{summary['vanilla_final_fd']:.2f}; real-vs-real FD at n={args.samples}: "
          f"{statistics.fmean(floor):.2f})")
    steps = [c[0] for c in next(iter(summary["methods"].values()))["fd_curve"]]
    rows = []
    for m, s in summary["methods"].items():
        rows.append([m] + [f"{mu:.2f}±{sd:.2f}" for _, mu, sd in s["fd_curve"]] + [
            "—" if s["speedup_vs_vanilla"] is None else f"{s['speedup_vs_vanilla']:.2f}x",
            f"{s['train_s_per_step'][0] * 1e3:.0f}"])
    print_table(["method"] + [f"step {x}" for x in steps] + ["vs vanilla", "ms/step"], rows)
    print("\nlinear probe accuracy at the last step, per block (mean ± std)")
    layer_names = list(next(iter(summary["methods"].values()))["probe_curves"])
    print_table(["method"] + layer_names, [
        [m] + [f"{s['probe_curves'][k][-1][1]:.3f}±{s['probe_curves'][k][-1][2]:.3f}"
               for k in layer_names] for m, s in summary["methods"].items()])
    print("\nflow loss by t bucket at the last step (mean over seeds)")
    buckets = list(next(iter(summary["methods"].values()))["flow_t_final"])
    print_table(["method"] + [b.split("/")[1] for b in buckets], [
        [m] + [s["flow_t_final"][b][0] for b in buckets] for m, s in summary["methods"].items()])
    for g, rows_ in summary["sweeps"].items():
        print(f"\nsweep: {g} (seed 0)")
        print_table(["variant", "method", "params", "steps", "final FD", "best probe"], [
            [r["variant"], r["method"], r["params"], r["steps"], r["final_fd"],
             r["best_probe"]] for r in sorted(rows_, key=lambda r: (r["variant"], r["method"]))])
    name = args.name or ("convergence" if args.modality == "image"
                         else f"convergence_{args.modality}")
    protocol = {
        "fd": {"sampler": "euler", "sample_steps": args.sample_steps, "samples": args.samples,
               "cfg_scale": 1.0, "labels": "cycled 0..classes-1", "sample_seed": args.sample_seed,
               "reference": f"all {len(real_feats)} real samples", "clamp": [-1, 1],
               "extractor": str(folder / "fd_extractor.pt"),
               "extractor_sha256": meta["fd_extractor"]["sha256"],
               "extractor_heldout_acc": meta["fd_extractor"]["heldout_acc"],
               "real_vs_real_fd_at_n": floor, "evaluated_weights": "raw student (no EMA)"},
        "probe": {"t": args.probe_t, "labels_to_model": "null class", "pooling": "mean",
                  "probe": "closed-form ridge 1e-2 on standardised features", "holdout": 0.3,
                  "samples": len(real_feats)},
        "repa": {"encoder": str(folder / "repa_encoder.pt"),
                 "encoder_sha256": meta["repa_encoder"]["sha256"], "gamma": 0.5,
                 "feature_dim": REPA_FEATURES,
                 "encoder_heldout_acc": meta["repa_encoder"]["heldout_acc"]},
        "training": {"batch": args.batch, "lr": args.lr, "warmup": 20, "schedule": "constant",
                     "selfflow_ema": "decay 0.99 with warm-up", "mask_ratio": default_mask,
                     "gamma_selfflow": 0.8, "layers": "0.3 / 0.7 of depth", "size": args.size,
                     "time_distribution": type(dist).__qualname__},
    }
    write_json(name, {"args": {k: v for k, v in vars(args).items()}, "protocol": protocol,
                      "assets": meta, "wall_s": wall, "summary": summary,
                      "runs": [{k: v for k, v in r.items()} for r in results]})
    plots = plot(summary, name)
    print(f"wall time {wall:.0f}s" + (f"; plots: {plots}" if plots else ""))


if __name__ == "__main__":
    main()
