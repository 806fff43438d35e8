"""Small top-down frames of the Reacher arm, drawn with numpy from the simulator state.

No MuJoCo or OpenGL rendering: a frame is a pure function of the 10-D observation, so it is
deterministic, fast (vectorised over any batch of states) and the same on every machine.

What a frame shows (``size x size`` pixels, one channel, values in ``[-1, 1]``, ``-1`` the
background):

- **View.** The square ``[-EXTENT, EXTENT]^2`` metres around the arm's base (``EXTENT = 0.22``:
  the arm reaches 0.21 m, targets lie within 0.2 m), seen from above: row 0 is the top
  (``y = +EXTENT``), column 0 the left (``x = -EXTENT``); pixel ``(i, j)`` is sampled at its
  centre ``x = -E + (j + 0.5)·2E/size``, ``y = E - (i + 0.5)·2E/size``.
- **The arm** (intensity 1): its two links, base -> elbow -> fingertip (0.1 m and 0.11 m, joint
  angles from the observation's ``cos q, sin q``), drawn as lines with the smooth profile
  ``(1 - (d / r)^2)^2`` for a pixel centre at distance ``d < r`` from the nearer link, ``r =
  LINK_RADIUS`` pixels (1.2: about 1.3 px wide at half height).
- **The target** (intensity ``TARGET_LEVEL`` = 0.6): a blob of the same profile with ``r =
  TARGET_RADIUS`` pixels (1.6) around the target position (observation dims 4-5).
- The two layers combine by ``max`` and map to ``2·v - 1``.

The profile is C1-smooth and exactly 0 beyond ``r`` (pixels far from the arm and the target are
exactly background), so small motions change pixels smoothly and only near what moved.
"""

from __future__ import annotations

import numpy as np

#: half the side of the view in metres
EXTENT = 0.22
#: the links' and the target's profile radii, in pixels
LINK_RADIUS = 1.2
TARGET_RADIUS = 1.6
#: the target's peak intensity (the arm's is 1)
TARGET_LEVEL = 0.6
#: the link lengths of gymnasium's Reacher (metres)
LINKS = (0.1, 0.11)
#: recorded in a store's encoder settings: a change of the drawing changes the store's hash
RENDER_VERSION = 1


def render_settings(size: int) -> dict[str, float | int]:
    """What :func:`render_reacher` draws with, for a store's schema."""
    return {"version": RENDER_VERSION, "size": int(size), "extent": EXTENT,
            "link_radius_px": LINK_RADIUS, "target_radius_px": TARGET_RADIUS,
            "target_level": TARGET_LEVEL, "links": list(LINKS)}


def _profile(d: np.ndarray, r: float) -> np.ndarray:
    return np.square(np.clip(1.0 - np.square(d / r), 0.0, None))


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points ``p`` [1, P, 2] to segments ``a -> b`` ([n, 1, 2] each) -> [n, P]."""
    ab = b - a
    u = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + u[..., None] * ab), axis=-1)


def arm_points(states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elbow, fingertip and target positions [n, 2] (metres) of Reacher observations [n, 10]."""
    s = np.atleast_2d(np.asarray(states, np.float64))
    q = np.arctan2(s[:, 2:4], s[:, 0:2])
    l1, l2 = LINKS
    elbow = l1 * np.stack([np.cos(q[:, 0]), np.sin(q[:, 0])], -1)
    tip = elbow + l2 * np.stack([np.cos(q[:, 0] + q[:, 1]), np.sin(q[:, 0] + q[:, 1])], -1)
    return elbow, tip, s[:, 4:6]


def _grid(size: int) -> tuple[np.ndarray, float]:
    """The pixel centres [1, P, 2] (metres, row-major, row 0 at the top) and the pixel side."""
    px = 2 * EXTENT / size
    centres = -EXTENT + (np.arange(size) + 0.5) * px
    x, y = np.meshgrid(centres, centres[::-1])  # row 0 at the top (+y)
    return np.stack([x.ravel(), y.ravel()], -1)[None], px


def _arm_layer(s: np.ndarray, grid: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """The arm's intensity [n, P] in ``[0, 1]`` and the target positions [n, 2]."""
    elbow, tip, target = arm_points(s)
    base = np.zeros_like(elbow)
    d_arm = np.minimum(_segment_distance(grid, base[:, None], elbow[:, None]),
                       _segment_distance(grid, elbow[:, None], tip[:, None]))
    return _profile(d_arm / px, LINK_RADIUS), target


def render_reacher(states: np.ndarray, size: int = 16) -> np.ndarray:
    """Frames [..., size, size] float32 in ``[-1, 1]`` of Reacher observations [..., 10] (see
    the module doc)."""
    states = np.asarray(states, np.float64)
    lead = states.shape[:-1]
    s = states.reshape(-1, states.shape[-1])
    grid, px = _grid(size)
    arm, target = _arm_layer(s, grid, px)
    d_target = np.linalg.norm(grid - target[:, None], axis=-1)
    v = np.maximum(arm, TARGET_LEVEL * _profile(d_target / px, TARGET_RADIUS))
    return (2 * v - 1).reshape(*lead, size, size).astype(np.float32)


# ---- scenes with a distractor (the instruction-following kind) ----------------------------------

#: the two looks of a scene's markers (:func:`render_scene`): look 0 is bright and round, look 1
#: dim and square (its profile over the larger of the two coordinate offsets)
MARKER_LEVELS = (0.8, 0.4)
MARKER_SHAPES = ("round", "square")
#: recorded in the instruction-following kind's encoder settings
SCENE_RENDER_VERSION = 1


def scene_render_settings(size: int) -> dict[str, object]:
    """What :func:`render_scene` draws with, for a store's schema."""
    return {**render_settings(size), "scene_version": SCENE_RENDER_VERSION,
            "marker_levels": list(MARKER_LEVELS), "marker_shapes": list(MARKER_SHAPES),
            "marker_radius_px": TARGET_RADIUS}


def _marker_layer(grid: np.ndarray, points: np.ndarray, looks: np.ndarray,
                  px: float) -> np.ndarray:
    off = np.abs(grid - points[:, None]) / px  # [n, P, 2]
    d = np.where(looks[:, None] == 0, np.linalg.norm(off, axis=-1), off.max(-1))
    return np.asarray(MARKER_LEVELS)[looks][:, None] * _profile(d, TARGET_RADIUS)


def render_scene(states: np.ndarray, distractors: np.ndarray, target_looks: np.ndarray,
                 size: int = 16) -> np.ndarray:
    """Frames [..., size, size] float32 in ``[-1, 1]`` of Reacher observations [..., 10] with a
    second marker: the arm as :func:`render_reacher` draws it, the simulator's target (dims 4-5)
    with look ``target_looks`` [...] (0 or 1) and a distractor at ``distractors`` [..., 2]
    (metres) with the other look (:data:`MARKER_LEVELS`, :data:`MARKER_SHAPES`, radius
    ``TARGET_RADIUS`` px). ``distractors`` and ``target_looks`` broadcast against the states'
    leading axes (one per episode for ``[E, T, 10]`` states: ``[E, 1, 2]`` and ``[E, 1]``)."""
    states = np.asarray(states, np.float64)
    lead = states.shape[:-1]
    s = states.reshape(-1, states.shape[-1])
    far = np.broadcast_to(np.asarray(distractors, np.float64), (*lead, 2)).reshape(-1, 2)
    looks = np.broadcast_to(np.asarray(target_looks, np.int64), lead).reshape(-1)
    if not np.isin(looks, (0, 1)).all():
        raise ValueError(f"render_scene: target looks must be 0 or 1, got {np.unique(looks)}")
    grid, px = _grid(size)
    arm, target = _arm_layer(s, grid, px)
    v = np.maximum(arm, np.maximum(_marker_layer(grid, target, looks, px),
                                   _marker_layer(grid, far, 1 - looks, px)))
    return (2 * v - 1).reshape(*lead, size, size).astype(np.float32)


def pixel_of(points: np.ndarray, size: int) -> np.ndarray:
    """(row, col) [n, 2] of the pixels holding points [n, 2] (metres), for tests and plots."""
    p = np.atleast_2d(np.asarray(points, np.float64))
    px = 2 * EXTENT / size
    col = np.floor((p[:, 0] + EXTENT) / px)
    row = np.floor((EXTENT - p[:, 1]) / px)
    return np.stack([row, col], -1).astype(np.int64)
