"""Built-in prompt data for text to speech: short words spoken by espeak-ng, with captions.

Nothing is downloaded. Each clip is one word of :data:`VOCABULARY` (30 words: the ten digits'
names and twenty other short words) spoken by espeak-ng with two voice attributes that
captions name:

- **pitch** ``"low"`` or ``"high"``: a low voice is one of :data:`LOW_VOICES` (espeak-ng's male
  variants) at espeak pitch :data:`LOW_PITCHES` (F0 about 65-90 Hz); a high voice one of
  :data:`HIGH_VOICES` (its female variants) at :data:`HIGH_PITCHES` (F0 about 200-300 Hz), an
  octave and more apart.
- **speed** ``"slow"`` or ``"fast"``: :data:`SLOW_SPEEDS` or :data:`FAST_SPEEDS` words per
  minute (a word lasts about 0.55-0.8 s slowly, 0.2-0.35 s fast).

Everything is a pure function of ``(seed, stream, index)``: the voice, the exact speed and
pitch within the attribute's range, and the captions are drawn from
:func:`sample_rng`. WAVs are made and cached like the spoken digits'
(:func:`~selfflow_audio.sources.synthesise`), under
``<cache>/spoken_words/<version>/<rate>/<voice>_s<speed>_p<pitch>_<word>.wav``.

**Held out: combinations, not words.** Rendering a word never heard is out of reach at CPU
scale, so every word is trained on, but each word's one (pitch, speed) combination of the four
(:func:`heldout_combination`: word ``i`` holds out combination ``i % 4``) is never spoken by
the training source ``spoken_words``: every word is heard in three combinations and every
combination with 22-23 words. ``spoken_words_heldout`` speaks only the held-out
``(word, pitch, speed)`` triples (another random stream), and the evaluation prompts ask for
them: the model must compose a word with attributes it never heard together.

Captions come from :data:`TEMPLATES` (``the word "cat"``, ``a high voice saying "dog"``,
``"seven" said slowly by a low voice``, ...), ``K`` distinct templates per clip; a template
naming an attribute names the clip's true one. :func:`parse_prompt` reads a prompt back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from selfflow_audio.features import read_wav, resample
from selfflow_audio.sources import default_cache_dir, espeak_binary, fit_clip, synthesise
from selfflow_core import Source
from selfflow_core.tokens import CAPTIONS_FIELD, caption_array

#: the spoken words: the digits' names (labels 0..9, as ``spoken_digits``), then 20 others
VOCABULARY: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off",
    "cat", "dog", "bird", "fish", "red", "blue", "green", "hello", "water", "apple")

PITCHES = ("low", "high")
SPEEDS = ("slow", "fast")
#: the four (pitch, speed) combinations, in the order :func:`heldout_combination` counts
COMBINATIONS: tuple[tuple[str, str], ...] = tuple((p, s) for p in PITCHES for s in SPEEDS)

#: espeak-ng voices of a low voice (male variants) and of a high voice (female variants)
LOW_VOICES = ("en-us", "en-gb-x-rp", "en-us+m3", "en+klatt", "en+m7", "en-029")
HIGH_VOICES = ("en+f2", "en+f4", "en-029+f3", "en+f1", "en+f3", "en+f5")
#: espeak-ng pitch (``-p``, 0..99) ranges, inclusive, of a low and a high voice
LOW_PITCHES = (5, 30)
HIGH_PITCHES = (70, 95)
#: espeak-ng speed (``-s``, words per minute) ranges, inclusive, of slow and fast speech
SLOW_SPEEDS = (100, 130)
FAST_SPEEDS = (220, 280)

#: random streams of :func:`sample_rng` (one per use, so no two uses share a clip's draw)
STREAMS = {"train": 0, "heldout": 1, "evaluator": 2, "all": 3}
SPLITS = ("train", "heldout", "all")
CACHE_VERSION = "v1"

#: caption templates: ``{w}`` the word, ``{p}`` the pitch (low/high), ``{s}`` the speed as an
#: adverb (slowly/quickly), ``{a}`` as an adjective (slow/fast)
TEMPLATES: tuple[str, ...] = (
    'the word "{w}"',
    'someone saying "{w}"',
    'a recording of "{w}"',
    'a {p} voice saying "{w}"',
    'the word "{w}" in a {p} voice',
    '"{w}" said {s}',
    'someone saying "{w}" {s}',
    '"{w}" said {s} by a {p} voice',
    'a {p} voice saying "{w}" {s}',
    'a {a} "{w}" in a {p} voice',
)
ADVERBS = {"slow": "slowly", "fast": "quickly"}
#: the templates naming both attributes (the evaluation prompts use them)
FULL_TEMPLATES = tuple(t for t in TEMPLATES if "{p}" in t and ("{s}" in t or "{a}" in t))

#: words of a prompt (outside its quotes) that name an attribute
PITCH_WORDS = {"low": "low", "deep": "low", "high": "high"}
SPEED_WORDS = {"slow": "slow", "slowly": "slow", "fast": "fast", "quickly": "fast",
               "quick": "fast"}


class Clip(NamedTuple):
    """What clip of a :class:`SpokenWordsSource` says, and how."""

    word: str
    pitch: str  # "low" / "high"
    speed: str  # "slow" / "fast"
    voice: str
    espeak_speed: int
    espeak_pitch: int

    @property
    def label(self) -> int:
        return VOCABULARY.index(self.word)


class Prompt(NamedTuple):
    """A prompt read by :func:`parse_prompt`: the word (``None``: no vocabulary word named) and
    the attributes it names (``None``: not named)."""

    word: str | None
    pitch: str | None
    speed: str | None


def word_index(word: str) -> int:
    """The word's index in :data:`VOCABULARY` (its class label)."""
    return VOCABULARY.index(word)


def heldout_combination(word: str) -> tuple[str, str]:
    """The (pitch, speed) combination ``word`` is never spoken in by ``spoken_words``:
    :data:`COMBINATIONS` ``[i % 4]`` for word ``i``."""
    return COMBINATIONS[word_index(word) % len(COMBINATIONS)]


@functools.cache
def triples(split: str) -> tuple[tuple[str, str, str], ...]:
    """The ``(word, pitch, speed)`` triples of ``split``: ``"train"`` (90: each word in the
    three combinations not held out), ``"heldout"`` (30: one per word) or ``"all"`` (120),
    word-major in vocabulary order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    for w in VOCABULARY:
        held = heldout_combination(w)
        for combo in COMBINATIONS:
            if split == "all" or (combo == held) == (split == "heldout"):
                out.append((w, *combo))
    return tuple(out)


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of ``stream`` (:data:`STREAMS`) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]))


def draw_clip(word: str, pitch: str, speed: str, rng: np.random.Generator) -> Clip:
    """A voice, an espeak speed and an espeak pitch for ``word`` said with ``pitch`` and
    ``speed``, drawn from ``rng``."""
    voices, (plo, phi) = ((LOW_VOICES, LOW_PITCHES) if pitch == "low"
                          else (HIGH_VOICES, HIGH_PITCHES))
    slo, shi = SLOW_SPEEDS if speed == "slow" else FAST_SPEEDS
    voice = voices[int(rng.integers(len(voices)))]
    return Clip(word, pitch, speed, voice, int(rng.integers(slo, shi + 1)),
                int(rng.integers(plo, phi + 1)))


def caption(template: str, clip: Clip | Prompt) -> str:
    return template.format(w=clip.word, p=clip.pitch, s=ADVERBS.get(clip.speed, ""),
                           a=clip.speed)


def captions_for(clip: Clip, rng: np.random.Generator, k: int) -> list[str]:
    """``k`` captions of ``clip``, from distinct templates while there are enough (then again in
    a new order)."""
    out: list[str] = []
    while len(out) < k:
        out += [caption(TEMPLATES[t], clip) for t in rng.permutation(len(TEMPLATES))[:k - len(out)]]
    return out


def parse_prompt(prompt: str) -> Prompt:
    """The word and attributes a prompt names: the word is the text between its first pair of
    double quotes (else the first vocabulary word of the prompt), lower-cased and stripped;
    ``low`` / ``deep`` / ``high`` outside the quotes name the pitch, ``slow(ly)`` / ``fast`` /
    ``quick(ly)`` the speed (the first one found wins)."""
    parts = prompt.split('"')
    if len(parts) >= 3:
        word, rest = parts[1].strip().lower(), " ".join(parts[:1] + parts[2:])
    else:
        word, rest = None, prompt
    tokens = ["".join(ch for ch in t if ch.isalpha()) for t in rest.lower().split()]
    if word is None:
        word = next((t for t in tokens if t in VOCABULARY), None)
    pitch = next((PITCH_WORDS[t] for t in tokens if t in PITCH_WORDS), None)
    speed = next((SPEED_WORDS[t] for t in tokens if t in SPEED_WORDS), None)
    return Prompt(word if word in VOCABULARY else None, pitch, speed)


def evaluation_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of held-out triples (cycled, ``spoken_words_heldout``'s order), each in a
    template naming both attributes (cycled): ``"seven" said slowly by a low voice``..."""
    held = triples("heldout")
    return [caption(FULL_TEMPLATES[(i // len(held) + i) % len(FULL_TEMPLATES)],
                    Prompt(*held[i % len(held)])) for i in range(n)]


class SpokenWordsSource(Source):
    """``count`` clips of spoken words (see the module doc): clip ``i`` is triple
    ``triples(split)[i % len(triples)]`` (so any ``len(triples)`` consecutive clips hold each
    once) in a voice, speed and pitch drawn from ``(seed, stream, i)``; ``stream`` defaults to
    the split's own (the evaluator's training clips use ``"evaluator"``).

    :meth:`read` gives float32 ``waves`` ``[n, samples]`` (leading silence trimmed,
    peak-normalised, padded/cropped as the spoken digits'), int64 ``labels`` (the word's index
    in :data:`VOCABULARY`), ``pitch`` / ``speed`` (int64: 1 for high / fast) and, with
    ``captions`` > 0, ``captions`` ``[n, captions]`` (str)."""

    def __init__(self, split: str = "train", *, count: int = 1440, samples: int,
                 sample_rate: int = 16000, seed: int = 0, captions: int = 0,
                 stream: str | None = None, cache_dir: str | Path | None = None,
                 workers: int = 4) -> None:
        self.triples = triples(split)
        self.exe = espeak_binary("spoken_words")
        self.stream = stream or split
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {self.stream!r}")
        self.split, self.count, self.samples, self.sample_rate = split, count, samples, sample_rate
        self.seed, self.captions, self.workers = seed, captions, workers
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache = root / "spoken_words" / CACHE_VERSION / str(sample_rate)
        cap = f", {captions} captions each" if captions else ""
        self.description = (
            f"espeak-ng spoken words ({split}: {len(self.triples)} (word, pitch, speed) triples "
            f"of {len(VOCABULARY)} words; stream {self.stream}, seed {seed}): {count} clips, "
            f"{sample_rate} Hz, {samples} samples each; label = word index{cap}")

    def __len__(self) -> int:
        return self.count

    def clip(self, index: int) -> Clip:
        """What clip ``index`` says, and how."""
        return self._drawn(index)[0]

    def _drawn(self, index: int, k: int = 0) -> tuple[Clip, list[str]]:
        rng = sample_rng(self.seed, self.stream, index)
        clip = draw_clip(*self.triples[index % len(self.triples)], rng)
        return clip, captions_for(clip, rng, k)

    def path(self, clip: Clip) -> Path:
        safe = clip.voice.replace("/", "_")
        return self.cache / f"{safe}_s{clip.espeak_speed}_p{clip.espeak_pitch}_{clip.word}.wav"

    def _synthesise(self, clip: Clip) -> Path:
        return synthesise(self.exe, clip.word, clip.voice, clip.espeak_speed, clip.espeak_pitch,
                          self.path(clip), self.sample_rate)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.read_indices(range(start, stop))

    def read_indices(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Clips at any ``indices`` (missing WAVs are synthesised in parallel first)."""
        drawn = [self._drawn(int(i), self.captions) for i in indices]
        missing = sorted({c for c, _ in drawn if not self.path(c).is_file()})
        if missing:
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                list(pool.map(self._synthesise, missing))
        waves = np.zeros((len(drawn), self.samples), dtype=np.float32)
        for row, (c, _) in enumerate(drawn):
            x, rate = read_wav(self.path(c))
            if rate != self.sample_rate:
                x = resample(x, rate, self.sample_rate)
            waves[row] = fit_clip(x, self.samples, self.sample_rate)
        out = {"waves": waves,
               "labels": np.array([c.label for c, _ in drawn], dtype=np.int64),
               "pitch": np.array([c.pitch == "high" for c, _ in drawn], dtype=np.int64),
               "speed": np.array([c.speed == "fast" for c, _ in drawn], dtype=np.int64)}
        if self.captions:
            out[CAPTIONS_FIELD] = caption_array([caps for _, caps in drawn], self.captions)
        return out
