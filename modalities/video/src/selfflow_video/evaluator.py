"""A fixed evaluator of text-to-video on moving digits: does a clip show the prompted digit,
moving the prompted way, and the same digit throughout?

Three measures of clips ``[B, T, C, H, W]`` in ``[-1, 1]`` (one digit per clip) against the
prompt each was generated from (parsed by :func:`~selfflow_video.captions.parse_prompt`):

- ``digit_acc``: the fraction of frames (all ``T`` of every clip) that a small fixed
  classifier (:class:`DigitNet`) reads as the prompt's digit.
- ``direction_acc``: the fraction of clips whose motion, measured without any learned model,
  is the prompt's direction: each frame's intensity centroid (ink above the frame's median
  brightness), a least-squares line through the centroids of frames ``0 .. LEAD_FRAMES`` (the
  run-up before a ``"compass"`` digit can first bounce), and its slope rounded to the nearest of
  the 8 compass directions; a slope under :data:`MIN_SPEED` px per frame is no motion (never
  right). Clips whose prompt names no direction are left out of it.
- ``class_flips``: the fraction of consecutive frame pairs whose classified digits differ (0
  for a clip that keeps its digit; prompt-free).

Prompts that do not name exactly one digit are left out of all three (the evaluator reads one
digit per clip); none left: NaN.

**The classifier** is trained once, deterministically from its seed, on single frames the
source's way: every one of sklearn's 1797 digit images, resized to ``digit_size`` like the
source, at ``positions`` random places on a ``size x size`` canvas (its own random stream,
``[seed, 2]``, never the training clips'), with light Gaussian noise and random contrast so it
also reads imperfect frames. The weights are cached with their SHA-256 and the *ceiling*: the
three measures on real clips of the source (``motion = "compass"``, one digit, seed 0) against
their own first captions, against shifted captions (mismatched) and with frames shuffled across
clips.

Cache: ``$SELFFLOW_CACHE``, else ``$XDG_CACHE_HOME/selfflow``, else ``~/.cache/selfflow``, then
``video_digit_classifier/v<version>/<settings hash>/`` holding ``classifier.pt`` (a
``state_dict``) and ``classifier.json`` (settings, SHA-256, accuracies), kept by the core's
:class:`~selfflow_core.EvaluatorCache`. A cached file whose hash differs from its record is an
error (delete the folder to rebuild): scores made with another classifier are not comparable.
Training is deterministic on one machine and thread count; another CPU or torch version may
train other (equally good) weights, which the SHA-256 tells apart.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from selfflow_core import EvaluatorCache, EvaluatorCacheError, settings_key
from selfflow_core import default_cache_dir as default_cache_dir
from selfflow_core import weights_sha256 as weights_sha256
from selfflow_video.captions import (
    DIRECTION_NAMES,
    LEAD_FRAMES,
    canonical_prompt,
    direction_of,
    parse_prompt,
)
from selfflow_video.sources import (
    MOVING_DIGITS_CLASSES,
    MovingDigitsSource,
    _digits,
    _scaled_digits,
)

CACHE_VERSION = 1
#: the least centroid speed (px per frame) that counts as motion
MIN_SPEED = 0.3
#: the random stream of the classifier's training frames (the clips use ``[seed, index]``)
CLASSIFIER_STREAM = 2


class ClassifierCacheError(EvaluatorCacheError):
    """A cached digit classifier whose weights do not match their recorded SHA-256 (or
    settings)."""


#: where classifiers are cached:
#: ``video_digit_classifier/v<version>/<settings hash>/classifier.{pt,json}``
CLASSIFIER_CACHE = EvaluatorCache(kind="video_digit_classifier", version=CACHE_VERSION,
                                  stem="classifier", name="video digit classifier",
                                  error=ClassifierCacheError)


# ---- prompts ----------------------------------------------------------------------------------

def evaluation_prompts(n: int) -> list[str]:
    """``n`` prompts ``a {digit} moving {direction}``: digit ``i % 10`` and direction
    ``(i // 10) % 8`` for prompt ``i``, so any 80 consecutive ones hold every pair once."""
    return [canonical_prompt(i % MOVING_DIGITS_CLASSES,
                             DIRECTION_NAMES[(i // MOVING_DIGITS_CLASSES) % 8]) for i in range(n)]


def prompt_targets(prompts: Sequence[str]) -> list[tuple[int, str | None] | None]:
    """Each prompt's ``(digit, direction)``, ``None`` for a prompt naming no digit or several."""
    parsed = [parse_prompt(p) for p in prompts]
    return [p[0] if len(p) == 1 else None for p in parsed]


# ---- measures without a model -----------------------------------------------------------------

def _grey(videos: Any) -> torch.Tensor:
    """Clips ``[B, T, C, H, W]`` in ``[-1, 1]`` -> grey ``[B, T, H, W]`` in ``[0, 1]``."""
    x = torch.as_tensor(np.asarray(videos) if not isinstance(videos, torch.Tensor) else videos)
    if x.ndim != 5:
        raise ValueError(f"clips must be [B, T, C, H, W], got shape {tuple(x.shape)}")
    return ((x.detach().float().cpu().mean(2) + 1) / 2).clamp(0, 1)


def centroids(videos: Any) -> torch.Tensor:
    """``[B, T, 2]`` ``(row, col)`` intensity centroid of each frame: the mean position weighted
    by the brightness above the frame's median (the background); NaN for a frame without ink."""
    x = _grey(videos)
    b, t, h, w = x.shape
    ink = (x - x.flatten(2).median(-1).values[..., None, None]).clamp_min(0)
    mass = ink.sum((-2, -1))
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    c = torch.stack([(ink * rows).sum((-2, -1)), (ink * cols).sum((-2, -1))], -1)
    out = c / mass.clamp_min(1e-6)[..., None]
    return torch.where((mass > 1e-3)[..., None], out, torch.full_like(out, math.nan))


def motion_velocities(videos: Any, lead: int = LEAD_FRAMES) -> torch.Tensor:
    """``[B, 2]`` ``(d_row, d_col)`` px per frame: the slope of a least-squares line through
    the centroids of frames ``0 .. min(lead, T - 1)`` (NaN with a frame without ink, or a
    single frame)."""
    c = centroids(videos)
    n = min(lead, c.shape[1] - 1) + 1
    if n < 2:
        return torch.full((c.shape[0], 2), math.nan)
    t = torch.arange(n, dtype=torch.float32)
    t = (t - t.mean())[None, :, None]
    seg = c[:, :n]
    return (t * (seg - seg.mean(1, keepdim=True))).sum(1) / (t ** 2).sum()


def motion_directions(videos: Any, lead: int = LEAD_FRAMES) -> list[str | None]:
    """The compass direction of each clip's centroid motion over its first frames
    (:func:`motion_velocities`); ``None``: slower than :data:`MIN_SPEED` or no ink."""
    out = []
    for vy, vx in motion_velocities(videos, lead).tolist():
        speed = math.hypot(vy, vx)
        out.append(direction_of((vy, vx)) if math.isfinite(speed) and speed >= MIN_SPEED
                   else None)
    return out


def class_flips(classes: Any) -> float:
    """The fraction of consecutive frame pairs of clips ``[B, T]`` whose classes differ."""
    c = torch.as_tensor(np.asarray(classes))
    if c.ndim != 2 or c.shape[1] < 2 or c.shape[0] == 0:
        return math.nan
    return float((c[:, 1:] != c[:, :-1]).double().mean())


# ---- the classifier ---------------------------------------------------------------------------

class DigitNet(nn.Module):
    """Frames ``[B, 1, S, S]`` in ``[-1, 1]`` -> 10 logits: three 3x3 conv + batch-norm + ReLU
    stages of ``width``, ``2 width``, ``4 width`` channels (a 2x max-pool after the first two),
    global max- and mean-pooling (so the digit may be anywhere), a linear layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.head = nn.Linear(8 * w, MOVING_DIGITS_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.amax((-2, -1)), h.mean((-2, -1))], -1))


@attrs.frozen(kw_only=True)
class ClassifierConfig:
    """How the classifier is made (all of it is hashed into its cache folder).

    - ``size`` / ``digit_size``: the canvas and digit sides of the clips it reads (the video
      config's ``size`` and ``digit_size``).
    - ``seed``: initialisation, batch order, noise and the training frames (stream
      ``[seed, 2]``).
    - ``positions``: training frames per sklearn digit image (each at a random place).
    - ``steps`` / ``batch`` / ``lr``: AdamW with cosine decay; ``width``: the network's width.
    - ``noise``: the largest std of the Gaussian noise added to training frames (``[-1, 1]``
      units; each frame draws its std uniformly in ``[0, noise]``); the ink is also scaled by a
      factor uniform in ``[0.6, 1]``.
    - ``eval_clips``: real clips the ceiling is measured on (``frames`` frames each).
    """

    size: int = attrs.field(default=16, validator=v.ge(4))
    digit_size: int = attrs.field(default=10, validator=v.ge(2))
    seed: int = 1
    positions: int = attrs.field(default=6, validator=v.ge(1))
    steps: int = attrs.field(default=1200, validator=v.ge(1))
    batch: int = attrs.field(default=128, validator=v.ge(1))
    lr: float = attrs.field(default=3e-3, validator=v.gt(0))
    width: int = attrs.field(default=12, validator=v.ge(1))
    noise: float = attrs.field(default=0.2, validator=v.ge(0))
    eval_clips: int = attrs.field(default=400, validator=v.ge(2))
    frames: int = attrs.field(default=8, validator=v.ge(2))

    def __attrs_post_init__(self) -> None:
        if self.digit_size > self.size:
            raise ValueError(f"classifier digit_size {self.digit_size} > size {self.size}")

    def settings(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, **attrs.asdict(self)}

    def key(self) -> str:
        return settings_key(self.settings())


def training_frames(config: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's training frames ``[N, 1, S, S]`` in ``[-1, 1]`` (every digit image at
    ``positions`` random places, rendered like the source) and their classes."""
    _, labels, _ = _digits()
    glyphs = _scaled_digits(config.digit_size)
    rng = np.random.default_rng([config.seed, CLASSIFIER_STREAM])
    span = config.size - config.digit_size
    n = len(glyphs) * config.positions
    images = np.repeat(np.arange(len(glyphs)), config.positions)
    where = rng.integers(0, span + 1, size=(n, 2))
    canvas = np.zeros((n, config.size, config.size), dtype=np.float32)
    for i, (g, (r, c)) in enumerate(zip(images, where)):
        canvas[i, r:r + config.digit_size, c:c + config.digit_size] = glyphs[g]
    x = torch.from_numpy(canvas * 2 - 1)[:, None]
    return x, torch.from_numpy(labels[images].astype(np.int64))


class DigitClassifier:
    """A trained :class:`DigitNet` and its record (``info``)."""

    def __init__(self, config: ClassifierConfig, net: DigitNet, info: dict[str, Any]) -> None:
        self.config, self.net, self.info = config, net.eval(), info

    @torch.no_grad()
    def classify(self, videos: Any, batch: int = 1024) -> torch.Tensor:
        """The digit in each frame of clips ``[B, T, C, H, W]`` in ``[-1, 1]``: int64
        ``[B, T]``."""
        x = _grey(videos) * 2 - 1
        b, t, h, w = x.shape
        if (h, w) != (self.config.size, self.config.size):
            raise ValueError(f"the classifier reads {self.config.size}x{self.config.size} "
                             f"frames, got {h}x{w}")
        frames = x.reshape(b * t, 1, h, w)
        out = [self.net(frames[i:i + batch]).argmax(-1) for i in range(0, len(frames), batch)]
        return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).reshape(b, t)

    def scores(self, videos: Any, prompts: Sequence[str]) -> dict[str, float]:
        """``digit_acc``, ``direction_acc`` and ``class_flips`` of clips against prompts (see
        the module doc)."""
        return clip_scores(videos, prompts, self)


def clip_scores(videos: Any, prompts: Sequence[str],
                classifier: DigitClassifier | None = None) -> dict[str, float]:
    """The three measures (module doc) of clips ``[B, T, C, H, W]`` against one prompt each;
    ``classifier``: default :func:`default_classifier` at the clips' frame size (and digit size
    10)."""
    x = torch.as_tensor(np.asarray(videos) if not isinstance(videos, torch.Tensor) else videos)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} clips")
    targets = prompt_targets(prompts)
    keep = [i for i, t in enumerate(targets) if t is not None]
    nan = {"digit_acc": math.nan, "direction_acc": math.nan, "class_flips": math.nan}
    if not keep:
        return nan
    x = x[keep]
    targets = [targets[i] for i in keep]
    if classifier is None:
        classifier = default_classifier(size=int(x.shape[-1]))
    classes = classifier.classify(x)
    digits = torch.tensor([d for d, _ in targets])
    directed = [i for i, (_, d) in enumerate(targets) if d is not None]
    found = motion_directions(x[directed]) if directed else []
    right = [f == targets[i][1] for i, f in zip(directed, found)]
    return {"digit_acc": float((classes == digits[:, None]).double().mean()),
            "direction_acc": float(np.mean(right)) if right else math.nan,
            "class_flips": class_flips(classes)}


def real_clips(count: int, size: int, digit_size: int, frames: int = 8, seed: int = 0
               ) -> tuple[np.ndarray, list[str]]:
    """``count`` real one-digit clips of the ``"compass"`` source and their first captions."""
    src = MovingDigitsSource(count=count, size=size, frames=frames, digits=1,
                             digit_size=digit_size, seed=seed, motion="compass", captions=1)
    raw = src.read(0, count)
    return raw["videos"], [c[0] for c in raw["captions"]]


def evaluate_ceiling(classifier: DigitClassifier, count: int) -> dict[str, dict[str, float]]:
    """The measures on ``count`` real clips (seed 0) against their own captions (``real``),
    against the captions of clip ``i + 11`` (``mismatched``: another digit and
    direction), and with every frame taken from a random
    other clip (``shuffled``, their own captions)."""
    c = classifier.config
    videos, prompts = real_clips(count, c.size, c.digit_size, c.frames)
    g = np.random.default_rng(12345)
    b, t = videos.shape[:2]
    shuffled = videos[g.integers(0, b, size=(b, t)), np.arange(t)[None, :]]
    return {"real": clip_scores(videos, prompts, classifier),
            "mismatched": clip_scores(videos, prompts[11:] + prompts[:11], classifier),
            "shuffled": clip_scores(shuffled, prompts, classifier)}


def train_classifier(config: ClassifierConfig = ClassifierConfig()) -> DigitClassifier:
    """Train a classifier from scratch (deterministic given the seed, on one machine and thread
    count); ``info`` holds its settings, training accuracy and time, and the ceiling."""
    start = time.monotonic()
    x, y = training_frames(config)
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the initial weights
    net = DigitNet(config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    net.train()
    for _ in range(config.steps):
        idx = torch.randint(0, len(x), (config.batch,), generator=g)
        gain = 0.6 + 0.4 * torch.rand((config.batch, 1, 1, 1), generator=g)
        std = torch.rand((config.batch, 1, 1, 1), generator=g) * config.noise
        xb = (x[idx] + 1) * gain - 1 + std * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    classifier = DigitClassifier(config, net, {})
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 2048]).argmax(-1) for i in range(0, len(x), 2048)])
    classifier.info = {"settings": config.settings(),
                       "train_acc": float((pred == y).float().mean()),
                       "final_loss": float(loss.detach()),
                       "train_seconds": round(time.monotonic() - start, 1),
                       "architecture": "DigitNet", "torch": torch.__version__}
    classifier.info["ceiling"] = evaluate_ceiling(classifier, config.eval_clips)
    return classifier


def load_classifier(config: ClassifierConfig = ClassifierConfig(),
                    cache_dir: str | Path | None = None, *,
                    progress: bool = True) -> DigitClassifier:
    """The classifier of ``config`` from the cache, trained and cached first if it is not there.
    Its weights' SHA-256 is checked against the record (:class:`ClassifierCacheError` if it
    differs)."""
    return CLASSIFIER_CACHE.load_or_train(
        config.settings(), cache_dir=cache_dir, progress=progress,
        train=lambda: train_classifier(config), empty=lambda: DigitNet(config.width),
        wrap=lambda net, info: DigitClassifier(config, net, info))


@functools.cache
def default_classifier(size: int = 16, digit_size: int = 10) -> DigitClassifier:
    """The default classifier (:class:`ClassifierConfig` defaults at ``size`` / ``digit_size``,
    the default cache), loaded once per size."""
    return load_classifier(ClassifierConfig(size=size, digit_size=digit_size))
