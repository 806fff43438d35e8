"""Raw video sources: clips ``[B, T, C, H, W]`` float32 in ``[-1, 1]`` (background ``-1``) with
int64 labels. Every clip is a pure function of ``(seed, index)``, so encoding can resume and two
machines encode the same store.

- :class:`MovingDigitsSource`: Moving-MNIST-style clips of sklearn's 8x8 digits bouncing on a
  small canvas (no download, ~1 ms per clip).
- :class:`CartPoleSource`: gymnasium's ``CartPole-v1`` rendered headless (``rgb_array``, SDL's
  dummy video driver), cropped around the cart, grey, inverted and downscaled.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from selfflow_core import Source
from selfflow_core.tokens import CAPTIONS_FIELD, caption_array
from selfflow_video.captions import (
    DIRECTION_NAMES,
    DIRECTIONS,
    LEAD_FRAMES,
    clip_captions,
    direction_of,
)

#: classes of the built-in sources
MOVING_DIGITS_CLASSES = 10
CARTPOLE_CLASSES = 2  # 0: balanced by a controller, 1: random pushes (the pole falls)


def _digits_csv() -> np.ndarray | None:
    """sklearn's ``digits.csv.gz`` read straight from the installed package (the same data as
    ``load_digits()``, without importing scikit-learn, which takes seconds); ``None`` if absent."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            if data.shape == (1797, 65):
                return data
    return None


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """sklearn digits as float32 ``[1797, 8, 8]`` in ``[0, 1]``, labels, and per class the
    indices of its images (read once, read-only)."""
    data = _digits_csv()
    if data is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        data = np.concatenate([d.data, d.target[:, None]], axis=1)
    images = (data[:, :64].reshape(-1, 8, 8) / 16.0).astype(np.float32)
    labels = data[:, 64].astype(np.int64)
    by_class = tuple(np.flatnonzero(labels == k) for k in range(MOVING_DIGITS_CLASSES))
    for a in (images, labels, *by_class):
        a.flags.writeable = False
    return images, labels, by_class


@functools.cache
def _scaled_digits(size: int) -> np.ndarray:
    """All digits resized (bilinear) to ``size x size``, values in ``[0, 1]``."""
    images = _digits()[0]
    if size == images.shape[-1]:
        return images
    x = F.interpolate(torch.from_numpy(images.copy())[:, None], size=(size, size),
                      mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    x.flags.writeable = False
    return x


def _bounce(start: float, velocity: float, frames: int, span: int) -> np.ndarray:
    """Integer positions of a point moving at ``velocity`` and reflecting off ``[0, span]``."""
    if span <= 0:
        return np.zeros(frames, dtype=np.int64)
    p = start + velocity * np.arange(frames)
    p = np.mod(p, 2 * span)
    return np.round(np.where(p > span, 2 * span - p, p)).astype(np.int64)


#: how moving digits move (``VideoModality.Config.motion``)
MOTIONS = ("diagonal", "compass")
#: speed of a ``"compass"`` digit along each axis it moves on, px per frame
COMPASS_SPEED = (1.0, 1.5)


@attrs.frozen
class DigitMotion:
    """How one digit of a clip moves: its class, the index of its sklearn image, its start
    ``(row, col)`` and initial velocity ``(d_row, d_col)`` in px (per frame), and its integer
    top-left corner in every frame (``rows``, ``cols``; bounces included)."""

    digit: int
    image: int
    start: tuple[float, float]
    velocity: tuple[float, float]
    rows: np.ndarray = attrs.field(eq=False, repr=False)
    cols: np.ndarray = attrs.field(eq=False, repr=False)

    @property
    def direction(self) -> str | None:
        """The compass direction of the initial velocity (:func:`~selfflow_video.captions.
        direction_of`); ``None`` when the digit cannot move (it fills the canvas)."""
        if not (np.any(self.rows != self.rows[0]) or np.any(self.cols != self.cols[0])):
            return None
        return direction_of(self.velocity)


def _run_up_start(rng: np.random.Generator, velocity: float, span: int) -> float:
    """A start on ``[0, span]`` from which a point at ``velocity`` moves ``LEAD_FRAMES`` frames
    before it reaches an edge (as far as the span allows)."""
    travel = min(abs(velocity) * LEAD_FRAMES, span)
    if velocity > 0:
        return float(rng.uniform(0.0, span - travel))
    if velocity < 0:
        return float(rng.uniform(travel, span))
    return float(rng.uniform(0.0, span))


class MovingDigitsSource(Source):
    """``count`` clips of ``digits`` sklearn digits (``digit_size`` px) bouncing on a
    ``size x size`` canvas for ``frames`` frames; overlapping digits take the brighter pixel.

    Clip ``i``: label ``i % 10`` (balanced; any 10 consecutive clips hold every class), its first
    digit is an image of that class; the other digits, all images, start positions and velocities
    come from ``numpy.random.default_rng([seed, i])``. ``clip(i, first_class)`` overrides the
    first digit's class.

    ``motion``: ``"diagonal"`` (the default, Moving-MNIST style): 1-2 px per frame on each axis,
    random signs, any start; ``"compass"``: each digit moves along one of the 8 compass
    directions (:data:`~selfflow_video.captions.DIRECTIONS`) at ``COMPASS_SPEED`` px per frame on
    each axis it moves on, from a start that leaves it
    :data:`~selfflow_video.captions.LEAD_FRAMES` frames before its first bounce; the first
    digit's direction is ``(i // 10) % 8``, so any 80 consecutive clips hold every (class,
    direction) pair once. With ``captions`` > 0, :meth:`read` also gives that many captions per
    clip naming each digit and its direction (:mod:`selfflow_video.captions`).
    """

    def __init__(self, *, count: int, size: int = 16, frames: int = 8, channels: int = 1,
                 digits: int = 2, digit_size: int = 8, seed: int = 0, motion: str = "diagonal",
                 captions: int = 0) -> None:
        if digit_size > size:
            raise ValueError(f"moving digits: digit_size {digit_size} > canvas size {size}")
        if motion not in MOTIONS:
            raise ValueError(f"moving digits: motion must be one of {MOTIONS}, got {motion!r}")
        self.count, self.size, self.frames, self.channels = count, size, frames, channels
        self.digits, self.digit_size, self.seed = digits, digit_size, seed
        self.motion, self.captions = motion, captions
        extra = "" if motion == "diagonal" else f", {motion} motion"
        extra += f", {captions} captions each" if captions else ""
        self.description = (f"moving sklearn digits: {count} clips x {frames} frames, {digits} "
                            f"digit(s) of {digit_size}px on {size}x{size}, seed {seed}; "
                            f"label = first digit's class{extra}")

    def __len__(self) -> int:
        return self.count

    def motions(self, index: int, first_class: int | None = None) -> list[DigitMotion]:
        """How each digit of clip ``index`` moves (the first one: the labelled digit)."""
        _, labels, by_class = _digits()
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(index % MOVING_DIGITS_CLASSES if first_class is None else first_class)
        span = self.size - self.digit_size
        out = []
        for d in range(self.digits):
            pool = by_class[label] if d == 0 else np.arange(len(labels))
            image = int(pool[rng.integers(len(pool))])
            if self.motion == "diagonal":  # (the draws of the original source, in its order)
                start = rng.uniform(0, span, size=2)
                velocity = rng.uniform(1.0, 2.0, size=2) * rng.choice([-1.0, 1.0], size=2)
            else:
                k = (int(index) // MOVING_DIGITS_CLASSES) % 8 if d == 0 else int(rng.integers(8))
                step = np.array(DIRECTIONS[DIRECTION_NAMES[k]], dtype=np.float64)
                velocity = step * rng.uniform(*COMPASS_SPEED)
                start = np.array([_run_up_start(rng, float(u), span) for u in velocity])
            out.append(DigitMotion(
                digit=int(labels[image]), image=image,
                start=(float(start[0]), float(start[1])),
                velocity=(float(velocity[0]), float(velocity[1])),
                rows=_bounce(start[0], velocity[0], self.frames, span),
                cols=_bounce(start[1], velocity[1], self.frames, span)))
        return out

    def render(self, motions: list[DigitMotion]) -> np.ndarray:
        """The clip ``[T, C, H, W]`` in ``[-1, 1]`` of digits moving as ``motions``."""
        glyphs = _scaled_digits(self.digit_size)
        canvas = np.zeros((self.frames, self.size, self.size), dtype=np.float32)
        for m in motions:
            glyph = glyphs[m.image]
            for t in range(self.frames):
                win = canvas[t, m.rows[t]:m.rows[t] + self.digit_size,
                             m.cols[t]:m.cols[t] + self.digit_size]
                np.maximum(win, glyph, out=win)
        return np.repeat((canvas * 2.0 - 1.0)[:, None], self.channels, axis=1)

    def clip(self, index: int, first_class: int | None = None) -> tuple[np.ndarray, int]:
        """One clip ``[T, C, H, W]`` in ``[-1, 1]`` and its label."""
        motions = self.motions(index, first_class)
        return self.render(motions), motions[0].digit

    def clip_captions(self, index: int, k: int | None = None) -> list[str]:
        """``k`` (default ``captions``) captions of clip ``index``: each digit and the direction
        it starts moving in (:func:`~selfflow_video.captions.clip_captions`)."""
        motions = self.motions(index)
        return clip_captions([(m.digit, m.direction) for m in motions],
                             self.captions if k is None else k, self.seed, index)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        plans = [self.motions(i) for i in range(start, stop)]
        shape = (0, self.frames, self.channels, self.size, self.size)
        out = {"videos": (np.stack([self.render(p) for p in plans]) if plans
                          else np.zeros(shape, np.float32)),
               "labels": np.array([p[0].digit for p in plans], dtype=np.int64)}
        if self.captions:
            out[CAPTIONS_FIELD] = caption_array(
                [clip_captions([(m.digit, m.direction) for m in p], self.captions, self.seed, i)
                 for i, p in zip(range(start, stop), plans)], self.captions)
        return out


def _import_gymnasium():
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless: no display needed
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    try:
        import gymnasium
        import pygame  # noqa: F401  (gymnasium's classic-control renderer)
    except ImportError as exc:
        raise ImportError(
            f"video source 'cartpole' needs gymnasium with its classic-control renderer "
            f"({exc}); install it with `pip install \"gymnasium[classic-control]\"` "
            f"(it pulls pygame-ce), or use the 'moving_digits' source") from exc
    return gymnasium


class CartPoleSource(Source):
    """``count`` clips of gymnasium's ``CartPole-v1`` rendered headless.

    Clip ``i``: the env is reset with a seed drawn from ``numpy.random.default_rng([seed, i])``
    (the random policy and action noise use ``[seed, i, 1]``), label ``i % 2``: 0 = a balancing
    controller (10 % random actions), 1 = uniformly random pushes, so the pole visibly falls.
    ``frame_skip`` physics steps pass between frames; after termination the physics keeps running
    (the pole may fall over). Each 400x600 RGB frame is
    cropped to the 180x180 square around the track centre, grey, thickened (min filter) so the
    pole survives downscaling, inverted (background ``-1``) and box-downscaled to ``size``.
    """

    CROP = (210, 150, 390, 330)  # left, top, right, bottom of the 600x400 render

    def __init__(self, *, count: int, size: int = 16, frames: int = 8, channels: int = 1,
                 frame_skip: int = 4, seed: int = 0) -> None:
        self.gym = _import_gymnasium()
        self.count, self.size, self.frames, self.channels = count, size, frames, channels
        self.frame_skip, self.seed = frame_skip, seed
        self.description = (f"gymnasium {self.gym.__version__} CartPole-v1 rgb_array: {count} "
                            f"clips x {frames} frames (skip {frame_skip}) -> {size}x{size}, seed "
                            f"{seed}; label 0 = balancing controller, 1 = random pushes")
        self._env = None

    def __len__(self) -> int:
        return self.count

    def _frame(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image, ImageFilter

        im = Image.fromarray(rgb)
        if self.channels == 1:
            im = im.convert("L")
        im = im.crop(self.CROP).filter(ImageFilter.MinFilter(5))
        im = im.resize((self.size, self.size), Image.Resampling.BOX)
        a = np.asarray(im, dtype=np.float32).reshape(self.size, self.size, -1)
        return 1.0 - a.transpose(2, 0, 1) / 127.5  # white background -> -1, black cart -> +1

    def clip(self, index: int) -> tuple[np.ndarray, int]:
        if self._env is None:
            self._env = self.gym.make("CartPole-v1", render_mode="rgb_array").unwrapped
        env = self._env
        label = int(index % CARTPOLE_CLASSES)
        env_seed = int(np.random.default_rng([self.seed, int(index)]).integers(2**31))
        env.reset(seed=env_seed)
        rng = np.random.default_rng([self.seed, int(index), 1])
        out = np.empty((self.frames, self.channels, self.size, self.size), dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() after terminated": intended here
            for t in range(self.frames):
                out[t] = self._frame(env.render())
                for _ in range(self.frame_skip):
                    x, x_dot, theta, theta_dot = env.state
                    if label == 0:
                        action = int(theta + 0.5 * theta_dot + 0.05 * x_dot + 0.02 * x > 0)
                        if rng.random() < 0.1:
                            action = 1 - action
                    else:
                        action = int(rng.integers(2))
                    env.step(action)
        return out, label

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        clips = [self.clip(i) for i in range(start, stop)]
        shape = (0, self.frames, self.channels, self.size, self.size)
        return {"videos": np.stack([c[0] for c in clips]) if clips else np.zeros(shape, np.float32),
                "labels": np.array([c[1] for c in clips], dtype=np.int64)}

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
