"""The sample grid of ``selfflow_core.eval.media``: light 2-px lines apart the rows and columns,
and row labels (one per row: the class of a class-conditional image grid) drawn in a left
margin with the built-in bitmap font."""

from __future__ import annotations

import numpy as np
import pytest

from selfflow_core.eval.media import INK, PAD, SEPARATOR, label_mask, tile_images


def dark(b: int, h: int = 20, w: int = 10, c: int = 1) -> np.ndarray:
    """``b`` dark cells (1..b, never the ink 0 nor the separator)."""
    return np.broadcast_to(np.arange(1, b + 1, dtype=np.uint8)[:, None, None, None],
                           (b, h, w, c)).copy()


def test_lines_are_light_and_two_pixels_wide():
    assert PAD == 2 and SEPARATOR >= 200
    grid = tile_images(dark(6), 3)
    assert grid.shape == (2 * (20 + 2) + 2, 3 * (10 + 2) + 2, 1)
    rows, cols = [0, 1, 22, 23, 44, 45], [0, 1, 12, 13, 24, 25, 36, 37]
    assert (grid[rows] == SEPARATOR).all() and (grid[:, cols] == SEPARATOR).all()
    # everything else is the cells, each uniformly its own value
    inside = np.delete(np.delete(grid, rows, axis=0), cols, axis=1)
    assert (inside != SEPARATOR).all()
    assert grid[2, 2, 0] == 1 and grid[24, 26, 0] == 6


def test_label_mask_font():
    one = label_mask(1)
    assert one.shape == (5, 3) and one.dtype == bool
    assert one.astype(int).tolist() == [[0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]]
    ten = label_mask("10", 2)
    assert ten.shape == (10, 14)  # 2 glyphs + a blank column, scaled by 2
    np.testing.assert_array_equal(ten[:, :6], one.repeat(2, 0).repeat(2, 1))
    assert not ten[:, 6:8].any()
    masks = {d: label_mask(d).tobytes() for d in range(10)}
    assert len(set(masks.values())) == 10  # every digit draws differently
    with pytest.raises(ValueError, match="font has no"):
        label_mask("cat")


def test_row_labels_margin_differs_between_classes():
    images = dark(6, h=30, w=12, c=3)
    plain = tile_images(images, 2)
    grid = tile_images(images, 2, row_labels=[0, 4, 17])
    scale = 30 // 10
    strip = 2 * 3 * scale + scale + 2 * scale  # "17": two glyphs and a gap, blank either side
    margin = strip + PAD
    assert grid.shape == (plain.shape[0], plain.shape[1] + margin, 3)
    np.testing.assert_array_equal(grid[:, margin:], plain)  # the cells are where they were
    strips = [grid[PAD + r * 32:PAD + r * 32 + 30, PAD:PAD + strip] for r in range(3)]
    for s, label in zip(strips, ["0", "4", "17"]):
        ink = (s == INK).all(axis=-1)
        assert ((s == INK) | (s == SEPARATOR)).all()  # a light margin with dark characters
        ys, xs = np.nonzero(ink)
        mark = label_mask(label, scale)
        assert ink.sum() == mark.sum()
        # (each of these marks has ink in its first and last rows and columns)
        np.testing.assert_array_equal(ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mark)
        assert (ys.min() + ys.max()) // 2 in (14, 15)  # centred in the row
    assert len({s.tobytes() for s in strips}) == 3
    # the same class draws the same label
    again = tile_images(images[::-1].copy(), 2, row_labels=[17, 4, 0])
    np.testing.assert_array_equal(again[PAD:PAD + 30, PAD:PAD + strip], strips[2])


def test_row_labels_must_match_the_rows():
    with pytest.raises(ValueError, match="2 row labels for 3 row"):
        tile_images(dark(5), 2, row_labels=[0, 1])
