"""Training throughput (tokens/s) and MFU (bf16) of SiT-B/2- and SiT-XL/2-shaped models on one
GPU, Self-Flow against vanilla flow matching. Exits 0 with a message when CUDA is absent.

Shapes: ``DiT.Config.sized("B")`` (12 x 768, 12 heads) and ``sized("XL")`` (28 x 1152, 16 heads),
class-conditional (1000 classes), on 256 tokens of 16 channels per sample: a 32x32x4 SD-VAE latent
cut into 2x2 patches, as in SiT/REPA/Self-Flow on ImageNet 256. Data are random tensors already on
the GPU (no loader), bf16 autocast, fused AdamW, grad clipping, and for Self-Flow the EMA update;
what is timed is the whole optimizer step.

FLOPs are counted analytically, as matmul FLOPs (2 per multiply-add), for ``B`` samples of ``N``
tokens of ``C`` channels, width ``D``, MLP ratio ``r``, depth ``L``, and ``R`` conditioning rows
(distinct (sample, timestep) pairs: ``B`` for one timestep per sample, up to ``2B`` under DTS):

    block(N)   = B * [ (6 + 2 + 4r) N D^2  +  4 N^2 D ]  +  R * 12 D^2
                 (qkv 6ND^2, out-proj 2ND^2, MLP 4rND^2, scores QK^T and AV 2N^2D each; adaLN)
    forward(L) = B * 2NCD  +  L * block  +  R * (2*256*D + 2D^2)  +  [R * 4D^2 + B * 2NDC]
                 (input projection, blocks, timestep MLP, [final adaLN + output projection])
    vanilla step  = 3 * forward(L)                              (backward = 2 x forward)
    Self-Flow     = 3 * forward(L) + 3 * B * N * (4D^2 + 4 D D_t)   (projection head D->2D->D_t)
                    + forward(k) without the final layer         (EMA teacher, truncated at k)

MFU = step FLOPs / step time / peak dense bf16 FLOP/s of the device (H100 SXM and H200 989.4
TFLOP/s, H100 PCIe 756, A100 312; ``--peak-tflops`` for others). Self-Flow's MFU counts the
teacher's forward as work done; ``tokens/s`` counts the student's training tokens only, so the
teacher's cost shows there as lower throughput. ``tests/test_gpu_flops.py`` checks the formula
against ``torch.utils.flop_counter`` on a small model.

    python benchmarks/gpu.py [--sizes B,XL] [--batch-B 128] [--batch-XL 64] [--compile]
    python benchmarks/gpu.py --flops-only          # the analytic FLOPs table, no GPU needed
    python benchmarks/gpu.py --device cpu --sizes tiny --tokens 16 --batch 8   # checks the
        # measuring code on a CPU (tests/test_gpu_flops.py runs it; no MFU without a GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, summary, time_interleaved, write_json

from selfflow_core.builtin.dit import DiT
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective

TOKENS, CHANNELS, CLASSES = 256, 16, 1000
#: dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAKS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12,
         "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def forward_flops(depth: int, width: int, mlp_ratio: float, batch: int, tokens: int,
                  channels: int, rows: int, *, final: bool = True) -> float:
    d, n = width, tokens
    block = batch * ((8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d) + rows * 12 * d * d
    out = batch * 2 * n * channels * d + depth * block + rows * (2 * 256 * d + 2 * d * d)
    if final:
        out += rows * 4 * d * d + batch * 2 * n * d * channels
    return float(out)


def step_flops(cfg: DiT.Config, batch: int, tokens: int, channels: int, *, selfflow: bool,
               teacher_layer: int | None = None, target_width: int | None = None,
               rows: int | None = None) -> float:
    """Analytic FLOPs of one training step (see the module docstring)."""
    rows_student = rows if rows is not None else (2 * batch if selfflow else batch)
    f = 3 * forward_flops(cfg.depth, cfg.width, cfg.mlp_ratio, batch, tokens, channels,
                          rows_student)
    if selfflow:
        d, dt = cfg.width, target_width or cfg.width
        f += 3 * batch * tokens * (4 * d * d + 4 * d * dt)
        f += forward_flops(teacher_layer, cfg.width, cfg.mlp_ratio, batch, tokens, channels,
                           batch, final=False)
    return f


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, value in PEAKS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def make_step(cfg: DiT.Config, batch: int, *, selfflow: bool, compile_blocks: bool,
              device: str = "cuda", tokens: int = TOKENS):
    from selfflow_core.teachers import EMATeacher, NoTeacher
    from selfflow_core.timesteps import DualTimestep, SingleTimestep
    from selfflow_core.types import TokenBatch

    device = torch.device(device)
    torch.manual_seed(0)
    net = cfg.build(token_dims=[CHANNELS], num_classes=CLASSES).to(device)
    obj = SelfFlowObjective(ObjectiveConfig(), depth=net.depth, width=net.width).to(device)
    teacher = (EMATeacher.Config(decay=0.9999).build() if selfflow else NoTeacher.Config().build())
    teacher.attach(net)
    scheduler = (DualTimestep.Config() if selfflow else SingleTimestep.Config()).build()
    if compile_blocks:
        for block in net.blocks:
            block.compile()
        if selfflow:
            for block in teacher.model.blocks:
                block.compile()
    params = list(net.parameters()) + list(obj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(0)
    side = int(tokens ** 0.5)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens}: must be a square (a side x side latent grid)")
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"),
                      -1).reshape(1, tokens, 2).float().expand(batch, -1, -1).to(device)
    data = TokenBatch.single(torch.randn(batch, tokens, CHANNELS, device=device), pos,
                             labels=torch.randint(0, CLASSES, (batch,), device=device))

    def step():
        plan = scheduler.plan(data, generator=gen)
        noise = torch.randn(data.tokens.shape, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            terms = obj(net, teacher, data, plan, noise)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        teacher.update(net, step=0)

    return step, obj.teacher_layer


def flops_table(sizes, batches, tokens: int = TOKENS) -> list[list]:
    rows = []
    for size in sizes:
        cfg, b = DiT.Config.sized(size), batches[size]
        k = ObjectiveConfig().layers(cfg.depth)[1]
        van = step_flops(cfg, b, tokens, CHANNELS, selfflow=False)
        sf = step_flops(cfg, b, tokens, CHANNELS, selfflow=True, teacher_layer=k)
        rows.append([size, b, k, van / 1e12, sf / 1e12, sf / van])
    return rows


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="B,XL")
    ap.add_argument("--batch-B", type=int, default=128)
    ap.add_argument("--batch-XL", type=int, default=64)
    ap.add_argument("--batch", type=int, default=0, help="one batch for every size (0: per size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (slow start)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--flops-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per sample (a square)")
    ap.add_argument("--device", default="cuda",
                    help="cuda; or cpu to check the measuring code itself (no MFU)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of gpu.json")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    batches = {s: args.batch or getattr(args, f"batch_{s}", 64) for s in sizes}
    n = args.tokens
    print(f"{n} tokens x {CHANNELS} channels per sample" +
          (" (32x32x4 latents, patch 2)" if n == TOKENS else ""))
    print_table(["size", "batch", "teacher k", "vanilla TFLOP/step", "Self-Flow TFLOP/step",
                 "ratio"], flops_table(sizes, batches, n))
    if args.flops_only:
        return None
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("CUDA is not available: skipping the GPU benchmark (nothing measured).")
        return None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
        peak = peak_flops(name, args.peak_tflops)
    else:
        name, peak = f"{args.device} (a check of the measuring code, not a GPU figure)", None
    rows, record = [], {}
    for size in sizes:
        cfg = DiT.Config.sized(size)
        b = batches[size]
        while True:
            try:
                steps, ks = {}, {}
                for variant, sf in (("vanilla", False), ("selfflow", True)):
                    steps[variant], ks[variant] = make_step(
                        cfg, b, selfflow=sf, compile_blocks=args.compile, device=args.device,
                        tokens=n)
                times = time_interleaved(steps, warmup=3, repeats=args.repeats, inner=args.inner)
                break
            except torch.cuda.OutOfMemoryError:
                steps = None
                torch.cuda.empty_cache()
                if b == 1:
                    raise
                b //= 2
                print(f"{size}: out of memory, batch -> {b}")
        for variant, samples in times.items():
            s = summary(samples)
            sf = variant == "selfflow"
            flops = step_flops(cfg, b, n, CHANNELS, selfflow=sf, teacher_layer=ks[variant])
            tps = b * n / s["median_s"]
            mfu = flops / s["median_s"] / peak if peak else None
            rows.append([size, variant, b, s["median_s"] * 1e3, tps, flops / 1e12,
                         "n/a" if mfu is None else f"{100 * mfu:.1f}%"])
            record[f"{size}/{variant}"] = {**s, "batch": b, "tokens_per_s": tps,
                                          "step_flops": flops, "mfu": mfu}
        base = record[f"{size}/vanilla"]["median_s"]
        sf_record = record[f"{size}/selfflow"]
        sf_record["step_time_ratio"] = sf_record["median_s"] / base
        sf_record["flop_ratio"] = sf_record["step_flops"] / record[f"{size}/vanilla"][
            "step_flops"]
        del steps
        if cuda:
            torch.cuda.empty_cache()
    print(f"\n{name}, bf16 autocast, compile={args.compile}, peak "
          f"{'unknown (pass --peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    print_table(["size", "variant", "batch", "step ms", "tokens/s", "TFLOP/step", "MFU"], rows)
    payload = {"args": vars(args), "device": name, "peak_flops": peak, "tokens": n,
               "channels": CHANNELS, "results": record}
    write_json("gpu" if cuda else f"gpu_{args.device}_check", payload, folder=Path(args.out))
    return payload


if __name__ == "__main__":
    main()
