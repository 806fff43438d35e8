"""The image modality: images -> latents ``[C, H, W]`` -> patch tokens with 2-D positions.

Offline, a :class:`~selfflow_core.interfaces.Source` yields images in ``[-1, 1]`` at
``size x size`` (the sklearn digits, or a folder of PNG/JPG files) and the configured encoder
(pixels by default) turns them into the ``latents`` field; ``labels`` pass through. Online,
:meth:`ImageModality.tokenize` cuts latents into ``patch x patch`` tokens in row-major order,
each with its ``(row, col)`` position, and :meth:`ImageModality.detokenize` puts them back.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor

from selfflow_core import (
    TILE_SEPARATOR,
    DualTimestep,
    FieldSpec,
    ModalityConfig,
    SelfFlowError,
    Source,
    Uniform,
    added_field,
    tile_images,
    to_uint8,
    upscale,
)
from selfflow_core.tokens import (
    PatchAdapter,
)
from selfflow_image.captions import (
    CAPTIONS_FIELD,
    MISSING_CAPTIONS,
    MissingCaptionError,
    caption_array,
    captions_field,
    captions_spec,
    folder_captions,
)
from selfflow_image.encoders import ImageEncoder, ImageEncoderConfig, PixelEncoder
from selfflow_image.words import VOCABULARY, WordsLook, WordsSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: what a folder source does with a file PIL cannot read (``ImageModality.Config.on_unreadable``)
ON_UNREADABLE = ("stop", "skip")
#: the built-in sources (besides a folder path)
SOURCES = ("digits", "words", "words_heldout")


def _to_channels(x: Tensor, channels: int) -> Tensor:
    """``[B, c, H, W]`` -> ``[B, channels, H, W]``: grey is replicated, RGB averaged to grey."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]} image channels to {channels}")


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as float32 ``[1797, 1, 8, 8]`` in ``[-1, 1]`` and int64 labels (read once)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    images.flags.writeable = False
    labels = digits.target.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates of the digits (``{d}``: the digit, ``{n}``: its name)
DIGIT_TEMPLATES = ("a handwritten {n}", "the digit {d}", "a handwritten digit {d}",
                   "the number {n}", "{n}", "a small picture of the digit {d}")


def slug(text: str, limit: int = 48) -> str:
    """``text`` as a file-name part: lower-case letters, digits and single dashes."""
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(p for p in out.split("-") if p)[:limit] or "empty"


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def quoted_word(prompt: str) -> str:
    """The word a prompt asks to render: the text between its first pair of double quotes (the
    whole prompt, stripped, when it has none)."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else prompt.strip()


def digit_captions(label: int, index: int, k: int) -> list[str]:
    """``k`` captions of digit ``label`` (sample ``index``): distinct templates in an order
    drawn from ``index``."""
    rng = np.random.default_rng(np.random.SeedSequence([7, int(index)]))
    order = [int(t) for _ in range(-(-k // len(DIGIT_TEMPLATES)))
             for t in rng.permutation(len(DIGIT_TEMPLATES))]
    return [DIGIT_TEMPLATES[t].format(d=label, n=DIGIT_NAMES[label]) for t in order[:k]]


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits (1797 images, labels 0..9) in dataset order, scaled
    from 0..16 to ``[-1, 1]`` and, for ``size != 8``, upsampled bilinearly. No download.
    With ``captions`` > 0, also that many captions per image (:data:`DIGIT_TEMPLATES`)."""

    def __init__(self, size: int = 8, channels: int = 1, captions: int = 0) -> None:
        self.images, self.labels = _load_digits()
        self.size, self.channels, self.captions = size, channels, captions
        cap = f", {captions} captions each" if captions else ""
        self.description = (f"sklearn digits: {len(self.labels)} images 8x8 -> "
                            f"{channels}x{size}x{size}, labels 0..9{cap}")

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        x = torch.from_numpy(self.images[start:stop].copy())
        if self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False).clamp(-1.0, 1.0)
        x = _to_channels(x, self.channels)
        out = {"images": x.numpy(), "labels": self.labels[start:stop].copy()}
        if self.captions:
            out[CAPTIONS_FIELD] = caption_array(
                [digit_captions(int(y), i, self.captions)
                 for i, y in enumerate(out["labels"], start)], self.captions)
        return out


class UnreadableImageError(SelfFlowError, ValueError):
    """A file of an image folder that PIL cannot read (not an image, truncated, corrupt, no
    permission); names the file and says how to skip such files."""

    def __init__(self, path: str | Path, reason: str, advice: bool = True) -> None:
        self.path, self.reason, self.advice = str(path), reason, advice
        hint = ('; fix or remove it, or set on_unreadable = "skip" in the image modality config '
                'to leave unreadable files out') if advice else ""
        super().__init__(f"cannot read image file {self.path} ({reason}){hint}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.advice))


class UnreadableImagesSkipped(UserWarning):
    """Issued once per :class:`FolderSource` with ``on_unreadable="skip"`` that left files out;
    the message lists them."""


#: what PIL raises for a file it cannot open or decode
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _why(error: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"{type(error).__name__}: {error}"


class FolderSource(Source):
    """PNG/JPG files under ``root`` (searched recursively, sorted by relative path), resized to
    ``size x size``. If the images live in subfolders, each top-level subfolder is a class
    (sorted names -> labels 0, 1, ...); images directly in ``root`` get label 0. Classes come
    from the folder layout alone, so skipping a file never renumbers them.

    A file PIL cannot read: with ``on_unreadable="stop"``, :meth:`read` raises
    :class:`UnreadableImageError` naming it; with ``"skip"``, every file is decoded once when
    the source is first sized or read, the unreadable ones are left out (the others keep their
    sorted order) and one :class:`UnreadableImagesSkipped` warning lists them (also in
    :attr:`skipped`).

    With ``captions`` > 0, each image's first ``captions`` captions (from ``.txt`` files and
    ``metadata.jsonl`` / ``metadata.csv``, see :mod:`selfflow_image.captions`) are read too,
    padded with ``""``; an image without any is a :class:`MissingCaptionError` naming it
    (``missing_captions="stop"``) or gets only ``""`` (``"empty"``). Captions are looked up
    once, on the first :meth:`read` or :attr:`captions_table` (``ImageModality.open_source``
    reads it, so a missing caption stops before anything is encoded)."""

    def __init__(self, root: str | Path, size: int, channels: int,
                 on_unreadable: str = "stop", captions: int = 0,
                 missing_captions: str = "stop") -> None:
        if on_unreadable not in ON_UNREADABLE:
            raise ValueError(f"on_unreadable must be one of {ON_UNREADABLE}, got {on_unreadable!r}")
        if missing_captions not in MISSING_CAPTIONS:
            raise ValueError(f"missing_captions must be one of {MISSING_CAPTIONS}, got "
                             f"{missing_captions!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"image folder {str(self.root)!r} holds no "
                             f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} files")
        tops = [p.relative_to(self.root).parts for p in files]
        self.class_names = sorted({parts[0] for parts in tops if len(parts) > 1})
        index = {name: i for i, name in enumerate(self.class_names)}
        labels = np.array([index[parts[0]] if len(parts) > 1 else 0 for parts in tops],
                          dtype=np.int64)
        self.size, self.channels, self.on_unreadable = size, channels, on_unreadable
        self._candidates = (files, labels)
        self._kept: tuple[list[Path], np.ndarray] | None = None
        self._skipped: list[tuple[Path, str]] = []
        self.captions, self.missing_captions = captions, missing_captions
        self._captions: list[list[str]] | None = None
        classes = f", classes {self.class_names}" if self.class_names else ", unlabelled"
        skip = "; unreadable files skipped" if on_unreadable == "skip" else ""
        cap = ""
        if captions:
            cap = f"; {captions} captions each" + (", missing ones empty"
                                                     if missing_captions == "empty" else "")
        self.description = (f"image folder {self.root}: {len(files)} images -> "
                            f"{channels}x{size}x{size}{classes}{skip}{cap}")

    # ---- the files ----------------------------------------------------------------------------

    def _scanned(self) -> tuple[list[Path], np.ndarray]:
        """The files (and labels) read from: all of them, or with ``"skip"`` the readable ones
        (every file decoded once, here, on first use)."""
        if self.on_unreadable == "stop":
            return self._candidates
        if self._kept is None:
            from PIL import Image

            files, labels = self._candidates
            kept = []
            for i, path in enumerate(files):
                try:
                    with Image.open(path) as im:
                        im.load()
                except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
                    self._skipped.append((path, _why(e)))
                else:
                    kept.append(i)
            self._kept = ([files[i] for i in kept], labels[kept])
            if self._skipped:
                listed = "; ".join(f"{p.relative_to(self.root)} ({why})"
                                   for p, why in self._skipped)
                warnings.warn(UnreadableImagesSkipped(
                    f"image folder {self.root}: skipped {len(self._skipped)} unreadable file(s) "
                    f"of {len(files)}: {listed}"), stacklevel=3)
            if not kept:
                first, why = self._skipped[0]
                raise UnreadableImageError(first, f"{why}; and none of the {len(files)} image "
                                                  f"files of {self.root} is readable", advice=False)
        return self._kept

    @property
    def files(self) -> list[Path]:
        """The image files read, in order (with ``"skip"``: the readable ones)."""
        return self._scanned()[0]

    @property
    def labels(self) -> np.ndarray:
        """Their labels (int64)."""
        return self._scanned()[1]

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """``(file, reason)`` of each file left out by ``"skip"``, in sorted order."""
        self._scanned()
        return list(self._skipped)

    @property
    def captions_table(self) -> list[list[str]]:
        """Every caption found for each of :attr:`files` (checked for missing ones once)."""
        if self._captions is None:
            table = folder_captions(self.root, self.files)
            missing = [p for p, caps in zip(self.files, table) if not caps]
            if missing and self.missing_captions == "stop":
                raise MissingCaptionError(missing[0], len(missing), len(table))
            self._captions = table
        return self._captions

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        from PIL import Image

        table = self.captions_table[start:stop] if self.captions else None

        mode = "L" if self.channels == 1 else "RGB"
        out = np.empty((stop - start, self.channels, self.size, self.size), dtype=np.float32)
        for i, path in enumerate(self.files[start:stop]):
            try:
                with Image.open(path) as im:
                    im = im.convert(mode).resize((self.size, self.size), Image.Resampling.BICUBIC)
                    a = np.asarray(im, dtype=np.float32).reshape(self.size, self.size, -1)
            except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
                raise UnreadableImageError(path, _why(e),
                                           advice=self.on_unreadable == "stop") from e
            out[i] = a.transpose(2, 0, 1) / 127.5 - 1.0
        result = {"images": out, "labels": self.labels[start:stop].copy()}
        if table is not None:
            result[CAPTIONS_FIELD] = caption_array(table, self.captions)
        return result


#: tile uint8 images ``[B, H, W, C]`` into one grid, ``nrow`` per row (the core's helper)
make_grid = tile_images


class ImageModality(PatchAdapter):
    """Images as ``patch x patch`` tokens of their latents, with ``(row, col)`` positions."""

    name = "image"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """- ``patch``: token side in latent cells; ``size`` (or the VAE's latent side) must be a
          multiple of it.
        - ``size``: image side in pixels (8: the digits as they are; 16 or 32: upsampled).
        - ``channels``: 1 (grey) or 3 (RGB).
        - ``classes``: number of class labels (0: unconditional); the null class is ``classes``.
        - ``encoder``: which encoder makes the latents: a
          :class:`~selfflow_image.encoders.ImageEncoderConfig` (``kind`` pixel or
          diffusers_vae).
        - ``on_unreadable``: a file of a folder source that PIL cannot read: ``"stop"``
          encoding with an :class:`UnreadableImageError` naming it, or ``"skip"`` it (every
          file is then decoded once more when encoding starts; the skipped files are listed
          in one :class:`UnreadableImagesSkipped` warning). The built-in digits ignore it.
        - ``captions``: captions per sample ``K`` for prompt conditioning (the store's
          ``captions`` field, ``[K]`` str; ``""``: missing); ``0`` (default): none, the store
          holds only ``latents`` and ``labels``.
        - ``missing_captions``: a folder image without any caption (``captions`` > 0):
          ``"stop"`` with a :class:`~selfflow_image.captions.MissingCaptionError` naming it,
          or ``"empty"``: its captions are all ``""``.
        - ``count`` / ``seed``: samples and seed of the rendered-word sources (``words``,
          ``words_heldout``); the digits and folders ignore them.
        - ``words``: how those renders vary (a :class:`~selfflow_image.words.WordsLook`: font,
          font sizes, placement, gradients); the OCR evaluator reads renders of the same look.
        """

        kind = "image"
        patch: int = attrs.field(default=2, validator=v.ge(1))
        size: int = attrs.field(default=8, validator=v.ge(1))
        channels: int = attrs.field(default=1)
        classes: int = attrs.field(default=10, validator=v.ge(0))
        encoder: ImageEncoderConfig = attrs.field(factory=PixelEncoder.Config,
                                                  validator=v.instance_of(ImageEncoderConfig))
        on_unreadable: Literal["stop", "skip"] = attrs.field(default="stop",
                                                             validator=v.in_(ON_UNREADABLE))
        captions: int = attrs.field(default=0, validator=[v.ge(0), v.le(64)])
        missing_captions: Literal["stop", "empty"] = attrs.field(
            default="stop", validator=v.in_(MISSING_CAPTIONS))
        count: int = attrs.field(default=4096, validator=v.ge(1))
        seed: int = attrs.field(default=0, validator=v.ge(0))
        words: WordsLook = added_field(factory=WordsLook, validator=v.instance_of(WordsLook))

        @channels.validator
        def _check_channels(self, attribute: Any, value: int) -> None:
            if value not in (1, 3):
                raise ValueError(f"'channels' must be 1 (grey) or 3 (RGB) (got {value!r})")

        def __attrs_post_init__(self) -> None:  # (needs `encoder`, set after `size`)
            shape = self.encoder.fixed_latent_shape(self.channels, self.size)
            if shape is not None and shape[-1] % self.patch:
                raise ValueError(f"'size' must be a multiple of patch {self.patch} "
                                 f"(got {self.size})")

        def problems(self) -> list[str]:
            return [f"encoder.{p}" for p in self.encoder.problems()]

        def default_scheduler(self) -> DualTimestep.Config:
            """Paper App. A.2-A.3 (ImageNet and single-modality T2I): uniform p(t), mask
            ratio 0.25."""
            return DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25)

        def build(self) -> ImageModality:
            return ImageModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self._encoder: ImageEncoder | None = None

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def encoder(self) -> ImageEncoder:
        """The configured encoder, built on first use (a VAE loads only when it is needed)."""
        if self._encoder is None:
            self._encoder = self.config.encoder.build()
        return self._encoder

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        fixed = c.encoder.fixed_latent_shape(c.channels, c.size)  # no need to build anything
        if fixed is not None:
            return fixed
        shape = self.encoder.latent_shape(c.channels, c.size)
        if shape[1] % c.patch or shape[2] % c.patch:
            raise ValueError(f"image: latent shape {shape} is not divisible by patch {c.patch}")
        return shape

    @property
    def patch(self) -> tuple[int, int]:
        """Square patches of ``config.patch`` over the latent's height and width."""
        return (self.config.patch, self.config.patch)

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens per column and per row: ``(H' / patch, W' / patch)``."""
        _, h, w = self.latent_shape
        return h // self.config.patch, w // self.config.patch

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def encoder_info(self) -> Mapping[str, Any]:
        info = dict(self.encoder.info())
        info["settings"] = {**info.get("settings", {}), "image_size": self.config.size,
                            "image_channels": self.config.channels}
        return info

    # ---- offline ------------------------------------------------------------------------------

    def fields(self) -> Mapping[str, FieldSpec]:
        """``latents`` and ``labels``; with ``captions`` > 0 also ``captions`` (``[K]`` str)."""
        fields = dict(super().fields())
        if self.config.captions:
            fields[CAPTIONS_FIELD] = captions_spec(self.config.captions)
        return fields

    def sources(self) -> tuple[str, ...]:
        return SOURCES

    def open_source(self, source: str) -> Source:
        c = self.config
        if source == "digits":
            if c.classes and c.classes < 10:
                raise ValueError(f"image source 'digits' has 10 classes but classes={c.classes}")
            return DigitsSource(c.size, c.channels, captions=c.captions)
        if source in ("words", "words_heldout"):
            if c.classes and c.classes < len(VOCABULARY):
                raise ValueError(
                    f"image source {source!r} labels each image with its word's index in the "
                    f"vocabulary ({len(VOCABULARY)} classes) but classes={c.classes}; set "
                    f"classes = 0 (prompt-conditioned or unconditional) or {len(VOCABULARY)}")
            return WordsSource("train" if source == "words" else "heldout", count=c.count,
                               size=c.size, channels=c.channels, seed=c.seed,
                               captions=c.captions, look=c.words)
        path = Path(source).expanduser()
        if path.is_dir():
            src = FolderSource(path, c.size, c.channels, on_unreadable=c.on_unreadable,
                               captions=c.captions, missing_captions=c.missing_captions)
            if c.classes and len(src.class_names) > c.classes:
                raise ValueError(f"image folder {str(path)!r} has {len(src.class_names)} classes "
                                 f"({src.class_names}) but classes={c.classes}")
            if c.captions:
                src.captions_table  # noqa: B018 - a missing caption stops here, before encoding
            return src
        raise ValueError(f"image modality: unknown source {source!r}; built-in sources: "
                         f"{', '.join(SOURCES)}, or a path to a folder of PNG/JPG images (no "
                         f"folder at that path)")

    @torch.no_grad()
    def encode(self, raw: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        images = torch.as_tensor(np.asarray(raw["images"], dtype=np.float32))
        latents = self.encoder.encode(images)
        out = {"latents": latents.float().cpu().numpy().astype(np.float32, copy=False),
               "labels": np.asarray(raw["labels"], dtype=np.int64)}
        if self.config.captions:  # passed through as they are; tokenize ignores them
            out[CAPTIONS_FIELD] = captions_field(raw, self.config.captions)
        return out

    # ---- online -------------------------------------------------------------------------------

    def save_prompt_samples(self, latents: Tensor, labels: Tensor | None, prompts,
                            out_dir: Path) -> list[Path]:
        """``samples.png``: a grid with each sample's prompt written under it (Pillow's bundled
        font), and one ``NNN-<prompt>.png`` per sample, named after its prompt."""
        from PIL import Image, ImageDraw, ImageFont

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        images = upscale(self.decode_images(latents), 96)
        b, h, w, c = images.shape
        font = ImageFont.load_default(size=11)
        strip = 28
        cells = []
        paths = []
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            name = out_dir / f"{i:03d}-{slug(prompt)}.png"
            Image.fromarray(img[..., 0] if c == 1 else img).save(name)
            paths.append(name)
            cell = Image.new("RGB", (w, h + strip), (255, 255, 255))
            cell.paste(Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB"), (0, 0))
            draw = ImageDraw.Draw(cell)
            for j, line in enumerate(wrap(prompt, max(8, w // 6))[:2]):
                draw.text((2, h + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
            cells.append(np.asarray(cell))
        grid = tile_images(np.stack(cells), nrow=max(1, math.ceil(math.sqrt(max(b, 1)))))
        path = out_dir / "samples.png"
        Image.fromarray(grid).save(path)
        return [path, *paths]

    # ---- prompt-following evaluation -------------------------------------------------------

    def evaluation_prompts(self, n: int) -> list[str]:
        """With captions: ``n`` prompts of held-out words (``words_heldout``'s first caption of
        each of its first ``n`` samples), for the OCR evaluator. Meaningful for runs trained on
        the ``words`` source; other captioned runs pass their own prompts to
        ``selfflow evaluate --prompt``."""
        if not self.config.captions:
            return []
        from selfflow_image.ocr import heldout_prompts

        _, captions = heldout_prompts(n, k=1, size=self.config.size, look=self.config.words)
        return [c[0] for c in captions]

    def prompt_metrics(self, latents: Tensor, prompts, evaluator=None) -> dict[str, float]:
        """The fixed OCR reader (:mod:`selfflow_image.ocr`, trained once and cached, its SHA-256
        recorded) on the decoded samples against the quoted word of each prompt:
        ``exact_match`` (MARIO-Eval's idea: 1 only for the exact word, lower-cased) and
        ``char_accuracy`` (1 - edit distance / length), means over the samples. ``evaluator``:
        a :class:`~selfflow_image.ocr.Reader` to score with (default: the default reader)."""
        from selfflow_image.ocr import read_words, word_scores

        targets = [quoted_word(p) for p in prompts]
        scores = word_scores(read_words(self.decode_images(latents), evaluator,
                                        self.config.words), targets)
        return {k: v for k, v in scores.items() if k != "count"}

    # ---- samples ------------------------------------------------------------------------------

    def decode_images(self, latents: Tensor) -> np.ndarray:
        """Latents ``[B, C', H', W']`` -> uint8 images ``[B, H, W, C]``."""
        images = self.encoder.decode(latents.detach())
        return to_uint8(_to_channels(images, self.config.channels))

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """Decode and write ``samples.png``: one row per class (sorted by label) when labels are
        given, each row labelled with its class number in a left margin, else a near-square
        grid; cells upscaled by nearest neighbour to at least 64 px, separated by 2-px light
        lines (:func:`~selfflow_core.tile_images`)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        images = upscale(self.decode_images(latents), 64)
        b, c = images.shape[0], images.shape[-1]
        if labels is not None and b:
            lab = labels.detach().cpu().reshape(-1).numpy()
            classes = np.unique(lab)
            groups = [images[lab == k] for k in classes]  # boolean masks keep order: stable
            ncol = max(len(g) for g in groups)
            blank = np.full(images.shape[1:], TILE_SEPARATOR, dtype=np.uint8)
            cells = [np.concatenate([g, np.repeat(blank[None], ncol - len(g), axis=0)])
                     for g in groups]
            grid = tile_images(np.concatenate(cells), nrow=ncol,
                               row_labels=[int(k) for k in classes])
        else:
            grid = tile_images(images, nrow=max(1, math.ceil(math.sqrt(max(b, 1)))))
        from PIL import Image

        path = out_dir / "samples.png"
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
        return [path]
