"""Self-Flow step time / vanilla flow-matching step time, in one process.

Variants on the same model and data: vanilla (one timestep, no teacher), Self-Flow with the
teacher stopped after block k (the default), and Self-Flow with a full teacher forward. The
reference limit is 1 + k/(3L): a forward is ~1/3 of forward+backward, and the truncated teacher
runs k of L blocks. Goal: the truncated ratio within 5 % of that limit.

    python benchmarks/step_overhead.py [--size small] [--tokens 64] [--batch 32]
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, selfflow_step, summary, time_interleaved, write_json

from selfflow_core.builtin.dit import SIZES, DiT
from selfflow_core.teachers import EMATeacher, NoTeacher
from selfflow_core.timesteps import DualTimestep, SingleTimestep
from selfflow_core.types import TokenBatch


def make_step(cfg, token_dim, batch, scheduler, teacher, device):
    net = cfg.build(token_dims=[token_dim], num_classes=10)
    step = selfflow_step(net, teacher, scheduler, lambda: batch, device,
                         autocast=device.type == "cuda")
    return step, step.objective.teacher_layer, net.depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--token-dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DiT.Config.sized(args.size)
    x = torch.randn(args.batch, args.tokens, args.token_dim, device=device)
    pos = torch.arange(args.tokens, device=device, dtype=torch.float32)[None, :, None].expand(
        args.batch, -1, 1)
    batch = TokenBatch.single(x, pos, labels=torch.randint(0, 10, (args.batch,), device=device))
    steps = {}
    steps["vanilla"], _, _ = make_step(cfg, args.token_dim, batch, SingleTimestep.Config().build(),
                                       NoTeacher(), device)
    steps["selfflow_truncated"], k, depth = make_step(
        cfg, args.token_dim, batch, DualTimestep.Config().build(),
        EMATeacher.Config(truncate=True).build(), device)
    steps["selfflow_full_teacher"], _, _ = make_step(
        cfg, args.token_dim, batch, DualTimestep.Config().build(),
        EMATeacher.Config(truncate=False).build(), device)
    times = time_interleaved(steps, warmup=2, repeats=args.repeats, inner=args.inner)
    base = summary(times["vanilla"])["median_s"]
    limit = {"vanilla": 1.0, "selfflow_truncated": 1 + k / (3 * depth),
             "selfflow_full_teacher": 1 + 1 / 3}
    rows, record = [], {}
    for name, samples in times.items():
        s = summary(samples)
        ratio = s["median_s"] / base
        rows.append([name, s["median_s"] * 1e3, ratio, limit[name], ratio / limit[name] - 1])
        record[name] = {**s, "ratio": ratio, "limit": limit[name]}
    print(f"DiT {args.size} (depth {depth}, teacher layer k={k}), {args.batch} x {args.tokens} "
          f"tokens, {device}")
    print_table(["variant", "step ms", "ratio vs vanilla", "limit 1+k/(3L)", "over limit"], rows)
    write_json("step_overhead", {"args": vars(args), "depth": depth, "teacher_layer": k,
                                 "variants": record})


if __name__ == "__main__":
    main()
