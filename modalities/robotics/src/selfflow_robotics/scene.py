"""Scenes for instruction following: the simulator's target, a distractor marker beside it, and
the 3x3 grid of regions an instruction can name.

Reacher-v5 has one target: a non-colliding site whose position only enters the observation and
the reward. A second target would need another MuJoCo model (the task's XML), and would change
nothing physical either, so the simulator is used as it is and the **distractor lives only in the
frames and the instructions**: :func:`~selfflow_robotics.render.render_scene` draws it beside the
real target, each marker with one of two looks, and success is always measured against the
simulator's own target.

- **Regions.** The view square ``[-EXTENT, EXTENT]^2`` of :mod:`selfflow_robotics.render` cut
  into 3x3 equal cells, row 0 at the top: :data:`REGION_NAMES` (``top left``, ``top``, ...,
  ``centre``, ..., ``bottom right``), index ``3 * row + col``.
- **Looks.** Look 0 is bright and round, look 1 dim and square
  (:data:`~selfflow_robotics.render.MARKER_LEVELS`, ``MARKER_SHAPES``). The target gets look 0 or
  1 by a fair coin and the distractor the other, so appearance alone never tells which is real.
- **The distractor** is drawn uniformly over the disc of radius 0.2 m (where Reacher draws its
  targets) until it lies in another region than the target and at least ``separation`` metres
  from it. So an instruction naming the target by its look, its region or both names it alone.
- **Determinism.** A scene is a pure function of the episode's reset seed (and its target, which
  that seed fixes): ``numpy.random.default_rng([reset_seed, SCENE_STREAM])``.
"""

from __future__ import annotations

import attrs
import numpy as np

from selfflow_robotics.render import EXTENT

REGION_NAMES: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                                 "bottom left", "bottom", "bottom right")
#: Reacher draws its targets uniformly in the disc of this radius (metres)
TARGET_DISC = 0.2
#: the default least distance between the target and the distractor (metres)
SEPARATION = 0.1
#: the seed-sequence stream of a scene's draws (its captions use another)
SCENE_STREAM = 3
SCENE_VERSION = 1
_TRIES = 10_000


def region_of(points: np.ndarray) -> np.ndarray:
    """The region index (``3 * row + col``) of points [..., 2] (metres) -> [...] int64; points
    outside the view count in the nearest cell."""
    p = np.asarray(points, np.float64)
    third = 2 * EXTENT / 3
    col = np.clip(np.floor((p[..., 0] + EXTENT) / third), 0, 2)
    row = np.clip(np.floor((EXTENT - p[..., 1]) / third), 0, 2)
    return (3 * row + col).astype(np.int64)


@attrs.frozen(kw_only=True)
class Scene:
    """One episode's markers: the simulator's ``target`` and the ``distractor`` (metres), and
    the target's look (0 or 1; the distractor has the other). Marker 0 is the target, 1 the
    distractor."""

    target: tuple[float, float]
    distractor: tuple[float, float]
    target_look: int

    def position(self, marker: int) -> np.ndarray:
        return np.array(self.distractor if marker else self.target, np.float64)

    def look(self, marker: int) -> int:
        return 1 - self.target_look if marker else self.target_look

    def region(self, marker: int) -> int:
        return int(region_of(self.position(marker)))


def make_scene(reset_seed: int, target, *, separation: float = SEPARATION) -> Scene:
    """The scene of the episode reset with ``reset_seed``, whose target is ``target`` (see the
    module doc)."""
    rng = np.random.default_rng([int(reset_seed), SCENE_STREAM])
    look = int(rng.integers(2))
    t = np.asarray(target, np.float64)
    for _ in range(_TRIES):
        d = rng.uniform(-TARGET_DISC, TARGET_DISC, 2)
        if (np.hypot(*d) < TARGET_DISC and region_of(d) != region_of(t)
                and np.hypot(*(d - t)) >= separation):
            return Scene(target=(float(t[0]), float(t[1])), distractor=(float(d[0]), float(d[1])),
                         target_look=look)
    raise ValueError(f"no distractor {separation} m from the target {t.tolist()} in another "
                     f"region")


def scene_arrays(scenes) -> tuple[np.ndarray, np.ndarray]:
    """``(distractors [n, 2], target looks [n])`` of a list of scenes (for rendering)."""
    return (np.array([s.distractor for s in scenes], np.float64).reshape(-1, 2),
            np.array([s.target_look for s in scenes], np.int64))


def fingertip(states: np.ndarray) -> np.ndarray:
    """The fingertip [n, 2] of Reacher observations [n, 10]: target (dims 4-5) + (tip - target)
    (dims 8-9)."""
    s = np.atleast_2d(np.asarray(states, np.float64))
    return s[:, 4:6] + s[:, 8:10]


def nearer_target(final_states: np.ndarray, distractors: np.ndarray) -> np.ndarray:
    """Per episode [n] bool: whether the fingertip of Reacher observations [n, 10] is nearer the
    simulator's target than the distractor [n, 2]."""
    s = np.atleast_2d(np.asarray(final_states, np.float64))
    return (np.linalg.norm(s[:, 8:10], axis=-1)
            < np.linalg.norm(fingertip(s) - np.asarray(distractors, np.float64), axis=-1))
