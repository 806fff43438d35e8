"""The fixed evaluators of ``convergence.py``: trained once per modality on the real data, saved
as TorchScript with their SHA-256 and reused by every later run.

- FD feature extractors (64-d features; a linear head classifies them while training):
  ``mlp`` (flattened tokens; the image digits, where every sample sits at the same place) and
  ``conv`` (a 1-D convolution along the token sequence, then a mean over tokens: the same
  features wherever in the sequence a word or a moving digit occurs).
- REPA's frozen external encoder: a one-block token transformer giving per-token features.
  Another architecture and seed than the FD extractor, so REPA is not aligned to the very
  features it is scored with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSET_VERSION = 1
REPA_FEATURES = 32
FD_FEATURES = 64


class FDExtractor(nn.Module):
    """Flattened tokens -> 128 -> 64."""

    def __init__(self, n: int, c: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(n * c, 128), nn.GELU(),
                                  nn.Linear(128, FD_FEATURES), nn.GELU())
        self.head = nn.Linear(FD_FEATURES, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(tokens)


class ConvExtractor(nn.Module):
    """Tokens ``[B, N, C]`` -> two width-64 convolutions (kernel 3) along N -> mean over N ->
    64 -> 64: translation-robust along the token sequence."""

    def __init__(self, n: int, c: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(c, 64, 3, padding=1), nn.GELU(),
                                  nn.Conv1d(64, 64, 3, padding=1), nn.GELU())
        self.out = nn.Sequential(nn.Linear(64, FD_FEATURES), nn.GELU())
        self.head = nn.Linear(FD_FEATURES, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(tokens.transpose(1, 2)).mean(2))


EXTRACTORS = {"mlp": FDExtractor, "conv": ConvExtractor}


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


def train_classifier(net: nn.Module, features_of, x: torch.Tensor, y: torch.Tensor, seed: int,
                     steps: int, noise: float) -> dict:
    """AdamW on 80 % of ``x`` (with Gaussian input noise of std ``noise`` for smoother
    features); accuracies on the training split and the held-out 20 %."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (128,), generator=g)]
        xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
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
                f"AdamW lr 2e-3 wd 1e-4, batch 128, input noise {noise}"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_assets(folder: Path, spec: dict, tokens: torch.Tensor, labels: torch.Tensor, *,
                 extractor: str = "mlp", steps: int = 600, noise: float = 0.05) -> dict:
    """Train (once) and export the FD extractor and the REPA encoder into ``folder``; later
    calls with the same ``spec`` reuse them. A folder whose spec or hashes differ is an error,
    never silently rebuilt: results computed with other evaluators are not comparable."""
    from selfflow_repa import save_encoder

    meta_path = folder / "assets.json"
    spec = {"version": ASSET_VERSION, **spec, "tokens": list(tokens.shape)}
    if extractor != "mlp":
        spec["extractor"] = extractor
    if steps != 600:
        spec["steps"] = steps
    if noise != 0.05:
        spec["noise"] = noise
    files = (("fd_extractor.pt", "fd_extractor"), ("repa_encoder.pt", "repa_encoder"))
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == spec and all(
                (folder / f).is_file() and sha256(folder / f) == meta[k]["sha256"]
                for f, k in files):
            return meta
        raise SystemExit(f"{folder} holds assets that do not match this benchmark "
                         f"(spec or hash differ); delete the folder to rebuild them")
    folder.mkdir(parents=True, exist_ok=True)
    x, y = tokens.float(), labels.long()
    _, n, c = x.shape
    classes = int(y.max()) + 1
    torch.manual_seed(1234)
    fd = EXTRACTORS[extractor](n, c, classes)
    fd_info = train_classifier(fd, fd, x, y, seed=1234, steps=steps, noise=noise)
    torch.manual_seed(4321)
    enc = TokenEncoder(n, c, classes)
    enc_info = train_classifier(enc, lambda t: enc(t).mean(1), x, y, seed=4321, steps=steps,
                                noise=noise)
    fd_info["sha256"] = save_encoder(fd, folder / "fd_extractor.pt")
    enc_info["sha256"] = save_encoder(enc, folder / "repa_encoder.pt")
    fd_info["features"], enc_info["features"] = FD_FEATURES, REPA_FEATURES
    fd_info["architecture"] = extractor
    meta = {"spec": spec, "fd_extractor": fd_info, "repa_encoder": enc_info,
            "note": "trained once by benchmarks/convergence.py; fixed across runs"}
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    return meta
