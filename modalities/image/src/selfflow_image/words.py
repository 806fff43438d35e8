"""Built-in prompt data for text rendering: short words drawn with a real TrueType font.

Nothing is downloaded. Each sample is one lowercase word of :data:`VOCABULARY` (200 words of 3
or 4 letters), drawn in a named colour (:data:`COLOURS`) on a background of contrasting
brightness. How much else varies is a :class:`WordsLook`: the font (:data:`FONTS`: Pillow's
bundled Aileron Regular, or DejaVu Sans Mono Bold from the system's fonts), the range of font
sizes, the placement (anywhere the word fits, centred with a pixel or two of jitter, or one
letter per cell), whether backgrounds may be gradients, and whether they are random colours or
black or white by the text's colour. Everything is a pure function of ``(seed, stream, index)``
and the look: the same sample on every run and every read order.

The vocabulary is split once, by a fixed permutation, into :func:`train_words` (160) and
:func:`heldout_words` (40, 20 of each length); the training source (``words``) never draws a
held-out word, and no template or colour name is a vocabulary word, so held-out words never
appear in its images or captions. ``words_heldout`` renders only the held-out words (another
random stream), for evaluating whether a model renders words it never saw.

Captions come from :data:`TEMPLATES` (``a sign that says "cat"``, ``"cat" in red letters``,
...), ``K`` distinct templates per sample; a template naming a colour names the colour the word
is drawn in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
from attrs import validators as v

from selfflow_core import SelfFlowError, Source, added_field
from selfflow_image.captions import caption_array

#: 100 words of 3 letters and 100 of 4, lowercase a-z (sorted within each length)
VOCABULARY: tuple[str, ...] = tuple("""
ant ape arm art ash axe bag bat bed bee bow box boy bud bug bus cab cap car cat cow cub cup den
dig dog dot ear egg elf elk eye fan fig fin fly fog fox fur gem hen hop hug hut ice ink jam jar
jet joy key kid kit lap leg lid lip log map mix mop mud mug net nut oak owl pan paw pea pen pet
pig pin pit pot pup rag ram rat rib rug saw sea sky sun tap tea tin toe top toy tub van vet wax
web yak zip zoo
baby ball band bark barn bath bear beef bell bike bird boat bone book boot bowl cake camp card
cave chef city clay coat coin cook corn crab deer desk dice dish door dove drum duck farm fish
flag fork frog gate gift goat golf hand harp hawk hill hook horn iron kite king lake lamp leaf
lion lock loaf mask milk mint moon moth nest note park pear pond pool rain ring road rock roof
rope rose ruby sail salt sand seed ship shoe snow soap sock soup star swan tent tree vase wave
wind wing wolf wood worm
""".split())

#: every letter of the vocabulary, in order
LETTERS = "".join(sorted(set("".join(VOCABULARY))))
#: the longest word (the OCR reader's output length)
MAX_WORD_LENGTH = max(len(w) for w in VOCABULARY)

#: held-out words of each length (20 of 100: 40 of 200 in all)
HELDOUT_PER_LENGTH = 20
#: the seed of the fixed permutation that picks them (never change: it defines the split)
SPLIT_SEED = 20240611

#: text colours by name (sRGB); captions name them
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 40),
    "orange": (240, 125, 25),
    "purple": (130, 50, 165),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

#: caption templates: ``{w}`` is the word, ``{c}`` its colour's name
TEMPLATES: tuple[str, ...] = (
    'a sign that says "{w}"',
    '"{w}" in {c} letters',
    'the word "{w}" written in {c}',
    'the word "{w}"',
    'the text "{w}"',
    '{c} text reading "{w}"',
    'a picture of the word "{w}"',
    '"{w}" written in {c}',
    'an image with the text "{w}"',
    'the word "{w}" in {c}',
)

#: the templates that begin with the quoted word: its letters are always bytes 1 to 4 of the
#: caption, whatever follows
WORD_FIRST_TEMPLATES: tuple[str, ...] = (
    '"{w}"',
    '"{w}" in {c} letters',
    '"{w}" written in {c}',
    '"{w}" on a sign',
    '"{w}" in {c}',
)

#: random streams of :func:`sample_rng` (one per use, so no two uses share a render)
STREAMS = {"words": 0, "words_heldout": 1, "reader": 2}

#: font size range (pixels) at a 32-pixel image; scaled with the image side
FONT_SIZES_AT_32 = (10, 13)
#: fonts by name: None is Pillow's bundled font, a file name is looked up in :data:`FONT_DIRS`
FONTS: dict[str, str | None] = {"aileron": None, "dejavu-sans-mono-bold": "DejaVuSansMono-Bold.ttf"}
#: where system fonts are looked for (Debian/Ubuntu's fonts-dejavu-core, Fedora, Arch)
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu-sans-mono-fonts",
             "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu")
#: a centred word's jitter (pixels, either way): horizontal, vertical
CENTRED_JITTER = (1, 2)
#: the smallest image side the words fit at
MIN_SIZE = 24
#: blank pixels kept around the word's ink
MARGIN = 1
#: least difference of brightness (Rec. 601 luma in 0..1) between the text and its background
MIN_CONTRAST = 0.35


@attrs.frozen(kw_only=True)
class WordsLook:
    """How much the renders vary besides the word and its colour.

    - ``font``: a name of :data:`FONTS`.
    - ``font_sizes``: the range (pixels, inclusive) at a 32-pixel image, scaled with the side;
      a size the word does not fit at is never drawn.
    - ``placement``: ``"anywhere"`` the word's ink fits inside the margin, ``"centred"``
      (:data:`CENTRED_JITTER` pixels of jitter either way), or ``"grid"``: one letter per
      cell of ``size // MAX_WORD_LENGTH`` pixels, each centred in its cell, the word starting
      at the first cell and its line centred vertically (with a patch of that side, each
      letter's ink is one column of tokens).
    - ``gradients``: backgrounds may be horizontal or vertical gradients (else always solid).
    - ``background``: ``"random"``, a random colour of contrasting brightness, or
      ``"black_or_white"``: black behind light text (luma above 0.5: yellow, orange, white),
      white behind the rest; always solid (``gradients`` must be false). The words and the
      text colour then vary and little else does, so a model has far less to spend its loss
      on than the colour of the background (benchmarks/RESULTS.md).
    - ``templates``: the captions' templates, ``"all"`` (:data:`TEMPLATES`) or
      ``"word_first"`` (:data:`WORD_FIRST_TEMPLATES`, each beginning with the quoted word, so
      its letters sit at the same places of every caption). Not part of the renders.

    The default is the varied look (the ``t2i_words`` preset's); ``WordsLook.plain()`` varies
    only the word, its colour, the background colour and the jitter."""

    font: str = attrs.field(default="aileron", validator=v.in_(tuple(FONTS)))
    font_sizes: tuple[int, int] = attrs.field(default=FONT_SIZES_AT_32, converter=tuple)
    placement: Literal["anywhere", "centred", "grid"] = attrs.field(
        default="anywhere", validator=v.in_(("anywhere", "centred", "grid")))
    gradients: bool = True
    background: Literal["random", "black_or_white"] = added_field(
        default="random", validator=v.in_(("random", "black_or_white")))
    templates: Literal["all", "word_first"] = added_field(
        default="all", validator=v.in_(("all", "word_first")))

    @background.validator
    def _check_background(self, attribute, value) -> None:
        if value == "black_or_white" and self.gradients:
            raise ValueError("'gradients' must be false with background 'black_or_white' "
                             "(those backgrounds are solid)")

    @property
    def caption_templates(self) -> tuple[str, ...]:
        return WORD_FIRST_TEMPLATES if self.templates == "word_first" else TEMPLATES

    @font_sizes.validator
    def _check_sizes(self, attribute, value) -> None:
        if len(value) != 2 or not 1 <= value[0] <= value[1]:
            raise ValueError(f"'font_sizes' must be [low, high] with 1 <= low <= high, got "
                             f"{list(value)}")

    @classmethod
    def plain(cls) -> WordsLook:
        """Monospaced bold at one size, centred, on solid backgrounds."""
        return cls(font="dejavu-sans-mono-bold", font_sizes=(11, 11), placement="centred",
                   gradients=False)


def _luma(rgb: Sequence[float]) -> float:
    r, g, b = rgb
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


@functools.cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    rng = np.random.default_rng(SPLIT_SEED)
    held: set[str] = set()
    for n in sorted({len(w) for w in VOCABULARY}):
        group = [w for w in VOCABULARY if len(w) == n]
        held.update(group[i] for i in rng.permutation(len(group))[:HELDOUT_PER_LENGTH])
    train = tuple(w for w in VOCABULARY if w not in held)
    return train, tuple(w for w in VOCABULARY if w in held)


def train_words() -> tuple[str, ...]:
    """The 160 words the ``words`` source draws (vocabulary order)."""
    return _split()[0]


def heldout_words() -> tuple[str, ...]:
    """The 40 held-out words (vocabulary order): never drawn by ``words``, only by
    ``words_heldout``."""
    return _split()[1]


def word_index(word: str) -> int:
    """The word's index in :data:`VOCABULARY` (its class label)."""
    return VOCABULARY.index(word)


class MissingFontError(SelfFlowError, FileNotFoundError):
    """A words font whose file is not installed."""


def font_file(name: str) -> Path | None:
    """The file of font ``name`` (:data:`FONTS`; None: Pillow's bundled font)."""
    file = FONTS[name]
    if file is None:
        return None
    for folder in FONT_DIRS:
        if (path := Path(folder) / file).is_file():
            return path
    raise MissingFontError(
        f"the words font {name!r} needs {file} in one of {', '.join(FONT_DIRS)}; install the "
        f"fonts-dejavu-core package (scripts/setup.sh does) or use font 'aileron' (bundled)")


@functools.cache
def font(size: int, name: str = "aileron"):
    """Font ``name`` (:data:`FONTS`) at ``size`` pixels, through FreeType."""
    from PIL import ImageFont

    path = font_file(name)
    f = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)
    if not isinstance(f, ImageFont.FreeTypeFont):  # Pillow < 10.1 or built without FreeType
        raise RuntimeError(
            "the image source 'words' needs Pillow >= 10.1 built with FreeType "
            "(PIL.ImageFont.load_default(size=...) returned a bitmap font); "
            "`pip install -U pillow`")
    return f


def font_sizes(size: int, look: WordsLook | None = None) -> tuple[int, int]:
    """The font size range at an image side of ``size``."""
    lo, hi = (look or WordsLook()).font_sizes
    return max(1, round(lo * size / 32)), max(1, round(hi * size / 32))


@attrs.frozen
class WordStyle:
    """How one sample is drawn: the ``word``, its ``colour`` (a name of :data:`COLOURS`), the
    ``font_size``, the top-left corner ``(x, y)`` of its ink, and the ``background``: two
    sRGB colours and a ``gradient`` direction (``"none"``: solid in the first colour,
    ``"horizontal"`` / ``"vertical"``: from the first to the second); the ``font``'s name; the
    ``cell`` width of the ``"grid"`` placement (0: the word drawn as one string)."""

    word: str
    colour: str
    font_size: int
    x: int
    y: int
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    gradient: str
    font: str = "aileron"
    cell: int = 0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``stream`` (:data:`STREAMS`) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]))


def _background(rng: np.random.Generator, text_luma: float, kind: str = "random"
                ) -> tuple[int, int, int]:
    if kind == "black_or_white":
        return (0, 0, 0) if text_luma > 0.5 else (255, 255, 255)
    while True:  # rejection sampling: a uniform colour of contrasting brightness
        c = rng.integers(0, 256, size=3)
        if abs(_luma(c) - text_luma) >= MIN_CONTRAST + 0.05:
            return tuple(int(v) for v in c)


def draw_style(word: str, rng: np.random.Generator, size: int,
               look: WordsLook | None = None) -> WordStyle:
    """A random style for ``word`` in a ``size x size`` image, in ``look`` (default: the
    varied :class:`WordsLook`)."""
    look = look or WordsLook()
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    lo, hi = font_sizes(size, look)
    if look.placement == "grid":
        cell = size // MAX_WORD_LENGTH
        fits = [s for s in range(lo, hi + 1) if _cell_fits(s, look.font, cell, size)]
    else:
        cell = 0
        fits = [s for s in range(lo, hi + 1) if _ink(word, s, look.font)[0] <= size - 2 * MARGIN]
    if not fits:
        raise ValueError(f"the word {word!r} does not fit a {size}x{size} image at font size "
                         f"{lo}; image sources 'words*' need size >= {MIN_SIZE}")
    font_size = fits[int(rng.integers(len(fits)))] if lo < hi else fits[0]
    w, h = _ink(word, font_size, look.font)
    if look.placement == "grid":
        x, y = 0, (size - _line(font_size, look.font)[1]) // 2
    elif look.placement == "anywhere":
        x = MARGIN + int(rng.integers(0, size - 2 * MARGIN - w + 1))
        y = MARGIN + int(rng.integers(0, max(0, size - 2 * MARGIN - h) + 1))
    else:
        jx, jy = CENTRED_JITTER
        x = (size - w) // 2 + int(rng.integers(-jx, jx + 1))
        y = (size - h) // 2 + int(rng.integers(-jy, jy + 1))
        x = min(max(x, MARGIN), max(MARGIN, size - MARGIN - w))
        y = min(max(y, MARGIN), max(MARGIN, size - MARGIN - h))
    text_luma = _luma(COLOURS[colour])
    first = _background(rng, text_luma, look.background)
    gradient = "none"
    if look.gradients:
        gradient = ("none", "horizontal", "vertical")[int(rng.integers(3))]
    if gradient == "none":
        second = first
    else:
        while True:  # a second colour near the first, also contrasting with the text
            c = np.clip(np.asarray(first) + rng.integers(-80, 81, size=3), 0, 255)
            if abs(_luma(c) - text_luma) >= MIN_CONTRAST:
                second = tuple(int(v) for v in c)
                break
    return WordStyle(word=word, colour=colour, font_size=font_size, x=x, y=y,
                     background=(first, second), gradient=gradient, font=look.font, cell=cell)


@functools.cache
def _line(font_size: int, name: str) -> tuple[int, int]:
    """The top offset and the height of the ink of every letter at ``font_size``."""
    _, top, _, bottom = font(font_size, name).getbbox(LETTERS)
    return top, bottom - top


@functools.cache
def _cell_fits(font_size: int, name: str, cell: int, size: int) -> bool:
    """Whether every letter at ``font_size`` fits a cell (asked once per sample: cached)."""
    f = font(font_size, name)
    widest = max(f.getbbox(c)[2] - f.getbbox(c)[0] for c in LETTERS)
    return widest <= cell and _line(font_size, name)[1] <= size - 2 * MARGIN


@functools.cache
def _ink(word: str, font_size: int, name: str = "aileron") -> tuple[int, int]:
    left, top, right, bottom = font(font_size, name).getbbox(word)
    return right - left, bottom - top


def render(style: WordStyle, size: int) -> np.ndarray:
    """The sample drawn: uint8 ``[size, size, 3]``."""
    from PIL import Image, ImageDraw

    (r0, g0, b0), (r1, g1, b1) = style.background
    a, b = np.asarray((r0, g0, b0), np.float32), np.asarray((r1, g1, b1), np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if style.gradient == "horizontal":
        bg = a + (b - a) * ramp[None, :, None]
        bg = np.broadcast_to(bg, (size, size, 3))
    elif style.gradient == "vertical":
        bg = np.broadcast_to(a + (b - a) * ramp[:, None, None], (size, size, 3))
    else:
        bg = np.broadcast_to(a, (size, size, 3))
    im = Image.fromarray(np.rint(bg).astype(np.uint8), "RGB")
    f = font(style.font_size, style.font)
    draw = ImageDraw.Draw(im)
    if style.cell:  # one letter per cell, each centred in it, on one line
        top = _line(style.font_size, style.font)[0]
        for i, c in enumerate(style.word):
            left, _, right, _ = f.getbbox(c)
            x = style.x + i * style.cell + (style.cell - (right - left)) // 2 - left
            draw.text((x, style.y - top), c, fill=style.rgb, font=f)
    else:
        left, top, _, _ = f.getbbox(style.word)
        draw.text((style.x - left, style.y - top), style.word, fill=style.rgb, font=f)
    return np.asarray(im, dtype=np.uint8)


def captions_for(style: WordStyle, rng: np.random.Generator, k: int,
                 templates: Sequence[str] = TEMPLATES) -> list[str]:
    """``k`` captions of the sample, from distinct ``templates`` while there are enough (then
    again in a new order)."""
    out: list[str] = []
    while len(out) < k:
        for t in rng.permutation(len(templates))[:k - len(out)]:
            out.append(templates[t].format(w=style.word, c=style.colour))
    return out


def to_float(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, channels, H, W]`` in ``[-1, 1]`` (grey: ITU-R
    601 luma, as PIL's ``convert("L")``)."""
    x = images.astype(np.float32)
    if channels == 1:
        x = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) / 127.5 - 1.0)


class WordsSource(Source):
    """Renders of short words (see the module doc): sample ``i`` is word
    ``words[i % len(words)]`` in a style drawn from ``(seed, stream, i)``.

    ``split``: ``"train"`` (:func:`train_words`, stream ``words``) or ``"heldout"``
    (:func:`heldout_words`, stream ``words_heldout``). :meth:`read` gives float32 ``images``
    ``[n, channels, size, size]`` in ``[-1, 1]``, int64 ``labels`` (the word's index in
    :data:`VOCABULARY`) and, with ``captions`` > 0, ``captions`` ``[n, captions]`` (str).
    ``look``: how the renders vary (:class:`WordsLook`, default the varied one)."""

    def __init__(self, split: str = "train", *, count: int = 4096, size: int = 32,
                 channels: int = 3, seed: int = 0, captions: int = 0,
                 look: WordsLook | None = None) -> None:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if size < MIN_SIZE:
            raise ValueError(f"image sources 'words*' need size >= {MIN_SIZE} (got {size})")
        self.split, self.count, self.size, self.channels = split, count, size, channels
        self.seed, self.captions, self.look = seed, captions, look or WordsLook()
        font_file(self.look.font)  # a missing font: named now, not on the first read
        self.stream = "words" if split == "train" else "words_heldout"
        self.words = train_words() if split == "train" else heldout_words()
        cap = f", {captions} captions each" if captions else ""
        self.description = (f"rendered words ({split}: {len(self.words)} words of "
                            f"{len(VOCABULARY)}): {count} images {channels}x{size}x{size}, "
                            f"seed {seed}{cap}"
                            + ("" if self.look == WordsLook() else f", {self.look}"))

    def __len__(self) -> int:
        return self.count

    def word(self, index: int) -> str:
        return self.words[index % len(self.words)]

    def style(self, index: int) -> WordStyle:
        """How sample ``index`` is drawn."""
        return draw_style(self.word(index), sample_rng(self.seed, self.stream, index), self.size,
                          self.look)

    def sample(self, index: int) -> tuple[np.ndarray, WordStyle, list[str]]:
        """Sample ``index``: uint8 ``[size, size, 3]``, its style and its captions."""
        rng = sample_rng(self.seed, self.stream, index)
        style = draw_style(self.word(index), rng, self.size, self.look)
        return render(style, self.size), style, captions_for(style, rng, self.captions,
                                                              self.look.caption_templates)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"samples {start}:{stop} out of range 0:{self.count}")
        images = np.empty((stop - start, self.size, self.size, 3), dtype=np.uint8)
        labels = np.empty(stop - start, dtype=np.int64)
        caps: list[list[str]] = []
        for j, i in enumerate(range(start, stop)):
            images[j], style, c = self.sample(i)
            labels[j] = word_index(style.word)
            caps.append(c)
        out = {"images": to_float(images, self.channels), "labels": labels}
        if self.captions:
            out["captions"] = caption_array(caps, self.captions)
        return out
