"""Representation diagnostics, usable during training (``TrainerConfig.diagnostics``, or
:class:`DiagnosticsHook` on a batch of your own) and offline.

Every public function takes a backbone and a :class:`~selfflow_core.types.TokenBatch` (plus class
labels where the data has them) and returns a plain ``dict[str, float]``, ready for a tracker's
``log_metrics``:

- :func:`probe_layers`: per block, linear-probe accuracy on frozen, mean-pooled features
  (closed-form ridge regression onto one-hot classes, fit on a train split, accuracy on a
  held-out split), the features' effective rank and their spread (collapse monitors).
- :func:`loss_by_timestep`: the flow-matching loss per bucket of ``t`` (where the model is good
  or bad along the noise axis).
- :func:`objective_metrics`: the objective's own terms (``flow``, ``rep``, ``feature_cos``: the
  cosine between the student's head output and the teacher's target) on a fixed draw.

Features are read with the class label replaced by the null class (when the backbone has
classes): a class-conditional model's hidden states otherwise carry the label it was *given*, and
a probe would read that back instead of what the network inferred from the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
import numpy as np
import torch
from torch import Tensor

from selfflow_core.flow import interpolate, velocity_target
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.types import TokenBatch

__all__ = ["DiagnosticsHook", "bucket_means", "effective_rank", "feature_spread", "hidden_features",
           "linear_probe", "loss_by_timestep", "objective_metrics", "pool", "probe_layers",
           "stored_batch"]


def _chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _device(backbone: torch.nn.Module) -> torch.device:
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def hidden_features(backbone, batch: TokenBatch, *, layers: Sequence[int], t: float = 0.0,
                    seed: int = 0, unconditional: bool = True, chunk: int = 256
                    ) -> dict[int, Tensor]:
    """Hidden states ``[B, N, D]`` (float32, CPU) after each of ``layers`` (1-indexed blocks), for
    the batch seen at the homogeneous time ``t`` (``t > 0``: noised with a noise draw fixed by
    ``seed``). ``unconditional``: labels replaced by the null class ``backbone.num_classes``."""
    device = _device(backbone)
    gen = torch.Generator(device).manual_seed(seed)
    layers = tuple(sorted({int(i) for i in layers}))
    was_training = backbone.training
    backbone.eval()
    out: dict[int, list[Tensor]] = {i: [] for i in layers}
    try:
        for rows in _chunks(batch.tokens.shape[0], chunk):
            part = batch.rows(rows).to(device)
            if unconditional and part.labels is not None and getattr(backbone, "num_classes", 0):
                part = attrs.evolve(part, labels=torch.full_like(part.labels, backbone.num_classes))
            b, n = part.valid.shape
            tt = torch.full((b, n), float(t), device=device)
            tt = torch.where(part.condition, torch.zeros_like(tt), tt)
            x = part.tokens
            if t > 0:
                x = interpolate(x, torch.randn(x.shape, generator=gen, device=device), tt)
            res = backbone(x, tt, part, feature_layers=layers, stop_after=max(layers))
            for i in layers:
                out[i].append(res.features[i].float().cpu())
    finally:
        backbone.train(was_training)
    return {i: torch.cat(v) for i, v in out.items()}


def pool(features: Tensor, mask: Tensor) -> Tensor:
    """Mean over the tokens where ``mask`` [B, N] is true: ``[B, N, D]`` -> ``[B, D]``."""
    w = mask.to(features.dtype)[..., None]
    return (features * w).sum(1) / w.sum(1).clamp_min(1.0)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
                 ridge: float = 1e-2, num_classes: int | None = None) -> dict[str, float]:
    """Closed-form ridge regression from standardised features (+ bias) onto one-hot labels;
    the prediction is the argmax. ``ridge`` is relative to the mean feature variance (1 after
    standardising), times the number of training samples. Returns train / held-out accuracy and
    the majority-class accuracy of the held-out split (what a constant guess gets)."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    zt = (test_x.double() - mean) / std
    k = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    y = torch.nn.functional.one_hot(train_y.long(), k).double()
    z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    reg = ridge * len(z) * torch.eye(z1.shape[1], dtype=z.dtype)
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = torch.linalg.solve(z1.T @ z1 + reg, z1.T @ y)
    zt1 = torch.cat([zt, torch.ones(len(zt), 1, dtype=zt.dtype)], 1)
    def acc(a, lab):
        return float((a.argmax(1) == lab.long()).double().mean())

    majority = float(torch.bincount(test_y.long(), minlength=k).max()) / max(len(test_y), 1)
    return {"acc": acc(zt1 @ w, test_y), "train_acc": acc(z1 @ w, train_y),
            "majority": majority}


def effective_rank(features: Tensor) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the centred features
    ``[M, D]`` (Roy & Vetterli, 2007): ~D for isotropic features, 1 for rank-1 features, and a
    collapse monitor in between."""
    x = features.double().reshape(-1, features.shape[-1])
    x = x - x.mean(0)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def feature_spread(features: Tensor) -> dict[str, float]:
    """``std``: mean per-channel standard deviation across samples; ``std_normalized``: the same
    for L2-normalised features, times sqrt(D) (about 1 for spread-out features, 0 when every
    sample maps to one direction: collapse)."""
    x = features.double().reshape(-1, features.shape[-1])
    xn = torch.nn.functional.normalize(x, dim=-1)
    return {"std": float(x.std(0, unbiased=False).mean()),
            "std_normalized": float(xn.std(0, unbiased=False).mean() * x.shape[-1] ** 0.5)}


def probe_layers(backbone, batch: TokenBatch, labels: Tensor | None = None, *,
                 layers: Sequence[int] | None = None, t: float = 0.0, holdout: float = 0.3,
                 seed: int = 0, ridge: float = 1e-2, rank_tokens: int = 4096,
                 chunk: int = 256) -> dict[str, float]:
    """Per block ``i`` of ``layers`` (default: all): ``probe_acc/layer{i}`` (held-out accuracy of
    a linear probe on mean-pooled tokens; only with labels, from ``labels`` or ``batch.labels``),
    ``erank/layer{i}`` (effective rank of up to ``rank_tokens`` per-token features),
    ``feat_std/layer{i}`` and ``feat_std_norm/layer{i}``. The split is a permutation fixed by
    ``seed``: ``holdout`` of the samples are held out. ``probe_chance`` is the held-out
    majority-class rate."""
    layers = list(layers or range(1, backbone.depth + 1))
    labels = batch.labels if labels is None else labels
    feats = hidden_features(backbone, batch, layers=layers, t=t, seed=seed, chunk=chunk)
    mask = batch.target_mask.cpu()
    gen = torch.Generator().manual_seed(seed)
    n = batch.tokens.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_test = max(1, round(holdout * n))
    test, train = perm[:n_test], perm[n_test:]
    token_rows = mask.reshape(-1).nonzero().squeeze(1)
    if len(token_rows) > rank_tokens:
        token_rows = token_rows[torch.randperm(len(token_rows), generator=gen)[:rank_tokens]]
    out: dict[str, float] = {}
    for i in layers:
        f = feats[i]
        tok = f.reshape(-1, f.shape[-1])[token_rows]
        out[f"erank/layer{i}"] = effective_rank(tok)
        spread = feature_spread(tok)
        out[f"feat_std/layer{i}"] = spread["std"]
        out[f"feat_std_norm/layer{i}"] = spread["std_normalized"]
        if labels is not None and len(train) > 0:
            pooled = pool(f, mask)
            y = labels.cpu()
            res = linear_probe(pooled[train], y[train], pooled[test], y[test], ridge=ridge)
            out[f"probe_acc/layer{i}"] = res["acc"]
            out["probe_chance"] = res["majority"]
    return out


def bucket_means(values: Tensor, t: Tensor, edges: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` per bucket ``[edges[j], edges[j+1])`` of ``t`` (the last bucket closed),
    and the count per bucket: the buckets partition the values, so the count-weighted mean of the
    bucket means is the overall mean. Empty buckets give NaN."""
    e = torch.as_tensor(list(edges), dtype=torch.float64)
    idx = (torch.bucketize(t.double().cpu(), e, right=True) - 1).clamp(0, len(e) - 2)
    k = len(e) - 1
    counts = torch.bincount(idx, minlength=k).double()
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values.double().cpu())
    return sums / counts.where(counts > 0, torch.full_like(counts, float("nan"))), counts


@torch.no_grad()
def loss_by_timestep(backbone, batch: TokenBatch, *, buckets: int = 5, seed: int = 0,
                     chunk: int = 256) -> dict[str, float]:
    """The flow-matching loss (per-sample MSE over the generated tokens, homogeneous ``t``) in
    ``buckets`` equal buckets of ``t``: sample ``i`` gets bucket ``i % buckets`` and ``t``
    uniform inside it (stratified, so each bucket holds the same number of samples).
    Keys ``flow_t/{lo:.1f}-{hi:.1f}`` and ``flow_t/all`` (the mean over all samples, an estimate
    of the loss under uniform ``t``)."""
    device = _device(backbone)
    gen = torch.Generator(device).manual_seed(seed)
    n = batch.tokens.shape[0]
    edges = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)
    which = torch.arange(n) % buckets
    t_all = ((which + torch.rand(n, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)) / buckets).float()
    was_training = backbone.training
    backbone.eval()
    losses = []
    try:
        for rows in _chunks(n, chunk):
            part = batch.rows(rows).to(device)
            b, m = part.valid.shape
            tt = t_all[rows].to(device)[:, None].expand(b, m)
            tt = torch.where(part.condition, torch.zeros_like(tt), tt)
            noise = torch.randn(part.tokens.shape, generator=gen, device=device)
            vel = backbone(interpolate(part.tokens, noise, tt), tt, part).velocity
            err = (vel.float() - velocity_target(part.tokens, noise).float()).square()
            w = part.target_mask.float()[..., None].expand_as(err)
            if part.channel_valid is not None:
                w = w * part.channel_valid.float()
            losses.append(((err * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1.0)).cpu())
    finally:
        backbone.train(was_training)
    loss = torch.cat(losses)
    means, _ = bucket_means(loss, t_all, edges.tolist())
    out = {f"flow_t/{lo:.1f}-{hi:.1f}": float(m)
           for lo, hi, m in zip(edges[:-1].tolist(), edges[1:].tolist(), means)}
    out["flow_t/all"] = float(loss.double().mean())
    return out


@torch.no_grad()
def objective_metrics(model, teacher, batch: TokenBatch, scheduler, *, seed: int = 0,
                      id_offset: int = 0) -> dict[str, float]:
    """The objective's metrics (``flow``, ``rep``, ``feature_cos``, ``loss``) for one draw of the
    scheduler's plan and noise fixed by ``seed``; ``model`` is the trainer's
    ``StudentWithHead`` (``trainer.model``). ``batch`` has the adapter's own modality ids (the
    scheduler plans on those), offset by ``id_offset`` for the backbone, as the trainer does."""
    device = _device(model)
    gen = torch.Generator(device).manual_seed(seed)
    batch = batch.to(device)
    plan = scheduler.plan(batch, generator=gen)
    batch = attrs.evolve(batch, modality_ids=batch.modality_ids + id_offset)
    noise = torch.randn(batch.tokens.shape, generator=gen, device=device)
    terms = model(teacher, batch, plan, noise)
    return {k: float(v) for k, v in terms.metrics.items()}


def stored_batch(store, adapter, count: int, *, id_offset: int = 0,
                 device: torch.device | str = "cpu") -> TokenBatch:
    """A fixed diagnostics set: ``count`` samples spread evenly over a latent store (all of them
    when it holds fewer), tokenized by the modality's adapter."""
    n = len(store)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    fields = store.read(idx)
    batch = adapter.tokenize({k: torch.from_numpy(np.asarray(v)) for k, v in fields.items()})
    return attrs.evolve(batch, modality_ids=batch.modality_ids + id_offset).to(device)


class DiagnosticsHook:
    """A plugin object logging :func:`probe_layers` (and :func:`loss_by_timestep`) of the
    trainer's backbone to its tracker every ``every`` steps, on a fixed batch. Register it with
    ``Components(make_plugin_manager([DiagnosticsHook(batch, every=500)]))``. It only reads the
    model (no grad, its own RNG), so training is unchanged. ``results`` keeps ``(step, dict)``."""

    def __init__(self, batch: TokenBatch, labels: Tensor | None = None, *, every: int = 500,
                 layers: Sequence[int] | None = None, t: float = 0.0,
                 timestep_buckets: int = 5) -> None:
        self.batch, self.labels, self.every = batch, labels, every
        self.layers, self.t, self.buckets = layers, t, timestep_buckets
        self.results: list[tuple[int, dict[str, float]]] = []

    def report(self, backbone) -> dict[str, float]:
        out = probe_layers(backbone, self.batch, self.labels, layers=self.layers, t=self.t)
        if self.buckets:
            out.update(loss_by_timestep(backbone, self.batch, buckets=self.buckets))
        return out

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        if step % self.every:
            return
        metrics = self.report(trainer.backbone)
        self.results.append((step, metrics))
        if trainer.dist.is_main:
            trainer.tracker.log_metrics(metrics, step=step)
