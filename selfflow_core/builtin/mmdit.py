"""A FLUX-style MMDiT: double-stream blocks (text and latent streams, joint attention), then
single-stream parallel blocks, with shared modulation and per-token timesteps.

The paper's text-to-image / multi-modal backbone (App. A.3: hidden 1152, MLP ratio 4, 16 heads,
7 double + 14 single blocks, shared modulation, SwiGLU, bias on qkv, 3-D RoPE with 24 channels
per axis, text conditioning as in FLUX) is ``MMDiT.Config.paper()``; the defaults are a small
CPU model. Its layers and blocks live in :mod:`selfflow_core.builtin.mmdit_blocks`.

- **Streams.** Latent tokens enter through one input projection per entry of ``token_dims``
  (reading only its first ``C_g`` channels, as :class:`~selfflow_core.builtin.dit.DiT`) plus a
  modality embedding. Text tokens come from ``batch.text_ids`` (an ``nn.Embedding`` of
  ``vocab_size`` rows, padding id 0, plus a learned absolute position embedding of
  ``max_length`` rows: byte ids carry no order of their own) and/or ``batch.text`` (a linear map
  of a frozen encoder's embeddings, which already carry their order). ``text_blocks > 0``
  first runs the text tokens through that many :class:`TextBlock` s of their own (1-D RoPE
  over the token index, no time modulation), for text encoders that do not contextualise.
- **Double-stream blocks** keep separate weights per stream (norms, qkv, per-head QK RMSNorm,
  output projection, SwiGLU MLP) and attend jointly over ``concat(text, latent)``, with a key
  padding mask from ``text_mask`` and ``valid``. **Single-stream blocks** run over the
  concatenation, one fused linear for qkv and the MLP input (``x + gate * linear2(cat(attn,
  swiglu))``). The final layer reads the latent tokens only.
- **Shared modulation** (FLUX.2): one modulation network for the double blocks' latent stream,
  one for their text stream, one for the single blocks; each computes its shift/scale/gate sets
  once per forward, and every block reuses them. ``block_offsets=True`` adds a learned per-block
  offset to each set (zero-initialised, as Wan 2.x; the paper and FLUX.2 have none, the
  default).
- **Per-token time.** A latent token's conditioning vector is ``time_mlp(sincos(1000 t[b, n]))``
  (+ the class embedding, + ``pooled_mlp(text_pooled)``). It depends only on the sample and the
  token's time, so the modulation networks run on the distinct (sample, time) rows (about 2B
  under dual-timestep scheduling) and tokens index them, as in the DiT.
- **Text-stream conditioning: the per-sample mean.** Text tokens have no time of their own; they
  are modulated with the mean of the sample's latent conditioning vectors over its generated
  tokens (``valid & ~condition``; all valid tokens if there are none, all tokens if none is
  valid). With a homogeneous ``t`` it equals the per-sample conditioning exactly (the FLUX.2
  Self-Flow port does the same). The single blocks' text slice uses the same mean vector.
- **Positions.** RoPE over ``len(axes_dim)`` axes (``axes_dim`` sums to the head dim, each entry
  even; frequencies ``theta ** (-2i / axes_dim[a])``): latent tokens use ``batch.positions``
  (missing trailing axes are 0), text tokens sit at 0 on every axis (the identity rotation).
  RoPE gives only relative positions: the text tokens at 0 are what tells a latent token where
  it is in the image. Without a prompt (class labels only) a token can tell the centre from the
  edge only indirectly, from which offsets the other tokens have; a class-conditional run is
  better served by the DiT's absolute position embeddings (measured in
  ``benchmarks/RESULTS.md``, "Is it the text pathway?"). ``absolute_positions=True`` adds
  that embedding to the latent tokens' inputs too (SD3's MMDiT has absolute positions): then a
  latent token knows where it is before it reads anything, so it can ask the prompt for what
  belongs at its place (the letter of its cell, in ``t2i_words``).
- **Self-Flow layers.** ``depth = double_blocks + single_blocks``; blocks are numbered double
  first, then single, and the feature of a block is the latent stream's hidden state
  ``[B, N, width]`` (the latent slice, in single blocks). ``repeated_blocks()`` lists every
  block, double then single: per-block ``torch.compile``, activation checkpointing and FSDP2
  units as for the DiT.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor, nn

from selfflow_core.builtin.dit import modulate, position_embedding, sincos
from selfflow_core.builtin.mmdit_blocks import (
    DoubleBlock,
    SingleBlock,
    TextBlock,
    layer_norm,
    per_modality,
    rope_angles,
    sequence_rope,
)
from selfflow_core.flow import head_velocity
from selfflow_core.interfaces import Backbone, BackboneConfig
from selfflow_core.interfaces.base import added_field
from selfflow_core.interfaces.text import TextSpec
from selfflow_core.types import BackboneOutput, TokenBatch

#: the paper's ~625M FLUX-style shape (App. A.3)
PAPER = {"width": 1152, "heads": 16, "double_blocks": 7, "single_blocks": 14,
         "axes_dim": (24, 24, 24), "mlp_ratio": 4.0, "qkv_bias": True}


@attrs.frozen(kw_only=True, eq=False)
class Conditioning:
    """The conditioning of one forward: ``rows`` [R, width] for the distinct (sample, time)
    pairs, ``index`` [B, N] each latent token's row, ``text`` [B, width] the text stream's
    vector (the per-sample mean over generated tokens)."""

    rows: Tensor
    index: Tensor
    text: Tensor


# ---- the backbone -----------------------------------------------------------------------------

class MMDiT(Backbone):
    """FLUX-style MMDiT with shared modulation and per-token time (see the module doc).
    ``MMDiT.Config.paper()`` is the paper's ~625M shape."""

    @attrs.frozen(kw_only=True)
    class Config(BackboneConfig):
        """``double_blocks`` + ``single_blocks`` blocks of ``width`` channels and ``heads``
        heads; SwiGLU hidden width ``int(width * mlp_ratio)``; RoPE channels per position axis
        ``axes_dim`` (summing to ``width // heads``) with base ``rope_theta``; ``qkv_bias``:
        biases on q, k, v (the other linears of the blocks have none, as FLUX.2);
        ``block_offsets``: a learned per-block offset on the shared modulation;
        ``text_blocks``: :class:`TextBlock` s over the text tokens alone before the joint
        blocks (0: none, as FLUX; they give a text encoder learned from scratch room to build
        words from bytes; not counted in ``depth``); ``absolute_positions``: add the DiT's
        sinusoidal embedding of each latent token's position to its input, besides RoPE (as
        SD3's MMDiT; FLUX has none, the default)."""

        kind = "mmdit"
        double_blocks: int = attrs.field(default=2, validator=v.ge(0))
        single_blocks: int = attrs.field(default=2, validator=v.ge(1))
        width: int = attrs.field(default=64, validator=v.ge(2))
        heads: int = attrs.field(default=4, validator=v.ge(1))
        mlp_ratio: float = attrs.field(default=4.0, validator=v.gt(0))
        axes_dim: tuple[int, ...] = attrs.field(
            default=(6, 6, 4), converter=tuple,
            validator=v.deep_iterable(v.instance_of(int), v.min_len(1)))
        rope_theta: float = attrs.field(default=10000.0, validator=v.gt(0))
        qkv_bias: bool = True
        block_offsets: bool = False
        text_blocks: int = added_field(default=0, validator=v.ge(0))
        absolute_positions: bool = added_field(default=False)

        @width.validator
        def _check_width(self, attribute, value):
            if value % self.heads:
                raise ValueError(f"'width' must be divisible by heads ({self.heads}): {value}")

        @axes_dim.validator
        def _check_axes(self, attribute, value):
            if any(isinstance(a, bool) or a <= 0 or a % 2 for a in value):
                raise ValueError(f"'axes_dim' must hold positive even ints (RoPE rotates channel "
                                 f"pairs), got {value}")
            head_dim = self.width // self.heads
            if sum(value) != head_dim:
                raise ValueError(
                    f"'axes_dim' must sum to the head dim, width // heads = {self.width} // "
                    f"{self.heads} = {head_dim}; got {value} (sum {sum(value)})")

        @property
        def depth(self) -> int:
            return self.double_blocks + self.single_blocks

        @classmethod
        def paper(cls, **changes) -> MMDiT.Config:
            """The paper's ~625M FLUX-style shape (:data:`PAPER`), with ``changes``."""
            return cls(**{**PAPER, **changes})

        def build(self, *, token_dims: Sequence[int], num_classes: int = 0,
                  text: TextSpec | None = None) -> MMDiT:
            return MMDiT(self, token_dims=token_dims, num_classes=num_classes, text=text)

    def __init__(self, config: Config, *, token_dims: Sequence[int], num_classes: int = 0,
                 text: TextSpec | None = None) -> None:
        super().__init__()
        self.config = config
        self.depth, self.width = config.depth, config.width
        self.token_dims = tuple(int(c) for c in token_dims)
        self.num_classes = num_classes
        self.text_spec = text
        d, hidden = config.width, int(config.width * config.mlp_ratio)
        self.inputs = nn.ModuleList(nn.Linear(c, d) for c in self.token_dims)
        self.modality_embed = nn.Embedding(len(self.token_dims), d)
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(num_classes + 1, d) if num_classes > 0 else None
        self.text_embed = self.text_pos = self.text_in = self.pooled_mlp = None
        if text is not None:
            if text.vocab_size is None and text.dim is None:
                raise ValueError("TextSpec needs 'dim' (embeddings) or 'vocab_size' (ids)")
            if text.vocab_size is not None:
                self.text_embed = nn.Embedding(text.vocab_size, d, padding_idx=0)
                self.text_pos = nn.Parameter(torch.zeros(text.max_length, d))
            if text.dim is not None:
                self.text_in = nn.Linear(text.dim, d)
            if text.pooled_dim > 0:
                self.pooled_mlp = nn.Sequential(nn.Linear(text.pooled_dim, d), nn.SiLU(),
                                                nn.Linear(d, d))
        has_text, double = text is not None, config.double_blocks > 0
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if double else None
        self.txt_mod = (nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
                        if double and has_text else None)
        self.single_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.text_blocks = nn.ModuleList(
            TextBlock(d, config.heads, hidden, config.qkv_bias)
            for _ in range(config.text_blocks if has_text else 0))
        self.double_blocks = nn.ModuleList(
            DoubleBlock(d, config.heads, hidden, qkv_bias=config.qkv_bias, text=has_text,
                        offsets=config.block_offsets) for _ in range(config.double_blocks))
        self.single_blocks = nn.ModuleList(
            SingleBlock(d, config.heads, hidden, qkv_bias=config.qkv_bias,
                        offsets=config.block_offsets) for _ in range(config.single_blocks))
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.outputs = nn.ModuleList(nn.Linear(d, c) for c in self.token_dims)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        embeds = [self.modality_embed, self.label_embed, self.text_embed]
        for emb in (e for e in embeds if e is not None):
            nn.init.normal_(emb.weight, std=0.02)
        if self.text_embed is not None:
            with torch.no_grad():
                self.text_embed.weight[0].zero_()   # the padding id
            nn.init.normal_(self.text_pos, std=0.02)
        mlps = [self.time_mlp] + ([self.pooled_mlp] if self.pooled_mlp is not None else [])
        for mlp in mlps:
            for lin in (mlp[0], mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
        mods = [self.img_mod, self.txt_mod, self.single_mod, self.final_mod]
        zero = [m[-1] for m in mods if m is not None] + list(self.outputs)
        for lin in zero:   # adaLN-Zero: every block starts as the identity, the output as zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    # ---- pieces of the forward ----------------------------------------------------------------

    def conditioning(self, t: Tensor, batch: TokenBatch, dtype: torch.dtype) -> Conditioning:
        """The conditioning vectors of ``t`` [B, N]: per (sample, time) row, and the text
        stream's per-sample mean over generated tokens (weights: each row's share of them)."""
        b = t.shape[0]
        times, time_of = torch.unique(t, return_inverse=True)
        nt = len(times)
        pairs, index = torch.unique(
            torch.arange(b, device=t.device)[:, None] * nt + time_of, return_inverse=True)
        sample = pairs // nt
        rows = self.time_mlp(sincos(times * 1000.0, 256).to(dtype))[pairs % nt]
        if self.label_embed is not None and batch.labels is not None:
            rows = rows + self.label_embed(batch.labels)[sample]
        if batch.text_pooled is not None:
            if self.pooled_mlp is None:
                raise ValueError("the batch has text_pooled but this MMDiT was built without "
                                 "a pooled input (TextSpec.pooled_dim = 0)")
            pooled = batch.text_pooled.to(self.pooled_mlp[0].weight.dtype)
            rows = rows + self.pooled_mlp(pooled).to(rows.dtype)[sample]
        # the text stream's vector: the mean over the sample's generated tokens
        m = batch.target_mask
        m = torch.where(m.any(1, keepdim=True), m, batch.valid)
        m = torch.where(m.any(1, keepdim=True), m, torch.ones_like(m))
        counts = torch.zeros(len(pairs), device=t.device).index_add_(
            0, index.flatten(), m.flatten().float())
        share = counts / m.sum(1).float()[sample]
        text = torch.zeros(b, rows.shape[-1], device=t.device).index_add_(
            0, sample, share[:, None] * rows.float()).to(rows.dtype)
        return Conditioning(rows=rows, index=index, text=text)

    def _text(self, batch: TokenBatch) -> tuple[Tensor | None, Tensor | None]:
        """Text tokens [B, L, width] and their mask [B, L], or (None, None) without a prompt."""
        if batch.text is None and batch.text_ids is None:
            return None, None
        if self.text_spec is None:
            raise ValueError("the batch carries a prompt but this MMDiT was built without a text "
                             "stream (text=None)")
        parts = []
        if batch.text_ids is not None:
            if self.text_embed is None:
                raise ValueError("the batch has text_ids but this MMDiT was built for text "
                                 "embeddings (TextSpec.vocab_size is None)")
            length = batch.text_ids.shape[1]
            if length > self.text_pos.shape[0]:
                raise ValueError(f"text_ids hold {length} tokens, more than the TextSpec's "
                                 f"max_length {self.text_pos.shape[0]}")
            parts.append(self.text_embed(batch.text_ids) + self.text_pos[:length])
        if batch.text is not None:
            if self.text_in is None:
                raise ValueError("the batch has text embeddings but this MMDiT was built for "
                                 "token ids (TextSpec.dim is None)")
            parts.append(self.text_in(batch.text.to(self.text_in.weight.dtype)))
        txt = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        mask = batch.text_mask
        if mask is None:
            mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
        if len(self.text_blocks):
            rope = sequence_rope(txt.shape[1], self.width // self.config.heads,
                                 self.config.rope_theta, txt.device)
            # a prompt with no token (the empty one) attends over all of its padding, so no row
            # of the attention is empty (that would be NaN); the joint blocks mask it out anyway
            keys = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]
            for block in self.text_blocks:
                txt = block(txt, rope, keys)
        return txt, mask

    def _rope(self, positions: Tensor, text_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) [B, 1, L + N, head_dim / 2]: text at 0 on every axis, then the latents."""
        axes = len(self.config.axes_dim)
        pos = positions.float()
        if pos.shape[-1] > axes:
            raise ValueError(f"MMDiT has RoPE over {axes} position axes (axes_dim "
                             f"{self.config.axes_dim}), got positions with {pos.shape[-1]}")
        pos = F.pad(pos, (0, axes - pos.shape[-1]))
        if text_len:
            pos = torch.cat([pos.new_zeros(pos.shape[0], text_len, axes), pos], dim=1)
        # axis a rotates its own axes_dim[a] / 2 channel pairs, frequencies theta^(-2i / dim)
        angles = torch.cat([rope_angles(pos[..., a], dim, self.config.rope_theta)
                            for a, dim in enumerate(self.config.axes_dim)], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]

    def forward(self, x, t, batch: TokenBatch, *, feature_layers=(), stop_after=None):
        b, n, _ = x.shape
        if t.dim() == 1:
            t = t[:, None].expand(b, n)
        ids = batch.modality_ids
        img = per_modality(self.inputs, x, ids, self.width) + self.modality_embed(ids)
        if self.config.absolute_positions:
            img = img + position_embedding(batch.positions, self.width, "MMDiT").to(img.dtype)
        txt, txt_mask = self._text(batch)
        n_txt = 0 if txt is None else txt.shape[1]
        if txt is not None:
            txt = txt.to(img.dtype)
        cond = self.conditioning(t, batch, img.dtype)
        rope = self._rope(batch.positions, n_txt)
        valid = batch.valid
        if txt is not None:
            mask = torch.cat([txt_mask, valid], dim=1)[:, None, None, :]
        else:
            padded = batch.padded if batch.padded is not None else not bool(valid.all())
            mask = valid[:, None, None, :] if padded else None
        wanted = set(feature_layers)
        features: dict[int, Tensor] = {}
        layer = 0
        if len(self.double_blocks):
            img_mod = self.img_mod(cond.rows)[cond.index].unflatten(-1, (6, self.width))
            txt_mod = (None if txt is None else
                       self.txt_mod(cond.text)[:, None].unflatten(-1, (6, self.width)))
            for block in self.double_blocks:
                img, txt = block(img, txt, img_mod, txt_mod, rope, mask)
                layer += 1
                if layer in wanted:
                    features[layer] = img
                if stop_after is not None and layer >= stop_after:
                    return BackboneOutput(velocity=None, features=features)
        mod = self.single_mod(cond.rows)[cond.index]
        h = img
        if txt is not None:
            h = torch.cat([txt, img], dim=1)
            mod = torch.cat([self.single_mod(cond.text)[:, None].expand(b, n_txt, -1), mod], 1)
        mod = mod.unflatten(-1, (3, self.width))
        for block in self.single_blocks:
            h = block(h, mod, rope, mask)
            layer += 1
            if layer in wanted:
                features[layer] = h[:, n_txt:]
            if stop_after is not None and layer >= stop_after:
                return BackboneOutput(velocity=None, features=features)
        sh, sc = self.final_mod(cond.rows)[cond.index].chunk(2, dim=-1)
        head = per_modality(self.outputs, modulate(layer_norm(h[:, n_txt:]), sh, sc), ids,
                             x.shape[-1])
        velocity = head_velocity(self.config, x, t, head, batch)
        return BackboneOutput(velocity=velocity, features=features)
