"""What prompt conditioning costs per Self-Flow step, in one process, against the DiT.

Variants, each a full Self-Flow step (dual timesteps, truncated EMA teacher, flow + rep loss,
AdamW) on the same latent tokens:

- ``dit``: the class-conditional DiT (the baseline);
- ``mmdit_no_text``: the MMDiT at about the DiT's parameter count, without a text stream
  (what the architecture alone costs);
- ``mmdit_bytes_online``: with the byte-level encoder: each step encodes the captions to ids
  (on the host, as the loader does) and the model embeds them (trainable);
- ``mmdit_precomputed``: with a frozen encoder's embeddings read from the store (``[B, L, D]``
  given; the encoder ran once, at encode time).

    python benchmarks/prompt_cost.py [--width 128] [--tokens 64] [--batch 32] [--text-len 32]
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, selfflow_step, summary, time_interleaved, write_json

from selfflow_core import ByteTextEncoder, DiT, MMDiT, TextSpec
from selfflow_core.prompts import with_text
from selfflow_core.teachers import EMATeacher
from selfflow_core.timesteps import DualTimestep
from selfflow_core.types import TokenBatch


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_mmdit(width: int, heads: int, token_dim: int, target: int) -> MMDiT.Config:
    """The (double, single) split of MMDiT blocks whose parameter count is nearest ``target``."""
    head = width // heads
    axes = (head - 2 * (head // 3 // 2 * 2), head // 3 // 2 * 2, head // 3 // 2 * 2)
    best = None
    for double in range(0, 9):
        for single in range(1, 17):
            cfg = MMDiT.Config(double_blocks=double, single_blocks=single, width=width,
                               heads=heads, axes_dim=axes)
            with torch.device("meta"):
                n = params(cfg.build(token_dims=[token_dim], num_classes=10))
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, cfg)
    return best[1]


def make_step(net, batch_fn, device):
    return selfflow_step(net, EMATeacher.Config(truncate=True).build(),
                         DualTimestep.Config().build(), batch_fn, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=6, help="DiT blocks")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--token-dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--text-dim", type=int, default=256, help="frozen embeddings' width")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b, n = args.batch, args.tokens
    x = torch.randn(b, n, args.token_dim, device=device)
    pos = torch.arange(n, device=device, dtype=torch.float32)[None, :, None].expand(b, -1, 1)
    labelled = TokenBatch.single(x, pos, labels=torch.randint(0, 10, (b,), device=device))
    plain = TokenBatch.single(x, pos)
    captions = [f'a sign that says "word{i % 97}" in red letters' for i in range(b)]
    encoder = ByteTextEncoder.Config(max_length=args.text_len).build()
    frozen = with_text(plain, encoder.encode(captions))
    emb = torch.randn(b, args.text_len, args.text_dim, device=device)
    frozen = TokenBatch(tokens=x, positions=pos, modality_ids=plain.modality_ids,
                        valid=plain.valid, condition=plain.condition, text=emb,
                        text_mask=frozen.text_mask)

    dit = DiT.Config(depth=args.depth, width=args.width, heads=args.heads)
    dit_net = dit.build(token_dims=[args.token_dim], num_classes=10)
    mm = matched_mmdit(args.width, args.heads, args.token_dim, params(dit_net))
    nets = {
        "dit": (dit_net, lambda: labelled),
        "mmdit_no_text": (mm.build(token_dims=[args.token_dim], num_classes=10),
                          lambda: labelled),
        "mmdit_bytes_online": (
            mm.build(token_dims=[args.token_dim], num_classes=0, text=encoder.spec()),
            lambda: with_text(plain, encoder.encode(captions))),
        "mmdit_precomputed": (
            mm.build(token_dims=[args.token_dim], num_classes=0,
                     text=TextSpec(max_length=args.text_len, dim=args.text_dim)),
            lambda: frozen),
    }
    steps = {name: make_step(net, fn, device) for name, (net, fn) in nets.items()}
    times = time_interleaved(steps, warmup=2, repeats=args.repeats, inner=args.inner)
    base = summary(times["dit"])["median_s"]
    rows, record = [], {}
    for name, samples in times.items():
        s = summary(samples)
        count = params(nets[name][0])
        rows.append([name, count / 1e6, s["median_s"] * 1e3, s["median_s"] / base])
        record[name] = {**s, "params": count, "ratio_vs_dit": s["median_s"] / base}
    print(f"DiT {args.depth}x{args.width} vs MMDiT {mm.double_blocks} double + "
          f"{mm.single_blocks} single x {args.width}; {b} x {n} latent tokens, "
          f"{args.text_len} text tokens, {device}")
    print_table(["variant", "params (M)", "step ms", "ratio vs dit"], rows)
    write_json("prompt_cost", {"args": vars(args), "mmdit": {
        "double_blocks": mm.double_blocks, "single_blocks": mm.single_blocks},
        "variants": record})


if __name__ == "__main__":
    main()
