"""A fixed evaluator of text-to-video with two digits per clip: are both prompted digits shown,
does each move the way the prompt says, and is it the right one that moves that way?

**Segmentation** (no learned model, :func:`segment_frame`). A frame's ink is its brightness
above the frame's median; pixels over :data:`INK` are split into 8-connected components and
specks under :func:`min_pixels` dropped. Ink that fits in one ``(digit_size + 1)``-px square is
one digit (the other is missing, or hidden exactly behind it). Otherwise a 2-means on the ink's
pixel coordinates (weighted by ink, started from the two farthest ink pixels) splits it: a
component that fits in a digit's square goes whole to its nearer mean, a larger one (two
digits touching) pixel by pixel. Where the split runs along more than :func:`max_contact` ink
pixels, or the means are under ``MIN_GAP x digit_size`` apart, the digits *overlap*: the frame
is skipped (``None``) and counted in ``overlap_frames``.

**Tracking** (:func:`track`): two tracks start at the first frame showing two digits and run
forward and backward from it; each frame's digits go to the tracks whose predicted positions
(constant velocity from the track's last two sightings) they are nearest to (the better of the
two pairings). A frame with one digit feeds the nearer track, unless both tracks are predicted
within ``digit_size`` of each other: then it is the two digits overlapping, skipped and counted.

**Per track**: its digit is the majority class of its sightings, each segmented digit cut out
(its pixels only), centred on a ``crop_size(digit_size)`` square and read by the one-digit
evaluator's classifier (:class:`~selfflow_video.evaluator.DigitNet`, trained on one digit at a
random place on such a square); its direction is the least-squares slope of its centroids over
its sightings in frames ``0 .. LEAD_FRAMES`` (where the digits overlapped there, the first
sightings after, if the digit cannot have bounced yet: :func:`track_direction`), rounded to a
compass direction; unmeasured or under ``MIN_SPEED`` px per frame: wrong.

**Measures** (:func:`two_digit_scores`) of clips against prompts naming exactly two digits
(others are left out; none left: NaN):

- ``digit_acc``: the fraction of prompted digits shown, i.e. matched one-to-one by a track's
  digit (``a 3 ... and a 5 ...`` against tracks read 3 and 3: one of two).
- ``direction_acc``: the fraction of prompted directions some track (one-to-one) moves in,
  whichever digit it is.
- ``binding_acc``: the fraction of clips where the digit found moving in each prompted
  direction is the digit the prompt says moves that way (both parts; only prompts with two
  distinct digits and two distinct directions). Clips whose digits move in each other's
  directions score 0 here and full marks on the two above.
- ``class_flips``: the fraction of a track's consecutive sightings whose digit differs.
- ``overlap_frames``: the fraction of frames skipped because the digits overlap.

**Ceiling** (:func:`two_digit_ceiling`): on 400 real clips of the source (32x32, 10-px digits,
seed 0) against their own captions, with the default classifier: ``digit_acc`` 0.95,
``direction_acc`` 0.85, ``binding_acc`` 0.80, ``class_flips`` 0.02, ``overlap_frames`` 0.25
(seed 3: 0.95, 0.82, 0.76, 0.03, 0.28). The source places the two digits independently, so in
some clips they overlap through the first frames and a direction goes unmeasured: that, not
the classifier, is most of the gap to 1. The same clips with the digits moving in each other's
directions: 0.94, 0.85, binding 0; with the second digit not drawn: 0.50, 0.50, binding 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
from scipy import ndimage

from selfflow_video import evaluator as ev
from selfflow_video.captions import (
    DIRECTION_NAMES,
    LEAD_FRAMES,
    canonical_prompt,
    direction_of,
    parse_prompt,
)
from selfflow_video.sources import (
    COMPASS_SPEED,
    MOVING_DIGITS_CLASSES,
    DigitMotion,
    MovingDigitsSource,
)

#: the ink level (above the frame's median, grey in ``[0, 1]``) of a digit's pixels
INK = 0.25
#: the least distance between the two digits' means, in digit sides, that still separates them
MIN_GAP = 0.6
#: the most ink pixels, in digit sides, along the line between two digits that still separates
#: them (touching digits; more: they overlap)
MAX_CONTACT = 0.5
#: the random stream of the second digit of :func:`two_digit_prompts`
PROMPT_STREAM = 3
_EIGHT = np.ones((3, 3), dtype=bool)


def crop_size(digit_size: int) -> int:
    """The side of the square a segmented digit is centred on for the classifier."""
    return max(16, int(digit_size) + 6)


def max_contact(digit_size: int) -> int:
    """Two digits whose split runs along more ink pixels than this overlap."""
    return int(MAX_CONTACT * digit_size)


def min_pixels(digit_size: int) -> int:
    """Components of fewer ink pixels are specks, not digits."""
    return max(3, int(digit_size) ** 2 // 20)


# ---- prompts ----------------------------------------------------------------------------------

def two_digit_prompts(n: int) -> list[str]:
    """``n`` prompts ``a {d1} moving {dir1} and a {d2} moving {dir2}``: the first part digit
    ``i % 10`` and direction ``(i // 10) % 8`` (every pair once in any 80, like the one-digit
    prompts); the second a different digit and a different direction drawn from
    ``default_rng([PROMPT_STREAM, i])``, so the pairs of pairs are sampled, not the training
    clips' (each run's store holds few of the 5760 combinations)."""
    out = []
    for i in range(n):
        d1, k1 = i % MOVING_DIGITS_CLASSES, (i // MOVING_DIGITS_CLASSES) % 8
        rng = np.random.default_rng([PROMPT_STREAM, i])
        d2 = (d1 + 1 + int(rng.integers(MOVING_DIGITS_CLASSES - 1))) % MOVING_DIGITS_CLASSES
        k2 = (k1 + 1 + int(rng.integers(7))) % 8
        out.append(f"{canonical_prompt(d1, DIRECTION_NAMES[k1])} and "
                   f"{canonical_prompt(d2, DIRECTION_NAMES[k2])}")
    return out


# ---- segmentation -----------------------------------------------------------------------------

@attrs.frozen
class Segment:
    """One digit found in a frame: its ink-weighted ``(row, col)`` centroid, the blank pixels
    between its ink and the frame's top, left, bottom and right edges (``margins``) and its
    pixels cut out and centred on a square (``crop``, ``[S, S]`` ink in ``[0, 1]``)."""

    centroid: tuple[float, float]
    margins: tuple[int, int, int, int]
    crop: np.ndarray = attrs.field(eq=False, repr=False)


def _fits(mask: np.ndarray, side: int) -> bool:
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() < side and cols.max() - cols.min() < side


def _segment(ink: np.ndarray, core: np.ndarray, other: np.ndarray, side: int) -> Segment:
    """The segment of ``core`` pixels: with its faint rim (ink within one pixel, not the other
    digit's), cut out and centred on a ``side`` square."""
    region = ndimage.binary_dilation(core, _EIGHT) & ~other & (ink > 0)
    rows, cols = np.nonzero(region)
    w = ink[rows, cols]
    centroid = (float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum()))
    rr, cc = np.nonzero(core)
    shift_r = side // 2 - (rr.min() + rr.max() + 1) // 2
    shift_c = side // 2 - (cc.min() + cc.max() + 1) // 2
    crop = np.zeros((side, side), dtype=np.float32)
    r, c = rows + shift_r, cols + shift_c
    keep = (r >= 0) & (r < side) & (c >= 0) & (c < side)
    crop[r[keep], c[keep]] = np.clip(w[keep], 0, 1)
    h, wd = core.shape
    margins = (int(rr.min()), int(cc.min()), int(h - 1 - rr.max()), int(wd - 1 - cc.max()))
    return Segment(centroid, margins, crop)


def segment_frame(frame: Any, digit_size: int, crop: int | None = None
                  ) -> list[Segment] | None:
    """The digits (0, 1 or 2) of one grey frame ``[H, W]`` in ``[0, 1]`` (module doc);
    ``None`` where two digits overlap too much to be told apart."""
    x = np.asarray(frame, dtype=np.float32)
    side = crop_size(digit_size) if crop is None else int(crop)
    ink = np.clip(x - np.median(x), 0, None)
    labels, n = ndimage.label(ink > INK, _EIGHT)
    comps = [(k, m) for k, m in ((k, labels == k) for k in range(1, n + 1))
             if m.sum() >= min_pixels(digit_size)]
    if not comps:
        return []
    strong = np.logical_or.reduce([m for _, m in comps])
    none = np.zeros_like(strong)
    if _fits(strong, digit_size + 1):
        return [_segment(ink, strong, none, side)]
    rows, cols = np.nonzero(strong)
    pts = np.stack([rows, cols], 1).astype(np.float64)
    w = ink[rows, cols].astype(np.float64)
    first = pts[np.argmax(((pts - (w[:, None] * pts).sum(0) / w.sum()) ** 2).sum(1))]
    means = np.stack([first, pts[np.argmax(((pts - first) ** 2).sum(1))]])
    whole = [k for k, m in comps if _fits(m, digit_size + 1)]
    index = labels[rows, cols]
    for _ in range(10):
        near = np.argmin(((pts[:, None] - means[None]) ** 2).sum(-1), 1)
        for k in whole:  # a component that fits a digit goes to one side, by most of its ink
            own = index == k
            near[own] = int((w[own] * near[own]).sum() * 2 > w[own].sum())
        if near.min() == near.max():
            return [_segment(ink, strong, none, side)]
        new = np.stack([(w[near == j, None] * pts[near == j]).sum(0) / w[near == j].sum()
                        for j in (0, 1)])
        if np.allclose(new, means):
            break
        means = new
    masks = [np.zeros_like(strong) for _ in (0, 1)]
    for j in (0, 1):
        masks[j][rows[near == j], cols[near == j]] = True
    contact = int((ndimage.binary_dilation(masks[0], _EIGHT) & masks[1]).sum())
    if contact > max_contact(digit_size) or math.dist(*means) < MIN_GAP * digit_size:
        return None
    return [_segment(ink, masks[j], masks[1 - j], side) for j in (0, 1)]


# ---- tracking ---------------------------------------------------------------------------------

def _predict(seen: list[tuple[int, Segment]], t: int) -> np.ndarray:
    (t1, s1) = seen[-1]
    p1 = np.array(s1.centroid)
    if len(seen) < 2:
        return p1
    t0, s0 = seen[-2]
    return p1 + (p1 - np.array(s0.centroid)) / (t1 - t0) * (t - t1)


@attrs.frozen
class Tracks:
    """A clip's digits: each one's sightings ``{frame: Segment}`` (two tracks if some frame
    shows two digits, one if only single digits are seen, none without ink) and the frames
    skipped because the digits overlap (``overlaps``)."""

    sightings: tuple[dict[int, Segment], ...]
    overlaps: tuple[int, ...]


def track(frames: Sequence[list[Segment] | None], digit_size: int) -> Tracks:
    """Follow the digits of a clip's segmented frames (:func:`segment_frame`; module doc). A
    frame with one digit where both tracks are predicted within ``digit_size`` of each other
    is the two digits overlapping: skipped like the frames segmentation gave up on."""
    overlaps = {t for t, f in enumerate(frames) if f is None}
    counts = [len(f) if f is not None else 0 for f in frames]
    if not any(counts):
        return Tracks((), tuple(sorted(overlaps)))
    anchor = counts.index(max(counts))
    start = sorted(frames[anchor], key=lambda s: (s.centroid[1], s.centroid[0]))
    tracks: list[list[tuple[int, Segment]]] = [[(anchor, s)] for s in start]
    for order in (range(anchor + 1, len(frames)), range(anchor - 1, -1, -1)):
        seen = [list(tr) for tr in tracks]
        for t in order:
            found = frames[t]
            if not found:
                continue
            pred = [_predict(s, t) for s in seen]
            cost = np.array([[math.dist(p, s.centroid) for s in found] for p in pred])
            if len(found) == 2:
                swap = cost[0, 1] + cost[1, 0] < cost[0, 0] + cost[1, 1]
                for j in (0, 1):
                    seen[j].append((t, found[j ^ int(swap)]))
            elif len(seen) == 2 and math.dist(*pred) < digit_size:
                overlaps.add(t)
            else:
                seen[int(np.argmin(cost[:, 0]))].append((t, found[0]))
        for tr, s in zip(tracks, seen):
            tr += s[1:]
    return Tracks(tuple(dict(sorted(tr, key=lambda ts: ts[0])) for tr in tracks),
                  tuple(sorted(overlaps)))


def track_direction(sightings: dict[int, Segment], digit_size: int, lead: int = LEAD_FRAMES,
                    min_speed: float = ev.MIN_SPEED) -> str | None:
    """The compass direction of a track's centroids over frames ``0 .. lead`` (a least-squares
    slope through two sightings at least); ``None``: unmeasured or slower than ``min_speed``.

    With fewer than two sightings there (the digits overlapped), the first sightings after
    ``lead`` make up two. A digit may have bounced after ``lead``, and then moves away from the
    edge it bounced off; so the direction is kept only if the last of them shows the digit
    over :func:`bounce_reach` px from the edges behind its motion (both edges of an axis it
    does not move along)."""
    ts = [t for t in sorted(sightings) if t <= lead]
    ts += [t for t in sorted(sightings) if t > lead][:max(0, 2 - len(ts))]
    if len(ts) < 2:
        return None
    tt = np.array(ts, dtype=np.float64)
    c = np.array([sightings[i].centroid for i in ts])
    tc = tt - tt.mean()
    slope = (tc[:, None] * (c - c.mean(0))).sum(0) / (tc ** 2).sum()
    if ts[-1] > lead:
        top, left, bottom, right = sightings[ts[-1]].margins
        behind = [(top, bottom)[int(slope[0] < 0)] if abs(slope[0]) >= min_speed
                  else min(top, bottom),
                  (left, right)[int(slope[1] < 0)] if abs(slope[1]) >= min_speed
                  else min(left, right)]
        if min(behind) <= bounce_reach(digit_size, ts[-1] - lead):
            return None
    return direction_of(slope) if math.hypot(*slope) >= min_speed else None


def bounce_reach(digit_size: int, frames: int) -> int:
    """How far (px) a digit's ink can be from an edge it bounced off at most ``frames`` frames
    ago: that many steps (``COMPASS_SPEED``) beyond the widest blank margin of a digit image in
    its box (sklearn's digits leave up to 0.4 of the side blank)."""
    return math.ceil(max(COMPASS_SPEED) * frames) + math.ceil(0.4 * digit_size)


# ---- scores -----------------------------------------------------------------------------------

def _matched(want: Sequence[Any], found: Sequence[Any]) -> int:
    """How many of ``want`` ``found`` holds, one to one (a multiset intersection)."""
    return sum((Counter(want) & Counter(found)).values())


def two_digit_scores(videos: Any, prompts: Sequence[str], classifier: Any = None,
                     digit_size: int = 10) -> dict[str, float]:
    """The five measures (module doc) of clips ``[B, T, C, H, W]`` in ``[-1, 1]`` with
    ``digit_size``-px digits against one prompt each; ``classifier``: a
    :class:`~selfflow_video.evaluator.DigitClassifier` reading ``crop_size(digit_size)``
    squares (default: :func:`~selfflow_video.evaluator.default_classifier` of that size)."""
    x = ev._grey(videos)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} clips")
    keep = [i for i, p in enumerate(prompts) if len(parse_prompt(p)) == 2]
    names = ("digit_acc", "direction_acc", "binding_acc", "class_flips", "overlap_frames")
    if not keep:
        return dict.fromkeys(names, math.nan)
    side = crop_size(digit_size)
    if classifier is None:
        classifier = ev.default_classifier(side, digit_size)
    clips = [[segment_frame(f, digit_size, side) for f in x[i].numpy()] for i in keep]
    tracks = [track(frames, digit_size) for frames in clips]
    crops = [s.crop for tr in tracks for sightings in tr.sightings for s in sightings.values()]
    if crops:
        batch = np.stack(crops)[:, None, None] * 2 - 1
        read = iter(classifier.classify(batch)[:, 0].tolist())
    digits = directions = bound = flips = pairs = 0
    n_dir = n_bound = 0
    for i, tr in zip(keep, tracks):
        want = parse_prompt(prompts[i])
        classes = [[next(read) for _ in s] for s in tr.sightings]
        found = [(Counter(c).most_common(1)[0][0], track_direction(s, digit_size))
                 for c, s in zip(classes, tr.sightings)]
        flips += sum(a != b for c in classes for a, b in zip(c, c[1:]))
        pairs += sum(max(len(c) - 1, 0) for c in classes)
        digits += _matched([d for d, _ in want], [d for d, _ in found])
        aims = [a for _, a in want if a is not None]
        n_dir += len(aims)
        directions += _matched(aims, [a for _, a in found if a is not None])
        if len({d for d, _ in want}) == 2 and len(set(aims)) == 2:
            n_bound += 1
            bound += len(found) == 2 and any(found[j] == want[0] and found[1 - j] == want[1]
                                             for j in (0, 1))
    skipped = sum(len(tr.overlaps) for tr in tracks)
    return {"digit_acc": digits / (2 * len(keep)),
            "direction_acc": directions / n_dir if n_dir else math.nan,
            "binding_acc": bound / n_bound if n_bound else math.nan,
            "class_flips": flips / pairs if pairs else math.nan,
            "overlap_frames": skipped / sum(len(frames) for frames in clips)}


# ---- real clips and the ceiling ---------------------------------------------------------------

VARIANTS = ("real", "swapped", "one_missing")


def two_digit_clips(count: int, size: int = 32, digit_size: int = 10, frames: int = 8,
                    seed: int = 0, variant: str = "real") -> tuple[np.ndarray, list[str]]:
    """``count`` two-digit ``"compass"`` clips of the source and their first captions:
    ``"real"`` as rendered; ``"swapped"``: each digit moves the way the other one does (the
    captions then bind every digit to the other's direction); ``"one_missing"``: the second
    digit is not drawn."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    src = MovingDigitsSource(count=count, size=size, frames=frames, digits=2,
                             digit_size=digit_size, seed=seed, motion="compass", captions=1)
    videos, captions = [], []
    for i in range(count):
        a, b = src.motions(i)
        if variant == "swapped":
            a, b = (attrs.evolve(b, digit=a.digit, image=a.image),
                    attrs.evolve(a, digit=b.digit, image=b.image))
        shown: list[DigitMotion] = [a] if variant == "one_missing" else [a, b]
        videos.append(src.render(shown))
        captions.append(src.clip_captions(i, 1)[0])
    return np.stack(videos), captions


def two_digit_ceiling(classifier: Any, count: int = 400, size: int = 32, digit_size: int = 10,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """The measures on ``count`` clips of each variant of :func:`two_digit_clips` against the
    real clips' own first captions."""
    return {v: two_digit_scores(*two_digit_clips(count, size, digit_size, seed=seed, variant=v),
                                classifier, digit_size) for v in VARIANTS}
