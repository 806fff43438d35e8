"""Captions of audio-video pairs: what the clip shows, then what is heard.

A pair's caption is a caption of its moving digit (:mod:`selfflow_video.captions`: ``a 4
bouncing to the left``, ``the digit 7 moving up and right`` ...) followed by a spoken part
(:data:`SPOKEN_TEMPLATES`): ``a 4 bouncing to the left, and its name spoken``, ``a 4 moving
left while a voice says "four"``. The ``K`` captions of a pair use distinct spoken templates
(while there are enough), drawn from ``numpy.random.default_rng([seed, index, SPOKEN_STREAM])``:
a pure function of the pair, a stream apart from the clip's and the video captions' own.

:func:`parse_prompt` reads a prompt back as ``(digit, direction, word)``: the text outside
double quotes is read as a video caption (it must name exactly one digit), and the word to hear
is the quoted one, else the digit's name (what "its name" says).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from selfflow_video.captions import DIGIT_NAMES, DIRECTION_NAMES, canonical_prompt
from selfflow_video.captions import parse_prompt as parse_video_prompt

#: how a caption says what is heard (``{n}``: the digit's name); none names a digit or a
#: direction outside quotes, so the video part's parse is unchanged
SPOKEN_TEMPLATES: tuple[str, ...] = (
    ", and its name spoken",
    ", its name said aloud",
    " while its name is spoken",
    ', and a voice saying "{n}"',
    ', with "{n}" spoken',
)
#: the spoken part of the evaluation prompts
CANONICAL_SPOKEN = SPOKEN_TEMPLATES[0]
#: the seed-sequence stream of the spoken parts (the clip uses ``[seed, index]``, the video
#: captions ``[seed, index, 1]``, the video evaluator ``[seed, 2]``)
SPOKEN_STREAM = 3


class Target(NamedTuple):
    """What a prompt asks for: the digit shown, its direction (``None``: not named) and the word
    heard."""

    digit: int
    direction: str | None
    word: str


def spoken_part(digit: int, template: int) -> str:
    return SPOKEN_TEMPLATES[template].format(n=DIGIT_NAMES[int(digit)])


def pair_captions(video_captions: Sequence[str], digit: int, seed: int, index: int) -> list[str]:
    """Each of a clip's video captions with a spoken part naming ``digit`` appended; distinct
    spoken templates while there are enough, from ``default_rng([seed, index, SPOKEN_STREAM])``."""
    rng = np.random.default_rng([int(seed), int(index), SPOKEN_STREAM])
    n = len(SPOKEN_TEMPLATES)
    order = [int(t) for _ in range(-(-len(video_captions) // n)) for t in rng.permutation(n)]
    return [c + spoken_part(digit, t) for c, t in zip(video_captions, order)]


def canonical_pair_prompt(digit: int, direction: str) -> str:
    """``a {digit} moving {direction}, and its name spoken``."""
    return canonical_prompt(digit, direction) + CANONICAL_SPOKEN


def evaluation_prompts(n: int) -> list[str]:
    """``n`` canonical prompts: digit ``i % 10``, direction ``(i // 10) % 8`` (any 80 consecutive
    ones hold every pair once, in the order of the compass source's clips)."""
    return [canonical_pair_prompt(i % 10, DIRECTION_NAMES[(i // 10) % 8]) for i in range(n)]


def video_part(prompt: str) -> str:
    """``prompt`` without its quoted text (what the video evaluator reads)."""
    return " ".join(str(prompt).split('"')[0::2])


def parse_prompt(prompt: str) -> Target | None:
    """The :class:`Target` of a prompt; ``None`` unless its unquoted text names exactly one
    digit."""
    shown = parse_video_prompt(video_part(prompt))
    if len(shown) != 1:
        return None
    digit, direction = shown[0]
    quoted = str(prompt).split('"')
    word = quoted[1].strip().lower() if len(quoted) >= 3 else DIGIT_NAMES[digit]
    return Target(digit, direction, word)
