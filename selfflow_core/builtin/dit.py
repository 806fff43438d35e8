"""The reference backbone: a DiT/SiT-style transformer with per-token adaLN-Zero time conditioning.

Each token carries its own timestep, so the dual-timestep plan needs no special path: a
homogeneous ``t`` is just the broadcast case. Positions come from the modality (1-3 axes),
classes are optional (with a null class for classifier-free guidance), and several modalities
share all blocks through their own input/output projections and a modality embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfflow_core.flow import head_velocity
from selfflow_core.interfaces import Backbone, BackboneConfig, TextSpec
from selfflow_core.types import BackboneOutput, TokenBatch

#: name -> (depth, width, heads); the SiT sizes plus small ones for CPU work
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 64, 4), "small": (6, 128, 4), "base-cpu": (8, 192, 6),
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
}
MAX_POSITION_AXES = 3


def sincos(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``x`` (any shape) -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding(positions: Tensor, width: int, who: str) -> Tensor:
    """Absolute sinusoidal embeddings [B, N, width] of positions [B, N, A] (A <= 3; missing
    axes are 0): each axis gets ``2 * (width // 6)`` channels, the rest are 0."""
    pos = positions.float()
    if pos.shape[-1] > MAX_POSITION_AXES:
        raise ValueError(f"{who} takes positions with at most {MAX_POSITION_AXES} axes, got "
                         f"{pos.shape[-1]}")
    pos = F.pad(pos, (0, MAX_POSITION_AXES - pos.shape[-1]))
    per_axis = 2 * (width // (2 * MAX_POSITION_AXES))
    return F.pad(sincos(pos, per_axis).flatten(-2), (0, width - MAX_POSITION_AXES * per_axis))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    #: recompute this block's activations in the backward pass instead of keeping them (set by
    #: the trainer's ``activation_checkpointing``; only while training with grad enabled)
    activation_checkpointing: bool = False

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, index: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, index, attn_mask, use_reentrant=False)
        return self._forward(x, c, index, attn_mask)

    def _forward(self, x: Tensor, c: Tensor, index: Tensor, attn_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[index].chunk(6, dim=-1)
        q, k, val = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(
            b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, val, attn_mask=attn_mask)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(Backbone):
    """Per-token-timestep DiT. ``DiT.Config.sized("B")`` picks a row of :data:`SIZES`."""

    @attrs.frozen(kw_only=True)
    class Config(BackboneConfig):
        kind = "dit"
        depth: int = attrs.field(default=4, validator=v.ge(1))
        width: int = attrs.field(default=64, validator=v.ge(6))
        heads: int = attrs.field(default=4, validator=v.ge(1))
        mlp_ratio: float = attrs.field(default=4.0, validator=v.gt(0))

        @width.validator
        def _check_width(self, attribute, value):
            if value % self.heads:
                raise ValueError(f"'width' must be divisible by heads ({self.heads}): {value}")

        @classmethod
        def sized(cls, size: str, **changes) -> DiT.Config:
            if size not in SIZES:
                raise ValueError(f"unknown DiT size {size!r}; sizes: {sorted(SIZES)}")
            depth, width, heads = SIZES[size]
            return cls(**{"depth": depth, "width": width, "heads": heads, **changes})

        def build(self, *, token_dims: Sequence[int], num_classes: int = 0,
                  text: TextSpec | None = None) -> DiT:
            if text is not None:
                raise ValueError("DiT has no text stream; use the mmdit backbone for "
                                 "prompt-conditioned runs")
            return DiT(self, token_dims=token_dims, num_classes=num_classes)

    def __init__(self, config: Config, *, token_dims: Sequence[int], num_classes: int = 0) -> None:
        super().__init__()
        self.config = config
        self.depth, self.width = config.depth, config.width
        self.token_dims = tuple(int(c) for c in token_dims)
        self.num_classes = num_classes
        d = config.width
        self.inputs = nn.ModuleList(nn.Linear(c, d) for c in self.token_dims)
        self.modality_embed = nn.Embedding(len(self.token_dims), d)
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(num_classes + 1, d) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.outputs = nn.ModuleList(nn.Linear(d, c) for c in self.token_dims)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for lin in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [blk.ada[-1] for blk in self.blocks] + [self.final_ada[-1], *self.outputs]
        for lin in zero:  # adaLN-Zero: every block starts as the identity, the output as zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _per_modality(self, layers: nn.ModuleList, x: Tensor, ids: Tensor, out_dim: int | None
                      ) -> Tensor:
        if len(layers) == 1:
            return layers[0](x[..., : layers[0].in_features])
        out = x.new_zeros(*x.shape[:-1], out_dim or max(lin.out_features for lin in layers))
        for m, lin in enumerate(layers):
            sel = ids == m
            if bool(sel.any()):
                y = lin(x[sel][..., : lin.in_features])
                out[sel] = F.pad(y, (0, out.shape[-1] - y.shape[-1])).to(out.dtype)
        return out

    def _conditioning(self, t: Tensor, labels: Tensor | None, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor]:
        """Conditioning rows for the distinct (sample, timestep) pairs, and each token's row.

        A token's conditioning depends only on its sample (label) and its timestep, and a
        dual-timestep batch has at most two timesteps per sample: the modulation MLPs then run
        on ~2B rows instead of B*N tokens (identical values, N/2 times less work)."""
        b = t.shape[0]
        times, time_of = torch.unique(t, return_inverse=True)
        pairs, index = torch.unique(
            torch.arange(b, device=t.device)[:, None] * len(times) + time_of, return_inverse=True)
        c = self.time_mlp(sincos(times * 1000.0, 256).to(dtype))[pairs % len(times)]
        if self.label_embed is not None and labels is not None:
            c = c + self.label_embed(labels)[pairs // len(times)]
        return c, index

    def repeated_blocks(self) -> nn.ModuleList:
        return self.blocks

    def forward(self, x, t, batch: TokenBatch, *, feature_layers=(), stop_after=None):
        b, n, _ = x.shape
        if t.dim() == 1:
            t = t[:, None].expand(b, n)
        ids = batch.modality_ids
        pos_emb = position_embedding(batch.positions, self.width, "DiT")
        h = self._per_modality(self.inputs, x, ids, self.width) + pos_emb.to(x.dtype)
        h = h + self.modality_embed(ids)
        c, index = self._conditioning(t, batch.labels, h.dtype)
        valid = batch.valid
        padded = batch.padded if batch.padded is not None else not bool(valid.all())
        attn_mask = valid[:, None, None, :] if padded else None
        wanted = set(feature_layers)
        features: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c, index, attn_mask)
            if i in wanted:
                features[i] = h
            if stop_after is not None and i >= stop_after:
                return BackboneOutput(velocity=None, features=features)
        sh, sc = self.final_ada(c)[index].chunk(2, dim=-1)
        head = self._per_modality(self.outputs, modulate(self.final_norm(h), sh, sc), ids,
                                  x.shape[-1])
        velocity = head_velocity(self.config, x, t, head, batch)
        return BackboneOutput(velocity=velocity, features=features)
