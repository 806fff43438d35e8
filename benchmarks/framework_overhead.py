"""The trainer's step against a minimal hand-written PyTorch loop computing the same loss on the
same model, in one process. Goal: the trainer at most 5 % slower.

The hand-written loop holds one batch in memory and inlines plan, noise, student and truncated
teacher forwards, cosine loss, backward, clipping, AdamW and the EMA update; the trainer's step
adds what a framework does around it (loader, per-step generator, label dropout, metrics).

    python benchmarks/framework_overhead.py [--width 128 --depth 6 --tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile

import attrs
import torch
import torch.nn.functional as F
from common import print_table, summary, time_interleaved, write_json

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.flow import interpolate
from selfflow_core.trainer import Trainer


def hand_written(trainer: Trainer, batch):
    """The same computation as ``Trainer.train_step``, written out by hand on copies."""
    import copy

    net = copy.deepcopy(trainer.backbone)
    head = copy.deepcopy(trainer.model.objective.head)
    ema = copy.deepcopy(net).requires_grad_(False)
    l, k = trainer.model.objective.student_layer, trainer.model.objective.teacher_layer
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    scheduler = trainer.modalities[0].scheduler
    gen = torch.Generator().manual_seed(0)
    x0 = batch.tokens

    def step():
        plan = scheduler.plan(batch, generator=gen)
        x1 = torch.randn(x0.shape, generator=gen)
        out = net(interpolate(x0, x1, plan.student_t), plan.student_t, batch, feature_layers=(l,))
        flow = (out.velocity - (x1 - x0)).square().mean()
        with torch.no_grad():
            target = ema(interpolate(x0, x1, plan.teacher_t), plan.teacher_t, batch,
                         feature_layers=(k,), stop_after=k).features[k]
        rep = (1 - F.cosine_similarity(head(out.features[l]), target, dim=-1)).mean()
        loss = flow + 0.8 * rep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1e-3)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = toy()
        spec = attrs.evolve(base.modalities["toy"], store=f"{tmp}/toy.zarr", batch_size=args.batch,
                            modality=ToyModality.Config(tokens=args.tokens, channels=16,
                                                        count=2048))
        config = attrs.evolve(base, modalities={"toy": spec}, steps=10**6, run_dir=f"{tmp}/run",
                              backbone=DiT.Config(depth=args.depth, width=args.width, heads=4),
                              tracker=NullTracker.Config(), label_dropout=0.0)
        trainer = Trainer(config, progress=False)
        _, batch = next(iter(trainer.loader))
        fns = {"hand_written": hand_written(trainer, batch), "trainer": trainer.train_step}
        times = time_interleaved(fns, warmup=2, repeats=args.repeats, inner=args.inner)
    hand = summary(times["hand_written"])["median_s"]
    rows, record = [], {}
    for name, samples in times.items():
        s = summary(samples)
        rows.append([name, s["median_s"] * 1e3, s["median_s"] / hand - 1])
        record[name] = {**s, "overhead": s["median_s"] / hand - 1}
    print(f"DiT depth {args.depth} width {args.width}, {args.batch} x {args.tokens} tokens")
    print_table(["loop", "step ms", "overhead vs hand-written"], rows)
    write_json("framework_overhead", {"args": vars(args), "loops": record})


if __name__ == "__main__":
    main()
