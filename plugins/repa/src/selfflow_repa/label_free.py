"""A label-free way to train REPA's frozen encoder on your own data: masked autoencoding.

REPA's encoder in the paper, DINOv2, is self-supervised: it never saw a label. An encoder trained
to classify the very data the flow model learns (the benchmark's default, ``repa``) is a
stronger, label-informed teacher. :func:`train_masked_autoencoder` trains a per-token encoder
from tokens alone, so a run can tell how much of REPA's effect comes from the labels: the
encoder maps noisy tokens, a random ``mask_ratio`` of them zeroed, to per-token features, and a
linear decoder must rebuild every clean token from its feature (the masked ones only from their
context). The function takes no labels, so none can reach the weights. Given the same encoder
initialisation, tokens and ``seed`` it gives the same weights (CPU, one thread).

Export the trained encoder with :func:`selfflow_repa.save_encoder` and use it as any REPA
encoder (``teacher.encoder``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def train_masked_autoencoder(encoder: nn.Module, tokens: Tensor, *, seed: int = 0,
                             steps: int = 600, batch: int = 128, mask_ratio: float = 0.5,
                             noise: float = 0.05, lr: float = 2e-3,
                             weight_decay: float = 1e-4) -> dict:
    """Train ``encoder`` (``[B, N, C] -> [B, N, D]``) in place on ``tokens`` ``[S, N, C]``
    without labels, and leave it in eval mode. Returns what to record: the reconstruction MSE
    on the training 80 % and the held-out 20 % (the split, the batches, the input noise, the
    masks and the decoder's initialisation all come from ``seed``) and the settings.

    Each step: ``batch`` samples, Gaussian input noise of std ``noise``, a Bernoulli(``mask_ratio``)
    mask per token whose tokens are zeroed, then the MSE between ``decoder(encoder(input))`` and
    the clean tokens over every token; AdamW on encoder and decoder (a ``Linear(D, C)``, dropped
    afterwards)."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1): {mask_ratio}")
    x = tokens.detach().float()
    if x.ndim != 3 or len(x) < 2:
        raise ValueError(f"tokens must be [samples >= 2, N, C], got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = max(1, len(x) // 5)
    test, train = perm[:n_test], perm[n_test:]
    encoder.train()
    with torch.no_grad():
        dim = encoder(x[:1]).shape[-1]
    with torch.random.fork_rng(devices=[]):  # the decoder's init from `seed`, global RNG intact
        torch.manual_seed(seed)
        decoder = nn.Linear(dim, x.shape[-1])
    params = [*encoder.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        clean = x[train[torch.randint(0, len(train), (batch,), generator=g)]]
        keep = torch.rand(clean.shape[:2], generator=g) >= mask_ratio
        noisy = clean + noise * torch.randn(clean.shape, generator=g)
        loss = (decoder(encoder(noisy * keep[..., None])) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval()
    with torch.no_grad():
        def mse(idx):
            return float((decoder(encoder(x[idx])) - x[idx]).square().mean())

        return {"objective": f"masked autoencoder: mask ratio {mask_ratio}, input noise {noise}, "
                             f"linear decoder, MSE over every token (no labels)",
                "train_mse": mse(train), "heldout_mse": mse(test), "train_samples": len(train),
                "heldout_samples": n_test, "steps": steps, "seed": seed,
                "optimizer": f"AdamW lr {lr} wd {weight_decay}, batch {batch}"}
