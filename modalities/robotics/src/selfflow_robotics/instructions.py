"""Instructions naming an episode's target, and a parser reading them back.

**Captions.** ``{verb} {description}``: a verb phrase (:data:`VERBS`: ``reach``, ``move the arm
to``, ...) and a description of the target (:data:`DESCRIPTIONS`) that names it

- by its look and its region: ``the bright round target at the top left``, ``the dim target on
  the right``, ``the square marker at the bottom``;
- by its look alone: ``the dim square target``, ``the bright marker``, ``the round one``;
- by its region alone: ``the target in the centre``, ``the marker at the top right``.

Every description names the target and not the distractor (:mod:`selfflow_robotics.scene`: the
two differ in look and in region). The ``K`` captions of a sample use distinct descriptions
(while there are enough) and random verbs, from ``default_rng([reset_seed, CAPTION_STREAM,
timestep])``: a pure function of the episode and the step.

**Evaluation instructions** (:func:`instruction`) use the verb ``reach`` and the first
description of a naming: ``reach the bright round target at the top left``, ``reach the bright
round target``, ``reach the target at the top left``.

**Parsing.** :func:`parse_instruction` reads the look (``bright``/``dim``, ``round``/``square``
and a few synonyms) and the region (``top``/``bottom``, ``left``/``right``, ``centre``) an
instruction names; :func:`named_marker` is the marker of a scene it names alone.
"""

from __future__ import annotations

import re

import numpy as np

from selfflow_robotics.scene import REGION_NAMES, Scene

#: the words of each look: (brightness, shape)
LOOK_WORDS: tuple[tuple[str, str], ...] = (("bright", "round"), ("dim", "square"))
#: how a description places the target in its region
WHERE: dict[str, str] = {"top left": "at the top left", "top": "at the top",
                         "top right": "at the top right", "left": "on the left",
                         "centre": "in the centre", "right": "on the right",
                         "bottom left": "at the bottom left", "bottom": "at the bottom",
                         "bottom right": "at the bottom right"}
VERBS: tuple[str, ...] = ("reach", "move the arm to", "touch", "go to", "point at")
#: how an instruction names the target (the evaluation cycles through them)
NAMINGS: tuple[str, ...] = ("both", "look", "region")
#: descriptions of each naming: ``{b}`` brightness, ``{s}`` shape, ``{w}`` a :data:`WHERE`
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "both": ("the {b} {s} target {w}", "the {b} target {w}", "the {s} marker {w}"),
    "look": ("the {b} {s} target", "the {b} marker", "the {s} one"),
    "region": ("the target {w}", "the marker {w}"),
}
TEMPLATES: tuple[tuple[str, str], ...] = tuple((n, d) for n in NAMINGS for d in DESCRIPTIONS[n])
#: the seed-sequence stream of the captions
CAPTION_STREAM = 4
#: recorded in the store's encoder settings: a change of the wording changes the store's hash
CAPTIONS_VERSION = 1


def describe(scene: Scene, template: str, verb: str = "reach") -> str:
    """``{verb} {template}`` filled with the target's look and region."""
    b, s = LOOK_WORDS[scene.target_look]
    return f"{verb} " + template.format(b=b, s=s, w=WHERE[REGION_NAMES[scene.region(0)]])


def instruction(scene: Scene, naming: str = "both") -> str:
    """The evaluation instruction of ``scene`` naming its target by ``naming`` (a
    :data:`NAMINGS`)."""
    return describe(scene, DESCRIPTIONS[naming][0])


def captions(scene: Scene, k: int, reset_seed: int, timestep: int) -> list[str]:
    """``k`` captions of step ``timestep`` of the episode of ``scene`` (see the module doc)."""
    rng = np.random.default_rng([int(reset_seed), CAPTION_STREAM, int(timestep)])
    n = len(TEMPLATES)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-k // n))])
    return [describe(scene, TEMPLATES[int(i)][1], VERBS[int(rng.integers(len(VERBS)))])
            for i in order[:k]]


# ---- parsing ----------------------------------------------------------------------------------

_LOOK = {"bright": 0, "brighter": 0, "light": 0, "round": 0, "circle": 0, "circular": 0,
         "disc": 0, "dim": 1, "dimmer": 1, "dark": 1, "faint": 1, "square": 1, "box": 1}
_ROW = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL = {"left": 0, "right": 2}
_MIDDLE = {"centre", "center", "middle"}


def parse_instruction(text: str) -> tuple[int | None, int | None] | None:
    """``(look, region)`` an instruction names, each ``None`` when it names none; ``None`` when
    it contradicts itself (both looks, two rows or two columns). A row word alone is the middle
    column's cell (``top``), a column word alone the middle row's (``left``)."""
    words = re.findall(r"[a-z]+", str(text).lower())
    looks = {_LOOK[w] for w in words if w in _LOOK}
    rows = {_ROW[w] for w in words if w in _ROW}
    cols = {_COL[w] for w in words if w in _COL}
    if len(looks) > 1 or len(rows) > 1 or len(cols) > 1:
        return None
    if rows or cols:
        region = 3 * next(iter(rows), 1) + next(iter(cols), 1)
    else:
        region = 4 if _MIDDLE & set(words) else None
    return next(iter(looks), None), region


def named_marker(scene: Scene, text: str) -> int | None:
    """The marker of ``scene`` (0: the target, 1: the distractor) that ``text`` names alone;
    ``None`` when it names neither or both."""
    parsed = parse_instruction(text)
    if parsed is None or parsed == (None, None):
        return None
    look, region = parsed
    fits = [m for m in (0, 1) if (look is None or scene.look(m) == look)
            and (region is None or scene.region(m) == region)]
    return fits[0] if len(fits) == 1 else None
