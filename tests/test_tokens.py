"""The adapter authors' helpers (selfflow_core.tokens) and the media helpers
(selfflow_core.eval.media): exact round trips and hand-checked layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selfflow_core.tokens as tokens
from selfflow_core import FieldSpec
from selfflow_core.eval.media import SEPARATOR, tile_images, to_uint8, upscale
from selfflow_core.tokens import (
    chunk,
    class_labels,
    expand_batch,
    grid_positions,
    grid_shape,
    latent_fields,
    pack,
    patchify,
    split,
    unpatchify,
)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def patched_shapes(draw):
    """A per-sample shape of 1-4 axes and a patch for its last 1..ndim axes that divides it."""
    ndim = draw(st.integers(1, 4))
    grid = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    cell = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    cut = draw(st.integers(1, ndim))  # axes before the last `cut` are taken whole
    shape = tuple(g * p for g, p in zip(grid, cell))
    return shape, tuple(cell[ndim - cut:])


# ---- patches -----------------------------------------------------------------------------------

@PROPERTY
@given(patched_shapes(), st.integers(1, 3))
def test_unpatchify_inverts_patchify(case, batch):
    shape, patch = case
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    tokens = patchify(x, patch)
    full = shape[:len(shape) - len(patch)] + patch
    assert tokens.shape == (batch, math.prod(grid_shape(shape, patch)), math.prod(full))
    assert math.prod(grid_shape(shape, patch)) * math.prod(full) == math.prod(shape)
    assert torch.equal(unpatchify(tokens, patch, shape), x)
    # and the other way round: every token layout is reached
    assert torch.equal(patchify(unpatchify(tokens, patch, shape), patch), tokens)


@pytest.mark.parametrize(("shape", "patch"), [
    ((2, 4, 6), (2, 3)),           # image [C, H, W]: channels whole
    ((4, 3, 4, 4), (2, 3, 2, 2)),  # video [T, C, H, W]: tubes over time and channels
    ((8, 5), (2, 5)),              # audio [T, D]: consecutive frames
    ((6,), (3,)),
])
def test_patchify_layout_is_row_major(shape, patch):
    x = torch.arange(2 * math.prod(shape), dtype=torch.float32).reshape(2, *shape)
    tokens = patchify(x, patch)
    full = shape[:len(shape) - len(patch)] + patch
    grid = grid_shape(shape, patch)
    for n, cell in enumerate(np.ndindex(*grid)):
        index = tuple(slice(g * p, (g + 1) * p) for g, p in zip(cell, full))
        assert torch.equal(tokens[:, n], x[(slice(None), *index)].reshape(2, -1)), cell


def test_patchify_matches_the_image_formula():
    b, c, h, w, p = 3, 2, 6, 4, 2
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))
    want = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    assert torch.equal(patchify(x, (p, p)), want)


def test_patchify_rejects_a_patch_that_does_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 5, 4), (2, 2))
    with pytest.raises(ValueError, match="more axes"):
        patchify(torch.zeros(1, 4), (2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        unpatchify(torch.zeros(1, 4, 4), (3,), (8,))


# ---- positions ---------------------------------------------------------------------------------

def test_grid_positions_hand_computed():
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_positions(3).tolist() == [[0], [1], [2]]
    pos = grid_positions(2, 1, 2)
    assert pos.dtype == torch.float32 and pos.shape == (4, 3)
    assert pos.tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]
    with pytest.raises(ValueError):
        grid_positions()


@PROPERTY
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_grid_positions_follow_patchify_order(sizes):
    # token n of patchify (patch 1 everywhere) sits at grid_positions()[n]
    x = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in sizes],
                                   indexing="ij"))
    tokens = patchify(x[None], (1,) * len(sizes))  # [1, N, P]: each token holds its index
    assert torch.equal(tokens[0], grid_positions(*sizes))


def test_expand_batch():
    pos = grid_positions(2, 2)
    out = expand_batch(pos, 3)
    assert out.shape == (3, 4, 2) and out.is_contiguous()
    assert all(torch.equal(out[i], pos) for i in range(3))
    out[0, 0, 0] = 7  # a real copy, not a view of ``pos``
    assert pos[0, 0] == 0 and out[1, 0, 0] == 0


# ---- labels and fields -------------------------------------------------------------------------

def test_class_labels():
    labels = torch.tensor([[1], [2]], dtype=torch.int32)
    out = class_labels({"labels": labels}, 10)
    assert out.dtype == torch.long and out.tolist() == [1, 2]
    assert class_labels({"labels": labels}, 0) is None  # unconditional
    assert class_labels({"latents": labels}, 10) is None
    assert class_labels({"labels": None}, 10) is None
    assert class_labels(None, 10) is None
    assert class_labels({"y": labels}, 3, key="y").tolist() == [1, 2]


def test_latent_fields():
    assert latent_fields((1, 8, 8)) == {"latents": FieldSpec(shape=(1, 8, 8), dtype="float32"),
                                        "labels": FieldSpec(shape=(), dtype="int64")}
    assert latent_fields([4], labels=False, name="x") == {"x": FieldSpec(shape=(4,),
                                                                         dtype="float32")}


# ---- mixed widths ------------------------------------------------------------------------------

def test_chunk():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10)
    tokens, widths = chunk(x, 4)
    assert tokens.shape == (1, 3, 4) and widths == [4, 4, 2]
    assert tokens[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    whole, w = chunk(x, 10)
    assert whole.shape == (1, 1, 10) and w == [10]
    with pytest.raises(ValueError):
        chunk(x, 0)


def test_pack_hand_computed():
    a = torch.ones(2, 2, 3)       # 2 tokens of 3 channels
    b = torch.full((2, 1, 1), 5.)  # 1 token of 1 channel
    p = pack([a, b])
    assert p.tokens.shape == (2, 3, 3) and p.layout == ((2, 3), (1, 1))
    assert p.tokens[0].tolist() == [[1, 1, 1], [1, 1, 1], [5, 0, 0]]
    assert p.channel_valid[1].int().tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert p.modality_ids.tolist() == [[0, 0, 1], [0, 0, 1]]
    assert pack([a, b], first_id=3).modality_ids[0].tolist() == [3, 3, 4]
    wide = pack([a, b], width=5)
    assert wide.tokens.shape == (2, 3, 5) and not wide.channel_valid[..., 3:].any()
    # a chunked vector: the last chunk's padding is not valid
    tokens, widths = chunk(torch.arange(5.)[None], 2)
    p = pack([tokens, torch.ones(1, 1, 3)], real_widths=[widths, None])
    assert p.channel_valid[0].int().tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="real_widths"):
        pack([a], real_widths=[[3]])
    with pytest.raises(ValueError, match="width"):
        pack([a], width=2)


@PROPERTY
@given(st.integers(1, 3), st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), min_size=1,
                                   max_size=4), st.integers(0, 3))
def test_pack_split_round_trip(batch, layout, extra):
    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(batch, n, c, generator=g) for n, c in layout]
    width = max(c for _, c in layout) + extra
    p = pack(groups, width=width)
    n_total = sum(n for n, _ in layout)
    assert p.tokens.shape == (batch, n_total, width) and p.layout == tuple(layout)
    assert p.channel_valid.shape == p.tokens.shape and p.channel_valid.dtype == torch.bool
    assert p.modality_ids.shape == (batch, n_total) and p.modality_ids.dtype == torch.long
    assert bool((p.tokens[~p.channel_valid] == 0).all())  # padding is zero
    # channel_valid marks exactly C_g channels of each token of group g, ids name the group
    start = 0
    for i, (n, c) in enumerate(layout):
        assert (p.channel_valid[:, start:start + n].sum(-1) == c).all()
        assert (p.modality_ids[:, start:start + n] == i).all()
        start += n
    back = split(p.tokens, p.layout)
    assert len(back) == len(groups)
    assert all(torch.equal(x, y) and x.is_contiguous() for x, y in zip(back, groups))
    # anything in the padding is dropped by split
    noisy = torch.where(p.channel_valid, p.tokens, torch.full_like(p.tokens, 9.0))
    assert all(torch.equal(x, y) for x, y in zip(split(noisy, p.layout), groups))


def test_split_checks_the_length():
    with pytest.raises(ValueError, match="layout"):
        split(torch.zeros(1, 4, 2), [(2, 2), (1, 1)])


# ---- media -------------------------------------------------------------------------------------

def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)  # [B, C, H, W]
    assert to_uint8(x).tolist() == [[[[0], [0], [128], [255], [255]]]]
    clips = torch.zeros(2, 4, 3, 5, 6)  # [B, T, C, H, W] -> [B, T, H, W, C]
    out = to_uint8(clips.numpy())
    assert out.shape == (2, 4, 5, 6, 3) and out.dtype == np.uint8
    rgb = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)])[None]
    assert to_uint8(rgb)[0, 0, 0].tolist() == [0, 128, 255]


def test_upscale():
    img = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
    big = upscale(img, 8)
    assert big.shape == (1, 8, 8, 1)
    assert big[0, :, :, 0].tolist()[0] == [0] * 4 + [1] * 4
    assert upscale(img, 3) is img  # factor 1
    assert upscale(np.zeros((2, 3, 4, 5, 1)), 10).shape == (2, 3, 8, 10, 1)  # clips


@PROPERTY
@given(st.integers(0, 7), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2))
def test_tile_images_places_every_image(b, nrow, h, w, pad):
    images = (np.arange(b * h * w * 2).reshape(b, h, w, 2) % 200 + 1).astype(np.uint8)
    grid = tile_images(images, nrow, pad=pad, pad_value=0)
    ncol = max(1, min(nrow, b))
    rows = max(1, math.ceil(b / ncol))
    assert grid.shape == (rows * (h + pad) + pad, ncol * (w + pad) + pad, 2)
    assert grid.dtype == np.uint8
    for i in range(b):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        np.testing.assert_array_equal(grid[y:y + h, x:x + w], images[i])
    # everything else is the separator (images hold no zeros)
    assert (grid == 0).sum() == grid.size - images.size


def test_tile_images_hand_computed():
    imgs = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
    grid = tile_images(imgs, 3)  # 2-px lines by default
    assert grid.shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2, 1)
    np.testing.assert_array_equal(grid[2:4, 2:5], imgs[0])
    np.testing.assert_array_equal(grid[6:8, 7:10], imgs[4])
    assert grid[0, 0, 0] == SEPARATOR and grid[7, 14, 0] == SEPARATOR  # a line, the empty cell
    np.testing.assert_array_equal(tile_images(imgs, 3, pad=1)[1:3, 1:4], imgs[0])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        tile_images(imgs[..., 0], 3)


class Tiles(tokens.PatchAdapter):
    """A 2-channel 4x4 latent in 2x2 patches on a 2x2 grid, 3 classes."""

    name = "tiles"
    latent_shape, patch, grid = (2, 4, 4), (2, 2), (2, 2)
    num_classes = 3

    def open_source(self, source):
        raise NotImplementedError

    def encode(self, raw):
        raise NotImplementedError

    def save_samples(self, latents, labels, out_dir):
        return []


def test_patch_adapter_tokenizes_labels_and_inverts():
    a = Tiles()
    x = torch.randn(5, 2, 4, 4)
    batch = a.tokenize({"latents": x, "labels": torch.tensor([0, 1, 2, 0, 1])})
    assert batch.tokens.shape == (5, a.num_tokens, a.token_dim) == (5, 4, 8)
    assert torch.equal(batch.tokens, tokens.patchify(x, (2, 2)))
    assert torch.equal(a.detokenize(batch.tokens), x)
    assert torch.equal(batch.positions[0], tokens.grid_positions(2, 2))
    assert batch.labels.tolist() == [0, 1, 2, 0, 1] and not batch.condition.any()
    assert set(a.fields()) == {"latents", "labels"} and a.fields()["latents"].shape == (2, 4, 4)
    prompt = a.prompt(3, {"labels": torch.tensor([2, 2, 1])})
    assert prompt.tokens.shape == (3, 4, 8) and prompt.labels.tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="tiles: latents of shape"):
        a.tokenize({"latents": torch.randn(1, 2, 4, 2)})
