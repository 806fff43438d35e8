"""Captions of moving-digit clips: which digit moves in which direction, and a parser for them.

**Direction.** A digit's direction is the direction of its *initial* velocity, rounded to the
nearest of the 8 compass directions (:data:`DIRECTIONS`, 45 degrees apart; screen coordinates,
so "up" is towards row 0). It is what the clip shows until the digit first reaches an edge;
bounces reverse it afterwards, and the caption still names the initial direction. With the
source's ``motion = "compass"`` (the text-to-video presets) every digit moves along exactly one
of the 8 directions and runs :data:`LEAD_FRAMES` frames before its first bounce; with the
legacy ``"diagonal"`` motion (both velocity components 1-2 px per frame, random signs) the
direction is always one of the 4 diagonals, and a digit may bounce within its first frames.

**Templates.** A caption describes each digit of a clip in turn (the labelled digit first) with
a digit template (:data:`DIGIT_TEMPLATES`: ``a 4 moving to the left``, ``the digit 7 bouncing
up and right``, ``a handwritten three drifting down`` ...) and one of the direction's phrasings
(:data:`PHRASES`); two or more digits are joined with ``and`` / ``while`` (``a 3 moving down
and a 5 moving right``). The ``K`` captions of a sample use distinct digit templates (while
there are enough) and are drawn from ``numpy.random.default_rng([seed, index, 1])``: a pure
function of the clip's ``(seed, index)``, a stream apart from the clip's own.

**Parsing.** :func:`parse_prompt` reads these captions (and prompts written like them) back:
each digit mention (a numeral ``0``-``9`` or a name ``zero``-``nine``) starts a part, and the
direction words after it (up/upward/top, down/downward/bottom, left/leftward, right/rightward)
up to the next digit mention give its direction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

#: the 8 compass directions, counter-clockwise from "right" (45 degrees apart), each with its
#: unit step ``(d_row, d_col)`` in screen coordinates (rows grow downwards)
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (0, 1),
    "up and right": (-1, 1),
    "up": (-1, 0),
    "up and left": (-1, -1),
    "left": (0, -1),
    "down and left": (1, -1),
    "down": (1, 0),
    "down and right": (1, 1),
}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)

#: frames a ``"compass"`` digit moves in its direction before it can first bounce (the
#: evaluator measures motion over the first ``LEAD_FRAMES`` frame steps)
LEAD_FRAMES = 3

#: how a caption may say each direction (the first: the canonical one of evaluation prompts)
PHRASES: dict[str, tuple[str, ...]] = {
    "right": ("right", "to the right", "rightward"),
    "up and right": ("up and right", "up and to the right", "toward the top right"),
    "up": ("up", "upward", "toward the top"),
    "up and left": ("up and left", "up and to the left", "toward the top left"),
    "left": ("left", "to the left", "leftward"),
    "down and left": ("down and left", "down and to the left", "toward the bottom left"),
    "down": ("down", "downward", "toward the bottom"),
    "down and right": ("down and right", "down and to the right", "toward the bottom right"),
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: templates of one digit's part of a caption: ``{d}`` the numeral, ``{n}`` its name, ``{m}``
#: a phrasing of its direction, ``{a}`` the article before the digit ("a", "an" for 8)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "{a} {d} moving {m}",
    "the digit {d} bouncing {m}",
    "a handwritten {n} drifting {m}",
    "the number {n} sliding {m}",
    "digit {d} heading {m}",
    "{a} {n} that moves {m}",
)
#: a digit that does not move (only when it fills the canvas: ``digit_size == size``)
STILL_TEMPLATE = "{a} {d} standing still"
#: how the parts of a clip with several digits are joined
JOINERS: tuple[str, ...] = (" and ", " while ")

#: the seed-sequence stream of the captions (the clip's own draws use ``[seed, index]``)
CAPTION_STREAM = 1


def _article(digit: int) -> str:
    return "an" if int(digit) == 8 else "a"  # "an 8", "an eight"; "a one", "a 1"


def direction_of(velocity: Sequence[float]) -> str | None:
    """The compass direction (a key of :data:`DIRECTIONS`) nearest to the angle of
    ``velocity = (d_row, d_col)``; ``None`` for no motion."""
    vy, vx = float(velocity[0]), float(velocity[1])
    if math.hypot(vy, vx) < 1e-9:
        return None
    k = round(math.degrees(math.atan2(-vy, vx)) / 45.0) % 8
    return DIRECTION_NAMES[k]


def digit_part(digit: int, direction: str, template: int, phrase: int = 0) -> str:
    """One digit's part of a caption: :data:`DIGIT_TEMPLATES` ``[template]`` with the
    direction's phrasing ``phrase``."""
    return DIGIT_TEMPLATES[template].format(a=_article(digit), d=int(digit),
                                            n=DIGIT_NAMES[int(digit)],
                                            m=PHRASES[direction][phrase])


def canonical_prompt(digit: int, direction: str) -> str:
    """The plainest caption of one digit: ``a {digit} moving {direction}``."""
    return digit_part(digit, direction, 0, 0)


def clip_captions(digits: Sequence[tuple[int, str | None]], k: int, seed: int,
                  index: int) -> list[str]:
    """``k`` captions of a clip whose digits (in order) move as ``digits``: ``(class,
    direction)`` pairs. Distinct digit templates per caption while there are enough, random
    phrasings and joiners, all from ``default_rng([seed, index, CAPTION_STREAM])``. A digit
    without motion (``None``) is :data:`STILL_TEMPLATE`."""
    rng = np.random.default_rng([int(seed), int(index), CAPTION_STREAM])
    n_t = len(DIGIT_TEMPLATES)
    orders = [[int(t) for _ in range(-(-k // n_t)) for t in rng.permutation(n_t)]
              for _ in digits]
    out = []
    for j in range(k):
        parts = []
        for (digit, direction), order in zip(digits, orders):
            if direction is None:
                parts.append(STILL_TEMPLATE.format(a=_article(digit), d=int(digit)))
                continue
            phrase = int(rng.integers(len(PHRASES[direction])))
            parts.append(digit_part(digit, direction, order[j], phrase))
        joiner = JOINERS[int(rng.integers(len(JOINERS)))]
        out.append(joiner.join(parts))
    return out


# ---- parsing ----------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+|\d+")
_VERTICAL = {"up": -1, "upward": -1, "upwards": -1, "top": -1,
             "down": 1, "downward": 1, "downwards": 1, "bottom": 1}
_HORIZONTAL = {"left": -1, "leftward": -1, "leftwards": -1,
               "right": 1, "rightward": 1, "rightwards": 1}
_BY_STEP = {step: name for name, step in DIRECTIONS.items()}


def _digit(word: str) -> int | None:
    if len(word) == 1 and word.isdigit():
        return int(word)
    return DIGIT_NAMES.index(word) if word in DIGIT_NAMES else None


def parse_prompt(prompt: str) -> list[tuple[int, str | None]]:
    """The ``(digit, direction)`` of each digit a prompt names, in order (``[]``: none).
    ``direction`` is a key of :data:`DIRECTIONS`, or ``None`` when the words after the digit
    name none (or contradict themselves: up and down)."""
    words = _WORD.findall(str(prompt).lower())
    out: list[tuple[int, str | None]] = []
    vertical: set[int] = set()
    horizontal: set[int] = set()

    def close() -> None:
        if out:
            if len(vertical) > 1 or len(horizontal) > 1 or not (vertical or horizontal):
                direction = None
            else:
                step = (next(iter(vertical), 0), next(iter(horizontal), 0))
                direction = _BY_STEP[step]
            out[-1] = (out[-1][0], direction)

    for word in words:
        digit = _digit(word)
        if digit is not None:
            close()
            out.append((digit, None))
            vertical, horizontal = set(), set()
        elif word in _VERTICAL:
            vertical.add(_VERTICAL[word])
        elif word in _HORIZONTAL:
            horizontal.add(_HORIZONTAL[word])
    close()
    return out
