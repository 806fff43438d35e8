"""The fixed evaluators of ``convergence.py``: trained once per modality on the real data, saved
as TorchScript with their SHA-256 and reused by every later run.

- FD feature extractors (64-d features; a linear head classifies them while training):
  ``mlp`` (flattened tokens; the image digits, where every sample sits at the same place) and
  ``conv`` (a 1-D convolution along the token sequence, then a mean over tokens: the same
  features wherever in the sequence a word or a moving digit occurs) and ``image_conv`` (a 2-D
  convolutional network over the image the tokens were cut from, max-pooled over the image:
  :class:`ImageConvExtractor`, for text rendering).
- REPA's frozen external encoder, giving per-token features: ``token``, a one-block token
  transformer, or ``image_conv``, a 2-D convolutional network over the image read out at each
  token's patch (:class:`ImageConvEncoder`). Another architecture and seed than the FD
  extractor, so REPA is not aligned to the very features it is scored with. Two of them:

  - ``repa_encoder.pt`` (the default, method ``repa``): trained with the labels, as a classifier
    of the very data the flow model learns (the strongest teacher one can get here, and the one
    every recorded REPA result used).
  - ``repa_encoder_label_free.pt`` (method ``repa_label_free``, built on first use): the same
    architecture, initialisation, seed, steps and input noise, trained without labels as a
    masked autoencoder (:func:`selfflow_repa.train_masked_autoencoder`), like REPA's DINOv2,
    which is self-supervised. The gap between the two methods is what the labels add.
    Its entry records a ridge probe's held-out accuracy of both encoders' mean-pooled
    features (the labels are read only for that, after training).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
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


def image_layout(unpatchify: Callable, n: int, c: int) -> torch.Tensor:
    """Where each pixel of the image comes from in the flattened tokens ``[N * C]``: the
    modality's own ``unpatchify`` (tokens ``[B, N, C]`` -> images ``[B, C', H, W]``) of the
    indices ``0 .. N * C - 1``, long ``[C', H, W]``."""
    return unpatchify(torch.arange(n * c).view(1, n, c))[0].long()


class ImageConv(nn.Module):
    """Tokens ``[B, N, C]`` -> the image they were cut from (a fixed gather by
    :func:`image_layout`) -> one 3x3 convolution + batch norm + GELU per ``widths``, a 2x2
    max-pool before the second, third, ... until the map is the token grid (patches of side 4:
    two) -> ``[B, widths[-1], N]``, column ``i`` the feature of token ``i``'s patch and, through
    the receptive field, its neighbours. Needs square patches of a power-of-two side (patches
    larger than ``widths`` allows repeat its last width)."""

    def __init__(self, n: int, c: int, unpatchify: Callable, widths: tuple[int, ...]) -> None:
        super().__init__()
        layout = image_layout(unpatchify, n, c)
        channels, h, w = layout.shape
        token = layout // c  # the token each pixel value sits in
        side = math.isqrt(h * w // n)
        pools = side.bit_length() - 1
        # larger patches need more pools: the last width repeats until the map is the grid
        widths = tuple(widths) + (widths[-1],) * max(0, pools + 1 - len(widths))
        cells = token[0, ::side, ::side]  # the token of each grid cell
        patches = cells.repeat_interleave(side, 0).repeat_interleave(side, 1)
        if 2 ** pools != side or len(widths) <= pools or not torch.equal(
                token, patches.expand(channels, -1, -1)):
            raise ValueError(f"ImageConv needs square patches of a power-of-two side (at most "
                             f"2^{len(widths) - 1}) on a grid; the layout of {n} tokens of {c} "
                             f"into {tuple(layout.shape)} is not")
        self.register_buffer("pixels", layout.flatten())
        self.register_buffer("cells", cells.flatten().argsort())  # the grid cell of each token
        self.shape = (channels, h, w)
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers += [nn.MaxPool2d(2)] if 1 <= i <= pools else []
            layers += [nn.Conv2d(widths[i - 1] if i else channels, width, 3, padding=1),
                       nn.BatchNorm2d(width), nn.GELU()]
        self.body = nn.Sequential(*layers)

    def image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> the image ``[B, C', H, W]`` (the modality's un-patchify)."""
        b = tokens.shape[0]
        return tokens.reshape(b, -1)[:, self.pixels].view(b, self.shape[0], self.shape[1],
                                                          self.shape[2])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.image(tokens)).flatten(2)[:, :, self.cells]


class ImageConvExtractor(nn.Module):
    """The image FD extractor: :class:`ImageConv` (widths 16, 32, 64, 64) -> max over the
    tokens -> 64 -> 64: whether and how strongly each feature occurs anywhere in the image."""

    def __init__(self, n: int, c: int, classes: int, unpatchify: Callable) -> None:
        super().__init__()
        self.conv = ImageConv(n, c, unpatchify, (16, 32, 64, 64))
        self.out = nn.Sequential(nn.Linear(64, FD_FEATURES), nn.GELU())
        self.head = nn.Linear(FD_FEATURES, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(tokens).amax(2))


EXTRACTORS = {"mlp": FDExtractor, "conv": ConvExtractor, "image_conv": ImageConvExtractor}


class TokenEncoder(nn.Module):
    """REPA's external encoder: tokens -> width-32 embedding + learned positions -> one pre-norm
    transformer block (2 heads) -> LayerNorm -> per-token features [B, N, 32]. ``classes``
    adds the classifier head of the label-trained encoder (None: no head, the label-free one)."""

    def __init__(self, n: int, c: int, classes: int | None, d: int = REPA_FEATURES) -> None:
        super().__init__()
        self.inp = nn.Linear(c, d)
        self.pos = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.norm1, self.norm2, self.out_norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads = 2
        # the classifier head of the label-trained encoder (None: the label-free one)
        self.head = nn.Linear(d, classes) if classes is not None else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.inp(tokens) + self.pos
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        h = h + self.mlp(self.norm2(h))
        return self.out_norm(h)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the classifier head reads while training: the mean over tokens."""
        return self(tokens).mean(1)


class ImageConvEncoder(nn.Module):
    """REPA's external encoder for images: :class:`ImageConv` (widths 24, 48, 96) -> per token
    ``Linear(96, 32)`` -> LayerNorm: ``[B, N, 32]`` in the tokens' order, the feature of token
    ``i`` read from the conv map at its patch. ``classes``: as :class:`TokenEncoder`; the head
    reads the max over tokens (whether a letter occurs anywhere)."""

    def __init__(self, n: int, c: int, classes: int | None, unpatchify: Callable,
                 d: int = REPA_FEATURES) -> None:
        super().__init__()
        self.conv = ImageConv(n, c, unpatchify, (24, 48, 96))
        self.out = nn.Linear(96, d)
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes) if classes is not None else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.out(self.conv(tokens).transpose(1, 2)))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens).amax(1)


ENCODERS = {"token": TokenEncoder, "image_conv": ImageConvEncoder}
#: the networks that read the image: built with the modality's ``unpatchify``
IMAGE_NETS = (ImageConvExtractor, ImageConvEncoder)


def make_net(cls: type, n: int, c: int, classes: int | None,
             unpatchify: Callable | None = None) -> nn.Module:
    """A fresh ``cls`` for tokens ``[B, n, c]``; the image networks also get ``unpatchify``."""
    if cls not in IMAGE_NETS:
        return cls(n, c, classes)
    if unpatchify is None:
        raise ValueError(f"{cls.__name__} reads the image: give the modality's unpatchify")
    return cls(n, c, classes, unpatchify)


def train_classifier(net: nn.Module, features_of, x: torch.Tensor, y: torch.Tensor, seed: int,
                     steps: int, noise: float) -> dict:
    """AdamW on 80 % of ``x`` (with Gaussian input noise of std ``noise`` for smoother
    features); accuracies on the training split and the held-out 20 %, and the seconds taken."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    multi = y.dim() == 2  # multi-hot targets (e.g. the letters of a word): one logit each
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (128,), generator=g)]
        xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
        logits = net.head(features_of(xb))
        loss = (F.binary_cross_entropy_with_logits(logits, y[idx].float()) if multi
                else F.cross_entropy(logits, y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        def acc(s):
            logits = net.head(features_of(x[s]))
            if multi:  # Jaccard of the predicted and the true sets
                return jaccard(logits > 0, y[s] > 0.5)
            return float((logits.argmax(1) == y[s]).float().mean())

        return {"train_acc": acc(train), "heldout_acc": acc(test), "train_samples": len(train),
                "heldout_samples": n_test, "steps": steps, "seed": seed, "optimizer":
                f"AdamW lr 2e-3 wd 1e-4, batch 128, input noise {noise}",
                "seconds": time.perf_counter() - t0}


def jaccard(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over rows of |pred ∩ true| / |pred ∪ true| of boolean ``[B, K]`` sets (1 for two
    empty sets)."""
    inter = (pred & true).sum(1).float()
    union = (pred | true).sum(1).float()
    return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


LABEL_FREE_FILE, LABEL_FREE_KEY = "repa_encoder_label_free.pt", "repa_encoder_label_free"
#: the label-free encoder's settings: the label-trained one's seed (so the same initial weights),
#: its steps and input noise, and the masked autoencoder's mask ratio
LABEL_FREE_SEED, LABEL_FREE_MASK = 4321, 0.5


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Held-out accuracy (20 %, split from ``seed``) of a closed-form ridge probe (1e-2) on
    standardised features ``[S, D]``: how linearly the classes sit in an encoder's features."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(features), generator=g)
    n_test = len(features) // 5
    test, train = perm[:n_test], perm[n_test:]
    f = features.double()
    mu, sd = f[train].mean(0), f[train].std(0).clamp_min(1e-6)
    f = torch.cat([(f - mu) / sd, torch.ones(len(f), 1, dtype=f.dtype)], 1)
    y = F.one_hot(labels.long(), int(labels.max()) + 1).double()
    a = f[train]
    w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=f.dtype), a.T @ y[train])
    return float(((f[test] @ w).argmax(1) == labels[test]).double().mean())


def train_label_free_encoder(tokens: torch.Tensor, *, steps: int, noise: float,
                             encoder: str = "token", unpatchify: Callable | None = None
                             ) -> tuple:
    """REPA's label-free encoder from ``tokens`` alone (no labels are given to it): the
    label-trained encoder's architecture (``ENCODERS[encoder]``, without its classifier head)
    and initialisation, trained as a masked autoencoder. Returns (encoder, info)."""
    from selfflow_repa import train_masked_autoencoder

    x = tokens.float()
    _, n, c = x.shape
    torch.manual_seed(LABEL_FREE_SEED)
    enc = make_net(ENCODERS[encoder], n, c, None, unpatchify)
    info = train_masked_autoencoder(enc, x, seed=LABEL_FREE_SEED, steps=steps,
                                    mask_ratio=LABEL_FREE_MASK, noise=noise)
    return enc, info


def _label_free(folder: Path, meta: dict, x: torch.Tensor, y: torch.Tensor, steps: int,
                noise: float, encoder: str, unpatchify: Callable | None) -> dict:
    """``meta`` with the label-free encoder: trained once and added, or checked (hash and
    settings) when the folder has it already."""
    from selfflow_repa import save_encoder
    from selfflow_repa.teacher import load_encoder

    path, settings = folder / LABEL_FREE_FILE, {"steps": steps, "noise": noise,
                                                "seed": LABEL_FREE_SEED,
                                                "mask_ratio": LABEL_FREE_MASK}
    if LABEL_FREE_KEY in meta:
        info = meta[LABEL_FREE_KEY]
        if (path.is_file() and sha256(path) == info["sha256"]
                and info.get("settings") == settings):
            return meta
        raise SystemExit(f"{folder} holds a label-free REPA encoder that does not match this "
                         f"benchmark (settings or hash differ); delete the folder to rebuild it")
    enc, info = train_label_free_encoder(x, steps=steps, noise=noise, encoder=encoder,
                                         unpatchify=unpatchify)
    info["sha256"] = save_encoder(enc, path)
    info.update(features=REPA_FEATURES, settings=settings,
                architecture=ENCODERS[encoder].__name__)
    if y.dim() == 2:  # multi-hot targets: probe the first entry set (a class per sample)
        y = y.float().argmax(1)
    with torch.no_grad():  # evaluation only, after training: how class-separable the features are
        info["probe_heldout_acc"] = probe_accuracy(enc(x).mean(1), y, seed=LABEL_FREE_SEED)
        label_trained = load_encoder(folder / "repa_encoder.pt")
        info["probe_heldout_acc_label_trained"] = probe_accuracy(
            label_trained(x).mean(1), y, seed=LABEL_FREE_SEED)
    return {**meta, LABEL_FREE_KEY: info}


def _write_meta(meta_path: Path, meta: dict) -> None:
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)


def build_assets(folder: Path, spec: dict, tokens: torch.Tensor, labels: torch.Tensor, *,
                 extractor: str = "mlp", encoder: str = "token", steps: int = 600,
                 noise: float = 0.05, label_free: bool = False,
                 unpatchify: Callable | None = None) -> dict:
    """Train (once) and export the FD extractor (``EXTRACTORS[extractor]``) and the REPA
    encoder (``ENCODERS[encoder]``) into ``folder``; later calls with the same ``spec`` reuse
    them. A folder whose spec or hashes differ is an error, never silently rebuilt: results
    computed with other evaluators are not comparable. ``label_free`` also trains (once, then
    reuses) the label-free REPA encoder, from ``tokens`` alone; a folder without it gains it,
    the other assets unchanged. ``unpatchify``: the modality's, for the networks that read the
    image (``image_conv``)."""
    from selfflow_repa import save_encoder

    meta_path = folder / "assets.json"
    spec = {"version": ASSET_VERSION, **spec, "tokens": list(tokens.shape)}
    if extractor != "mlp":
        spec["extractor"] = extractor
    if encoder != "token":
        spec["encoder"] = encoder
    if steps != 600:
        spec["steps"] = steps
    if noise != 0.05:
        spec["noise"] = noise
    files = (("fd_extractor.pt", "fd_extractor"), ("repa_encoder.pt", "repa_encoder"))
    x, y = tokens.float(), labels.long()
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == spec and all(
                (folder / f).is_file() and sha256(folder / f) == meta[k]["sha256"]
                for f, k in files):
            if label_free:  # checks the label-free encoder, or adds it
                had = LABEL_FREE_KEY in meta
                meta = _label_free(folder, meta, x, y, steps, noise, encoder, unpatchify)
                if not had:
                    _write_meta(meta_path, meta)
            return meta
        raise SystemExit(f"{folder} holds assets that do not match this benchmark "
                         f"(spec or hash differ); delete the folder to rebuild them")
    folder.mkdir(parents=True, exist_ok=True)
    _, n, c = x.shape
    y = labels.float() if labels.dim() == 2 else y  # multi-hot targets: one logit per entry
    classes = y.shape[1] if y.dim() == 2 else int(y.max()) + 1
    torch.manual_seed(1234)
    fd = make_net(EXTRACTORS[extractor], n, c, classes, unpatchify)
    fd_info = train_classifier(fd, fd, x, y, seed=1234, steps=steps, noise=noise)
    torch.manual_seed(4321)
    enc = make_net(ENCODERS[encoder], n, c, classes, unpatchify)
    enc_info = train_classifier(enc, enc.pooled, x, y, seed=4321, steps=steps, noise=noise)
    fd_info["sha256"] = save_encoder(fd, folder / "fd_extractor.pt")
    enc_info["sha256"] = save_encoder(enc, folder / "repa_encoder.pt")
    fd_info["features"], enc_info["features"] = FD_FEATURES, REPA_FEATURES
    fd_info["architecture"], enc_info["architecture"] = extractor, encoder
    meta = {"spec": spec, "fd_extractor": fd_info, "repa_encoder": enc_info,
            "note": "trained once by benchmarks/convergence.py; fixed across runs"}
    if label_free:
        meta = _label_free(folder, meta, x, y, steps, noise, encoder, unpatchify)
    _write_meta(meta_path, meta)
    return meta
