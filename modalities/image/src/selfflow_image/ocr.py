"""A fixed OCR reader: the evaluator of prompt following for the rendered-word sources.

A small CNN reads a ``size x size`` RGB image as :data:`~selfflow_image.words.MAX_WORD_LENGTH`
characters, each one of 26 letters or blank (a per-position classifier; a word fills positions
``0..len-1``, blanks the rest). It is trained once, deterministically from its seed, on renders
of **all** vocabulary words (train and held-out) drawn from its own random stream (``reader``),
never the ``words`` / ``words_heldout`` renders; light Gaussian noise is added while training so
it also reads slightly imperfect images. The weights are cached on disk with their SHA-256 and
their accuracy on renders of the held-out words from the ``words_heldout`` stream (the
*ceiling*: what a model that renders perfectly would score).

- :func:`read_words` ``(images) -> list[str]``: the words read (default reader, built on first
  use, then loaded from the cache).
- :func:`exact_match` / :func:`char_accuracy` / :func:`word_scores`: the metrics.
- :func:`load_reader` / :func:`train_reader`: the reader itself.

Cache: ``$SELFFLOW_CACHE``, else ``$XDG_CACHE_HOME/selfflow``, else ``~/.cache/selfflow``, then
``ocr_reader/v<version>/<settings hash>/`` holding ``reader.pt`` (a ``state_dict``) and
``reader.json`` (settings, SHA-256, accuracies), kept by the core's
:class:`~selfflow_core.EvaluatorCache`. A cached file whose hash differs from its record is an
error (delete the folder to rebuild): scores made with another reader are not comparable.
The SHA-256 identifies the weights a score was computed with; training is deterministic on one
machine and thread count, but another CPU or torch version may train other (equally good)
weights.
"""

from __future__ import annotations

import functools
import hashlib
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
from selfflow_image.words import (
    MAX_WORD_LENGTH,
    VOCABULARY,
    WordsLook,
    WordsSource,
    draw_style,
    heldout_words,
    render,
    sample_rng,
    to_float,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BLANK = 0  # class 0: no character; letter i of ALPHABET is class i + 1
CACHE_VERSION = 1


class ReaderCacheError(EvaluatorCacheError):
    """A cached reader whose weights do not match their recorded SHA-256 (or settings)."""


#: where readers are cached: ``ocr_reader/v<version>/<settings hash>/reader.{pt,json}``
READER_CACHE = EvaluatorCache(kind="ocr_reader", version=CACHE_VERSION, stem="reader",
                              name="OCR reader", error=ReaderCacheError)


# ---- metrics ----------------------------------------------------------------------------------

def _norm(word: str) -> str:
    return str(word).strip().lower()


def exact_match(pred: str, target: str) -> float:
    """1.0 if ``pred`` is ``target`` (both stripped and lower-cased), else 0.0 (MARIO-Eval's
    exact match)."""
    return float(_norm(pred) == _norm(target))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions of one
    character that turn ``a`` into ``b``."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, target: str) -> float:
    """``1 - edit_distance(pred, target) / max(len(pred), len(target))`` on the stripped,
    lower-cased strings (1.0 when both are empty): 1 for the right word, 0 when no character
    can be kept in place; in ``[0, 1]``."""
    p, t = _norm(pred), _norm(target)
    longest = max(len(p), len(t))
    return 1.0 if longest == 0 else 1.0 - edit_distance(p, t) / longest


def word_scores(preds: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Mean :func:`exact_match` and :func:`char_accuracy` over pairs, and their count."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    n = len(targets)
    if n == 0:
        return {"exact_match": float("nan"), "char_accuracy": float("nan"), "count": 0}
    return {"exact_match": sum(map(exact_match, preds, targets)) / n,
            "char_accuracy": sum(map(char_accuracy, preds, targets)) / n, "count": n}


# ---- the network ------------------------------------------------------------------------------

INPUT_CHANNELS = 2
LUMA = (0.299, 0.587, 0.114)


def ink(x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> what the network sees ``[B, 2, H, W]``: the
    luma's signed and absolute difference from the image's median luma (its background, which
    the text never covers most of), scaled by the largest absolute one: the text stands out
    whatever its colour and the background's."""
    luma = (x * torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1)
    d = luma - luma.flatten(1).median(1).values.view(-1, 1, 1)
    d = d / d.flatten(1).abs().amax(1).clamp_min(1e-3).view(-1, 1, 1)
    return torch.stack([d, d.abs()], 1)


class ReaderNet(nn.Module):
    """A small CRNN without the recurrence: images ``[B, 3, S, S]`` in ``[-1, 1]`` ->
    :func:`ink` -> three conv (3x3) + batch-norm + ReLU stages of ``width``, ``2 width``,
    ``4 width`` channels, pooled to ``S/8`` rows and ``S/2`` columns -> the rows stacked into
    channels -> two 1-D convolutions along the columns (kernel 3, ``8 width``) -> 27 logits per
    column (blank + 26 letters), read by CTC: ``[S/2, B, 27]`` log-probabilities."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(INPUT_CHANNELS, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d((2, 1)),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d((2, 1)))
        rows = size // 8
        self.columns = nn.Sequential(
            nn.Conv1d(4 * w * rows, 8 * w, 3, padding=1), nn.BatchNorm1d(8 * w), nn.ReLU(),
            nn.Conv1d(8 * w, 8 * w, 3, padding=1), nn.BatchNorm1d(8 * w), nn.ReLU(),
            nn.Conv1d(8 * w, len(ALPHABET) + 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(ink(x))
        logits = self.columns(h.flatten(1, 2))  # [B, 27, T]
        return logits.permute(2, 0, 1).log_softmax(-1)


def encode_words(words: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> CTC targets: the letters' classes (1..26) concatenated, and each word's
    length."""
    classes = [ALPHABET.index(ch) + 1 for w in words for ch in w]
    return (torch.tensor(classes, dtype=torch.long),
            torch.tensor([len(w) for w in words], dtype=torch.long))


def decode_logits(log_probs: torch.Tensor) -> list[str]:
    """Greedy CTC decoding of ``[T, B, 27]``: the best class per column, repeats merged,
    blanks dropped."""
    words = []
    for row in log_probs.argmax(-1).T.tolist():
        chars, last = [], BLANK
        for c in row:
            if c != last and c != BLANK:
                chars.append(ALPHABET[c - 1])
            last = c
        words.append("".join(chars))
    return words


# ---- the reader -------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class ReaderConfig:
    """How the reader is made (all of it is hashed into its cache folder).

    - ``size``: image side (the words sources' ``size``).
    - ``seed``: initialisation, batch order and noise; the renders come from the ``reader``
      stream under this seed (never the training data's ``words`` stream).
    - ``renders_per_word``: training images per vocabulary word (all 200 words).
    - ``steps`` / ``batch`` / ``lr``: AdamW, cosine decay; ``width``: the network's width.
    - ``noise``: the largest std of the Gaussian noise added to training inputs (in ``[-1, 1]``
      units; each image draws its std uniformly in ``[0, noise]``).
    - ``eval_renders``: held-out renders (the ``words_heldout`` source, seed 0) the ceiling is
      measured on.
    - ``look``: the renders' :class:`~selfflow_image.words.WordsLook`, for training and the
      ceiling (the look of the run it scores: a reader of one look misreads another's renders).
    """

    size: int = attrs.field(default=32, validator=v.ge(24))
    seed: int = 1
    renders_per_word: int = attrs.field(default=48, validator=v.ge(1))
    steps: int = attrs.field(default=2000, validator=v.ge(1))
    batch: int = attrs.field(default=64, validator=v.ge(1))
    lr: float = attrs.field(default=3e-3, validator=v.gt(0))
    width: int = attrs.field(default=16, validator=v.ge(1))
    noise: float = attrs.field(default=0.15, validator=v.ge(0))
    eval_renders: int = attrs.field(default=800, validator=v.ge(1))
    look: WordsLook = attrs.field(factory=WordsLook, validator=v.instance_of(WordsLook))

    @size.validator
    def _check_size(self, attribute: Any, value: int) -> None:
        if value % 8:
            raise ValueError(f"reader size must be a multiple of 8 (got {value})")

    def settings(self) -> dict[str, Any]:
        """Everything the reader depends on; the default look is left out, so the default
        reader's cache key is the one it had before looks existed."""
        # the captions' templates are not part of the renders: a reader serves every choice
        look = attrs.evolve(self.look, templates="all")
        out = attrs.asdict(attrs.evolve(self, look=look), recurse=True)
        if look == WordsLook():
            del out["look"]
        else:
            out["look"]["font_sizes"] = list(look.font_sizes)
            del out["look"]["templates"]
            if look.background == "random":  # came later: old keys stay valid
                del out["look"]["background"]
        return {"version": CACHE_VERSION, **out,
                "vocabulary": hashlib.sha256(" ".join(VOCABULARY).encode()).hexdigest()[:16],
                "length": MAX_WORD_LENGTH}

    def key(self) -> str:
        return settings_key(self.settings())


def _renders(words: Sequence[str], seed: int, stream: str, size: int,
             look: WordsLook) -> np.ndarray:
    """uint8 ``[len(words), size, size, 3]``: word ``i`` in the style of sample ``i`` of
    ``stream``, in ``look``."""
    out = np.empty((len(words), size, size, 3), dtype=np.uint8)
    for i, w in enumerate(words):
        out[i] = render(draw_style(w, sample_rng(seed, stream, i), size, look), size)
    return out


def _as_input(images: Any, size: int) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` (0..255) or float ``[B, C, H, W]`` in ``[-1, 1]`` (C 1 or 3) ->
    float ``[B, 3, size, size]`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C] uint8 or [B, C, H, W] float, got shape "
                         f"{tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3 or tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"the reader reads {size}x{size} images with 1 or 3 channels, got "
                         f"{tuple(x.shape[1:])} (channels, height, width)")
    return x.clamp(-1.0, 1.0).contiguous()


class Reader:
    """A trained :class:`ReaderNet` and its record (``info``)."""

    def __init__(self, config: ReaderConfig, net: ReaderNet, info: dict[str, Any]) -> None:
        self.config, self.net, self.info = config, net.eval(), info

    @torch.no_grad()
    def read(self, images: Any, batch: int = 512) -> list[str]:
        """The word in each image (see :func:`read_words` for the accepted forms)."""
        x = _as_input(images, self.config.size)
        out: list[str] = []
        for i in range(0, len(x), batch):
            out += decode_logits(self.net(x[i:i + batch]))
        return out

    def score(self, images: Any, targets: Sequence[str]) -> dict[str, float]:
        """:func:`word_scores` of the words read against ``targets``."""
        return word_scores(self.read(images), targets)


def evaluate_ceiling(reader: Reader, count: int) -> dict[str, float]:
    """The reader's scores on ``count`` real renders of the held-out words (the
    ``words_heldout`` source at seed 0, the renders an evaluation compares against), and on as
    many noise images (uniform in ``[-1, 1]``) against the same words."""
    src = WordsSource("heldout", count=count, size=reader.config.size, channels=3, seed=0,
                      look=reader.config.look)
    real = src.read(0, count)
    words = [VOCABULARY[i] for i in real["labels"]]
    g = torch.Generator().manual_seed(12345)
    noise = torch.rand((count, 3, reader.config.size, reader.config.size), generator=g) * 2 - 1
    return {"heldout": reader.score(real["images"], words),
            "noise": reader.score(noise, words)}


def train_reader(config: ReaderConfig = ReaderConfig()) -> Reader:
    """Train a reader from scratch (deterministic given the seed, on one machine and thread
    count); ``info`` holds its settings, training accuracy and time, and the ceiling."""
    start = time.monotonic()
    words = [w for w in VOCABULARY for _ in range(config.renders_per_word)]
    x = torch.from_numpy(to_float(_renders(words, config.seed, "reader", config.size,
                                           config.look), 3))
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the initial weights
    net = ReaderNet(config.size, config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)))
    net.train()
    for _ in range(config.steps):
        idx = torch.randint(0, len(x), (config.batch,), generator=g)
        std = torch.rand((config.batch, 1, 1, 1), generator=g) * config.noise
        xb = x[idx] + std * torch.randn(x[idx].shape, generator=g)
        targets, lengths = encode_words([words[i] for i in idx.tolist()])
        log_probs = net(xb)
        steps_in = torch.full((config.batch,), log_probs.shape[0], dtype=torch.long)
        loss = F.ctc_loss(log_probs, targets, steps_in, lengths, blank=BLANK, zero_infinity=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    reader = Reader(config, net, {})
    with torch.no_grad():
        train = reader.score(x[:: max(1, len(x) // 2000)], words[:: max(1, len(x) // 2000)])
    reader.info = {"settings": config.settings(), "train": train,
                   "final_loss": float(loss.detach()),
                   "train_seconds": round(time.monotonic() - start, 1),
                   "architecture": "ReaderNet", "alphabet": ALPHABET,
                   "words": len(VOCABULARY), "heldout_words": list(heldout_words()),
                   "torch": torch.__version__}
    reader.info["ceiling"] = evaluate_ceiling(reader, config.eval_renders)
    return reader


def load_reader(config: ReaderConfig = ReaderConfig(), cache_dir: str | Path | None = None,
                *, progress: bool = True) -> Reader:
    """The reader of ``config`` from the cache, trained and cached first if it is not there.
    Its weights' SHA-256 is checked against the record (:class:`ReaderCacheError` if it
    differs)."""
    return READER_CACHE.load_or_train(
        config.settings(), cache_dir=cache_dir, progress=progress,
        train=lambda: train_reader(config), empty=lambda: ReaderNet(config.size, config.width),
        wrap=lambda net, info: Reader(config, net, info))


@functools.cache
def default_reader(look: WordsLook | None = None) -> Reader:
    """The default reader of ``look`` (:class:`ReaderConfig` defaults otherwise, the default
    cache), loaded once."""
    return load_reader(ReaderConfig(look=look or WordsLook()))


def read_words(images: Any, reader: Reader | None = None, look: WordsLook | None = None
               ) -> list[str]:
    """The word in each image: uint8 ``[B, H, W, C]`` (what ``decode_images`` gives) or float
    ``[B, C, H, W]`` in ``[-1, 1]`` (a source's ``images``, decoded latents), C 1 or 3, at the
    reader's size (32 by default). ``reader``: default :func:`default_reader` of ``look``."""
    return (reader or default_reader(look)).read(images)


def heldout_prompts(count: int, k: int = 1, seed: int = 0, size: int = 32,
                    look: WordsLook | None = None) -> tuple[list[str], list[list[str]]]:
    """``count`` evaluation prompts of held-out words: the words and ``k`` captions each, as the
    ``words_heldout`` source gives them (sample ``i`` of its stream under ``seed``, in
    ``look``)."""
    src = WordsSource("heldout", count=count, size=size, seed=seed, captions=k, look=look)
    samples = [src.sample(i)[1:] for i in range(count)]
    return [style.word for style, _ in samples], [caps for _, caps in samples]
