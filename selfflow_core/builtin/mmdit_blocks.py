"""The MMDiT's layers: RMSNorm, SwiGLU, RoPE, joint attention, and its three kinds of block
(double-stream, single-stream, text-only). :mod:`selfflow_core.builtin.mmdit` assembles them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selfflow_core.builtin.dit import modulate


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale, computed in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype) * self.scale.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(width, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, H, S, Dh] by ``rope`` = (cos, sin)
    [B, 1, S, Dh/2] (float32); cos 1, sin 0 is exactly the identity."""
    cos, sin = rope
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


def per_modality(layers: nn.ModuleList, x: Tensor, ids: Tensor, out_dim: int) -> Tensor:
    """Each token through its modality's linear (reading only that modality's channels)."""
    if len(layers) == 1:
        return layers[0](x[..., : layers[0].in_features])
    out = x.new_zeros(*x.shape[:-1], out_dim)
    for m, lin in enumerate(layers):
        sel = ids == m
        if bool(sel.any()):
            y = lin(x[sel][..., : lin.in_features])
            out[sel] = F.pad(y, (0, out_dim - y.shape[-1])).to(out.dtype)
    return out


class _Stream(nn.Module):
    """One stream's weights in a double block."""

    def __init__(self, width: int, heads: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.q_norm, self.k_norm = RMSNorm(width // heads), RMSNorm(width // heads)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = SwiGLU(width, hidden)

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, d = x.shape
        q, k, val = self.qkv(modulate(layer_norm(x), shift, scale)).view(
            b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), val

    def finish(self, x: Tensor, attn: Tensor, mod: Sequence[Tensor]) -> Tensor:
        _, _, g1, sh2, sc2, g2 = mod
        x = x + g1 * self.proj(attn)
        return x + g2 * self.mlp(modulate(layer_norm(x), sh2, sc2))


def _attention(q: Tensor, k: Tensor, val: Tensor, rope: tuple[Tensor, Tensor],
               mask: Tensor | None) -> Tensor:
    """Joint attention [B, H, S, Dh] -> [B, S, H * Dh]."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    a = F.scaled_dot_product_attention(q, k.to(q.dtype), val.to(q.dtype), attn_mask=mask)
    return a.transpose(1, 2).flatten(2)


class DoubleBlock(nn.Module):
    """Separate text / latent weights, joint attention. Modulation comes in from the model
    (shared); ``offsets`` adds this block's own learned offset to it."""

    #: recompute the block's activations in the backward pass (set by the trainer's
    #: ``activation_checkpointing``; only while training with grad enabled)
    activation_checkpointing: bool = False

    def __init__(self, width: int, heads: int, hidden: int, *, qkv_bias: bool, text: bool,
                 offsets: bool) -> None:
        super().__init__()
        self.img = _Stream(width, heads, hidden, qkv_bias)
        self.txt = _Stream(width, heads, hidden, qkv_bias) if text else None
        self.img_offset = nn.Parameter(torch.zeros(6, width)) if offsets else None
        self.txt_offset = nn.Parameter(torch.zeros(6, width)) if offsets and text else None

    def forward(self, img: Tensor, txt: Tensor | None, img_mod: Tensor, txt_mod: Tensor | None,
                rope: tuple[Tensor, Tensor], mask: Tensor | None
                ) -> tuple[Tensor, Tensor | None]:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, img, txt, img_mod, txt_mod, rope, mask,
                              use_reentrant=False)
        return self._forward(img, txt, img_mod, txt_mod, rope, mask)

    def _forward(self, img, txt, img_mod, txt_mod, rope, mask):
        if self.img_offset is not None:
            img_mod = img_mod + self.img_offset.to(img_mod.dtype)
        im = img_mod.unbind(-2)
        q, k, val = self.img.qkv_heads(img, im[0], im[1])
        if txt is None:
            return self.img.finish(img, _attention(q, k, val, rope, mask), im), None
        if self.txt_offset is not None:
            txt_mod = txt_mod + self.txt_offset.to(txt_mod.dtype)
        tm = txt_mod.unbind(-2)
        tq, tk, tv = self.txt.qkv_heads(txt, tm[0], tm[1])
        n_txt = txt.shape[1]
        a = _attention(torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, val], 2),
                       rope, mask)
        return (self.img.finish(img, a[:, n_txt:], im),
                self.txt.finish(txt, a[:, :n_txt], tm))


class SingleBlock(nn.Module):
    """One parallel block over concat(text, latent): a fused linear gives qkv and the SwiGLU
    input, a second one maps cat(attention, MLP) back to the width."""

    activation_checkpointing: bool = False

    def __init__(self, width: int, heads: int, hidden: int, *, qkv_bias: bool,
                 offsets: bool) -> None:
        super().__init__()
        self.heads, self.width, self.hidden = heads, width, hidden
        self.linear1 = nn.Linear(width, 3 * width + 2 * hidden, bias=False)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * width)) if qkv_bias else None
        self.q_norm, self.k_norm = RMSNorm(width // heads), RMSNorm(width // heads)
        self.linear2 = nn.Linear(width + hidden, width, bias=False)
        self.offset = nn.Parameter(torch.zeros(3, width)) if offsets else None

    def forward(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mod, rope, mask, use_reentrant=False)
        return self._forward(x, mod, rope, mask)

    def _forward(self, x, mod, rope, mask):
        b, s, d = x.shape
        if self.offset is not None:
            mod = mod + self.offset.to(mod.dtype)
        shift, scale, gate = mod.unbind(-2)
        qkv, g, up = self.linear1(modulate(layer_norm(x), shift, scale)).split(
            [3 * d, self.hidden, self.hidden], dim=-1)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias.to(qkv.dtype)
        q, k, val = qkv.view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = _attention(self.q_norm(q), self.k_norm(k), val, rope, mask)
        return x + gate * self.linear2(torch.cat([a, F.silu(g) * up], dim=-1))


class TextBlock(nn.Module):
    """A block over the text tokens alone, before the joint blocks (a "context refiner", as in
    Lumina-Image 2.0): pre-norm self-attention with QK RMSNorm and 1-D RoPE over the token
    index, then a SwiGLU MLP; no time modulation (the text does not depend on t)."""

    def __init__(self, width: int, heads: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.stream = _Stream(width, heads, hidden, qkv_bias)

    def forward(self, txt: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        zero, one = txt.new_zeros(()), txt.new_ones(())
        q, k, val = self.stream.qkv_heads(txt, zero, zero)
        return self.stream.finish(txt, _attention(q, k, val, rope, mask),
                                  (zero, zero, one, zero, zero, one))


def rope_angles(pos: Tensor, dim: int, theta: float) -> Tensor:
    """RoPE angles [..., dim / 2] of positions ``pos`` [...] on ``dim`` channels:
    ``pos * theta ** (-2i / dim)``."""
    freqs = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    return pos.float()[..., None] * freqs


def sequence_rope(length: int, dim: int, theta: float, device) -> tuple[Tensor, Tensor]:
    """1-D RoPE (cos, sin) [1, 1, length, dim / 2] over positions 0 .. length - 1."""
    angles = rope_angles(torch.arange(length, device=device), dim, theta)
    return angles.cos()[None, None], angles.sin()[None, None]
