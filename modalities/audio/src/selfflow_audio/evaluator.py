"""A fixed evaluator of text to speech: which word a clip says, and with which voice.

It reads the modality's own latents (normalised log-mel ``[T, D]``, what the model generates;
nothing is decoded) and gives three judgements:

- **word**: a small 1-D CNN over time (:class:`WordNet`: four conv + batch-norm + ReLU stages,
  max and mean pooled, one linear layer) classifies the clip as one of the 30 words of
  :data:`~selfflow_audio.words.VOCABULARY`.
- **pitch** (low / high): :func:`pitch_features`, the shape of the spectrum below 1 kHz (the
  band of the fundamental and its first harmonics) averaged over the clip's loudest voiced
  frames, scored by a linear discriminant (logistic regression, fitted once): positive is high.
- **speed** (slow / fast): :func:`voiced_seconds`, the duration of the frames within 25 dB of
  the loudest, against the word's own threshold (the midpoint, in log seconds, of its slow and
  fast clips' mean durations): longer is slow.

All of it is fitted once, deterministically from its seed, on real clips of **all** 120
``(word, pitch, speed)`` triples from its own random stream (``evaluator``), never the
``spoken_words`` / ``spoken_words_heldout`` clips; the CNN trains with random time shifts,
gains and noise so that it also reads slightly imperfect latents. The discriminant's weights and
the thresholds are buffers of the module, so the SHA-256 of its ``state_dict`` covers them.
The record holds its accuracy on real clips of the training and held-out splits (seed 0, the
clips a run trains on and the ones it is compared against): the *ceiling*.

- :func:`judge` ``(latents) -> Judgement``: words, pitches and speeds.
- :func:`prompt_scores` ``(latents, prompts)``: ``word_acc`` and, over the prompts naming them,
  ``pitch_acc`` / ``speed_acc``.
- :func:`load_classifier` / :func:`train_classifier`: the evaluator itself.

Cache: ``$SELFFLOW_CACHE``, else ``$XDG_CACHE_HOME/selfflow``, else ``~/.cache/selfflow``, then
``word_classifier/v<version>/<settings hash>/`` holding ``classifier.pt`` (a ``state_dict``)
and ``classifier.json`` (settings, SHA-256, accuracies), kept by the core's
:class:`~selfflow_core.EvaluatorCache`. A cached file whose hash differs from its record is an
error (delete the folder to rebuild): scores made with another evaluator are not comparable.
Training is deterministic on one machine and thread count; another CPU or torch version may fit
other (equally good) weights, which the SHA-256 tells apart.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor, nn

from selfflow_audio.features import mel_to_hz
from selfflow_audio.words import (
    COMBINATIONS,
    PITCHES,
    SPEEDS,
    VOCABULARY,
    SpokenWordsSource,
    parse_prompt,
    triples,
)
from selfflow_core import EvaluatorCache, EvaluatorCacheError, settings_key
from selfflow_core import weights_sha256 as weights_sha256

CACHE_VERSION = 1
#: the spectrum below this (Hz) is what the pitch discriminant reads
PITCH_BAND_HZ = 1000.0
#: voiced frames of the pitch features: within this many dB of the loudest low band frame
PITCH_FRAMES_DB = 10.0
#: voiced frames of the duration: within this many dB of the loudest frame
VOICED_DB = 25.0


class ClassifierCacheError(EvaluatorCacheError):
    """A cached evaluator whose weights do not match their recorded SHA-256 (or settings)."""


#: where evaluators are cached: ``word_classifier/v<version>/<settings hash>/classifier.{pt,json}``
CLASSIFIER_CACHE = EvaluatorCache(kind="word_classifier", version=CACHE_VERSION,
                                  stem="classifier", name="spoken-word evaluator",
                                  error=ClassifierCacheError, verb="fit", gerund="fitting")


# ---- settings ---------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class ClassifierConfig:
    """How the evaluator is made (all of it is hashed into its cache folder).

    - ``sample_rate`` / ``n_fft`` / ``hop`` / ``n_mels`` / ``frames`` / ``shift`` / ``scale`` /
      ``log_eps``: the log-mel latents it reads (the audio modality's; see :meth:`for_audio`).
    - ``seed``: initialisation, batch order and augmentation; its clips are the ``evaluator``
      stream under this seed (never a training source's stream).
    - ``clips_per_triple``: training clips per ``(word, pitch, speed)`` triple (120 triples).
    - ``steps`` / ``batch`` / ``lr``: AdamW, cosine decay; ``width``: the CNN's width.
    - ``noise``: the largest std of the Gaussian noise added to training latents; ``shift_frames``
      / ``gain``: the largest random time shift (frames, either way) and level change (nepers of
      power).
    - ``eval_clips``: clips of each split (``train``, ``heldout``; seed 0) the ceiling is
      measured on.
    """

    sample_rate: int = 16000
    n_fft: int = 512
    hop: int = 128
    n_mels: int = 32
    frames: int = 128
    shift: float = -4.0
    scale: float = 4.0
    log_eps: float = 1e-3
    seed: int = 1
    clips_per_triple: int = attrs.field(default=12, validator=v.ge(2))
    steps: int = attrs.field(default=1500, validator=v.ge(1))
    batch: int = attrs.field(default=64, validator=v.ge(1))
    lr: float = attrs.field(default=3e-3, validator=v.gt(0))
    width: int = attrs.field(default=48, validator=v.ge(1))
    noise: float = attrs.field(default=0.15, validator=v.ge(0))
    shift_frames: int = attrs.field(default=8, validator=v.ge(0))
    gain: float = attrs.field(default=1.0, validator=v.ge(0))
    eval_clips: int = attrs.field(default=360, validator=v.ge(1))

    @classmethod
    def for_audio(cls, audio: Any, **changes: Any) -> ClassifierConfig:
        """The evaluator of an :class:`~selfflow_audio.AudioModality.Config`'s latents (its
        log-mel analysis and normalisation); a codec's latents have none."""
        enc = audio.encoder
        if getattr(enc, "kind", None) != "logmel":
            raise ValueError(f"the spoken-word evaluator reads log-mel latents; this audio "
                             f"config's encoder is {getattr(enc, 'kind', enc)!r}")
        return cls(sample_rate=audio.sample_rate, n_fft=audio.n_fft, hop=audio.hop,
                   n_mels=audio.n_mels, frames=audio.frames, shift=enc.shift, scale=enc.scale,
                   log_eps=enc.log_eps, **changes)

    @property
    def frame_seconds(self) -> float:
        return self.hop / self.sample_rate

    def settings(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, **attrs.asdict(self),
                "vocabulary": hashlib.sha256(" ".join(VOCABULARY).encode()).hexdigest()[:16],
                "measures": {"pitch_band_hz": PITCH_BAND_HZ, "pitch_frames_db": PITCH_FRAMES_DB,
                             "voiced_db": VOICED_DB}}

    def key(self) -> str:
        return settings_key(self.settings())


# ---- signal measures --------------------------------------------------------------------------

def log_mel(latents: Tensor, config: ClassifierConfig) -> Tensor:
    """Latents ``[B, T, D]`` -> ``log(mel_power + eps)`` (the normalisation undone)."""
    return latents.detach().float().cpu() * config.scale + config.shift


@functools.cache
def pitch_bands(sample_rate: int, n_mels: int) -> int:
    """How many of the lowest mel bands are centred below :data:`PITCH_BAND_HZ` (HTK mels from 0
    Hz to Nyquist, as the encoder's filterbank)."""
    top = 2595.0 * math.log10(1 + sample_rate / 2 / 700.0)
    centres = mel_to_hz(torch.linspace(0, top, n_mels + 2, dtype=torch.float64))[1:-1]
    return max(2, int((centres < PITCH_BAND_HZ).sum()))


def pitch_features(latents: Tensor, config: ClassifierConfig) -> Tensor:
    """``[B, K]``: the log spectrum of the ``K`` bands below 1 kHz, each frame's normalised to
    unit total power (its shape, not its level), averaged over the voiced frames (low-band
    power within :data:`PITCH_FRAMES_DB` of the clip's loudest). A low voice puts its
    fundamental in the lowest bands (below ~120 Hz); a high voice leaves them nearly empty."""
    low = log_mel(latents, config)[..., :pitch_bands(config.sample_rate, config.n_mels)]
    energy = low.logsumexp(-1)
    voiced = (energy >= energy.amax(1, keepdim=True) - PITCH_FRAMES_DB / 10 * math.log(10))
    shape = low - energy[..., None]
    w = voiced.float()[..., None]
    return (shape * w).sum(1) / w.sum(1)


def voiced_seconds(latents: Tensor, config: ClassifierConfig) -> Tensor:
    """``[B]``: seconds of the frames whose power (all bands) is within :data:`VOICED_DB` of the
    clip's loudest frame: how long the word lasts."""
    energy = log_mel(latents, config).logsumexp(-1)
    voiced = energy >= energy.amax(1, keepdim=True) - VOICED_DB / 10 * math.log(10)
    return voiced.sum(1).float() * config.frame_seconds


# ---- the network ------------------------------------------------------------------------------

class WordNet(nn.Module):
    """Latents ``[B, T, D]`` -> 30 word logits: conv (kernel 5) + batch-norm + ReLU stages of
    ``width``, ``width``, ``2 width``, ``2 width`` channels along time (max-pooled by 2 after the
    second and third), max and mean pooled over time, one linear layer. Buffers: the pitch
    discriminant (``pitch_mean`` / ``pitch_std`` / ``pitch_weight`` / ``pitch_bias``) and each
    word's log-duration threshold (``speed_threshold``)."""

    def __init__(self, n_mels: int, width: int, pitch_dims: int) -> None:
        super().__init__()
        w = width

        def stage(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv1d(i, o, 5, padding=2), nn.BatchNorm1d(o), nn.ReLU()]

        self.features = nn.Sequential(*stage(n_mels, w), *stage(w, w), nn.MaxPool1d(2),
                                      *stage(w, 2 * w), nn.MaxPool1d(2), *stage(2 * w, 2 * w))
        self.head = nn.Linear(4 * w, len(VOCABULARY))
        self.register_buffer("pitch_mean", torch.zeros(pitch_dims))
        self.register_buffer("pitch_std", torch.ones(pitch_dims))
        self.register_buffer("pitch_weight", torch.zeros(pitch_dims))
        self.register_buffer("pitch_bias", torch.zeros(()))
        self.register_buffer("speed_threshold", torch.zeros(len(VOCABULARY)))

    def forward(self, latents: Tensor) -> Tensor:
        h = self.features(latents.transpose(1, 2))
        return self.head(torch.cat([h.amax(-1), h.mean(-1)], -1))

    def pitch_score(self, features: Tensor) -> Tensor:
        """``[B]``: > 0 for a high voice."""
        return ((features - self.pitch_mean) / self.pitch_std) @ self.pitch_weight + self.pitch_bias


class Judgement(NamedTuple):
    """What the evaluator heard in each clip: the word, ``"low"`` / ``"high"``, and per word of
    the vocabulary ``"slow"`` / ``"fast"`` (a duration is slow or fast only for a given word;
    ``speed(i, word)`` picks one), with the raw measures."""

    words: list[str]
    pitches: list[str]
    pitch_scores: Tensor
    seconds: Tensor
    log_seconds_over_threshold: Tensor  # [B, V]: > 0 is slow for that word

    def speed(self, i: int, word: str) -> str:
        return "slow" if float(self.log_seconds_over_threshold[i, VOCABULARY.index(word)]) > 0 \
            else "fast"


class Classifier:
    """A fitted :class:`WordNet` and its record (``info``)."""

    def __init__(self, config: ClassifierConfig, net: WordNet, info: dict[str, Any]) -> None:
        self.config, self.net, self.info = config, net.eval(), info

    def _check(self, latents: Tensor) -> Tensor:
        x = torch.as_tensor(latents).detach().float().cpu()
        want = (self.config.frames, self.config.n_mels)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(f"the spoken-word evaluator reads latents [B, {want[0]}, {want[1]}]"
                             f", got {tuple(x.shape)}")
        return x

    @torch.no_grad()
    def logits(self, latents: Tensor, batch: int = 256) -> Tensor:
        x = self._check(latents)
        return torch.cat([self.net(x[i:i + batch]) for i in range(0, len(x), batch)]) \
            if len(x) else torch.zeros(0, len(VOCABULARY))

    @torch.no_grad()
    def judge(self, latents: Tensor) -> Judgement:
        x = self._check(latents)
        words = [VOCABULARY[i] for i in self.logits(x).argmax(-1).tolist()]
        scores = self.net.pitch_score(pitch_features(x, self.config))
        seconds = voiced_seconds(x, self.config)
        over = seconds.clamp_min(1e-3).log()[:, None] - self.net.speed_threshold[None]
        return Judgement(words, [PITCHES[int(s > 0)] for s in scores], scores, seconds, over)

    def score(self, latents: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """:func:`prompt_scores` with this evaluator."""
        return prompt_scores(latents, prompts, self)


def prompt_scores(latents: Tensor, prompts: Sequence[str],
                  classifier: Classifier | None = None) -> dict[str, float]:
    """How well clips follow their prompts (:func:`~selfflow_audio.words.parse_prompt`):
    ``word_acc``, the fraction of the clips whose prompt names a vocabulary word that say it;
    ``pitch_acc`` / ``speed_acc``, the same over the prompts naming a pitch / a speed (a speed
    is judged against the prompted word's threshold). A metric no prompt asks for is left out;
    ``*_count`` say how many prompts each is over."""
    if len(latents) != len(prompts):
        raise ValueError(f"{len(latents)} clips for {len(prompts)} prompts")
    classifier = classifier or default_classifier()
    heard = classifier.judge(latents)
    parsed = [parse_prompt(p) for p in prompts]
    out: dict[str, float] = {}
    words = [(i, p) for i, p in enumerate(parsed) if p.word is not None]
    if words:
        out["word_acc"] = sum(heard.words[i] == p.word for i, p in words) / len(words)
        out["word_count"] = len(words)
    pitched = [(i, p) for i, p in enumerate(parsed) if p.pitch is not None]
    if pitched:
        out["pitch_acc"] = sum(heard.pitches[i] == p.pitch for i, p in pitched) / len(pitched)
        out["pitch_count"] = len(pitched)
    timed = [(i, p) for i, p in enumerate(parsed) if p.speed is not None and p.word is not None]
    if timed:
        out["speed_acc"] = sum(heard.speed(i, p.word) == p.speed for i, p in timed) / len(timed)
        out["speed_count"] = len(timed)
    return out


# ---- fitting ----------------------------------------------------------------------------------

def real_latents(config: ClassifierConfig, split: str, count: int, *, seed: int,
                 stream: str | None = None, cache_dir: str | Path | None = None
                 ) -> tuple[Tensor, dict[str, np.ndarray]]:
    """``count`` real clips of ``split`` (``stream``, ``seed``) as the evaluator's latents, and
    the source's raw arrays (``labels``, ``pitch``, ``speed``)."""
    from selfflow_audio.adapter import AudioModality
    from selfflow_audio.encoders import LogMelEncoder

    audio = AudioModality.Config(
        sample_rate=config.sample_rate, n_fft=config.n_fft, hop=config.hop,
        n_mels=config.n_mels, frames=config.frames, classes=0,
        encoder=LogMelEncoder.Config(shift=config.shift, scale=config.scale,
                                     log_eps=config.log_eps)).build()
    src = SpokenWordsSource(split, count=count, samples=audio.clip_samples,
                            sample_rate=config.sample_rate, seed=seed, stream=stream,
                            cache_dir=cache_dir)
    raw = src.read(0, count)
    return torch.from_numpy(audio.encode(raw)["latents"]), raw


def _fit_pitch(features: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logistic regression (L-BFGS, a light L2 penalty) of ``high`` on standardised features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-4)
    x, y = (features - mean) / std, high.float()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y.double()
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, w.detach().float(), b.detach().float()


def _fit_speed(seconds: Tensor, labels: Tensor, fast: Tensor) -> Tensor:
    """Per word: the midpoint of its slow and fast clips' mean log durations."""
    logs = seconds.clamp_min(1e-3).log()
    out = torch.zeros(len(VOCABULARY))
    for k in range(len(VOCABULARY)):
        slow, quick = logs[(labels == k) & (fast == 0)], logs[(labels == k) & (fast == 1)]
        if not (len(slow) and len(quick)):
            raise ValueError(f"no slow or no fast clip of {VOCABULARY[k]!r} to fit the speed "
                             f"threshold on")
        out[k] = 0.5 * (slow.mean() + quick.mean())
    return out


def _augment(x: Tensor, config: ClassifierConfig, floor: float, g: torch.Generator) -> Tensor:
    """Random time shifts (silence fills in), level changes and Gaussian noise."""
    b, t, _ = x.shape
    if config.shift_frames:
        shifts = torch.randint(-config.shift_frames, config.shift_frames + 1, (b,), generator=g)
        idx = torch.arange(t)[None] - shifts[:, None]
        valid = (idx >= 0) & (idx < t)
        x = torch.where(valid[..., None], x.gather(1, idx.clamp(0, t - 1)[..., None]
                                                   .expand_as(x)), torch.full_like(x, floor))
    gain = (torch.rand((b, 1, 1), generator=g) * 2 - 1) * config.gain / config.scale
    std = torch.rand((b, 1, 1), generator=g) * config.noise
    return x + gain + std * torch.randn(x.shape, generator=g)


def ceiling(classifier: Classifier, count: int, cache_dir: str | Path | None = None
            ) -> dict[str, Any]:
    """The evaluator's scores on ``count`` real clips of each split (seed 0, the clips a run
    trains on and the held-out triples its evaluation prompts ask for), prompted with their
    first caption in a template naming both attributes; and on the same clips against shifted
    prompts (another word) and on Gaussian noise."""
    from selfflow_audio.words import FULL_TEMPLATES, Prompt, caption

    out: dict[str, Any] = {}
    for split in ("train", "heldout"):
        latents, raw = real_latents(classifier.config, split, count, seed=0, cache_dir=cache_dir)
        prompts = [caption(FULL_TEMPLATES[i % len(FULL_TEMPLATES)],
                           Prompt(VOCABULARY[y], PITCHES[p], SPEEDS[s]))
                   for i, (y, p, s) in enumerate(zip(raw["labels"], raw["pitch"], raw["speed"]))]
        out[split] = classifier.score(latents, prompts)
        if split == "heldout":
            shifted = prompts[7:] + prompts[:7]  # 7 words on: never the same word (30 words)
            out["mismatched_word"] = {"word_acc": classifier.score(latents, shifted)["word_acc"]}
            g = torch.Generator().manual_seed(12345)
            noise = torch.randn(latents.shape, generator=g)
            out["noise"] = {"word_acc": classifier.score(noise, prompts)["word_acc"]}
    return out


def train_classifier(config: ClassifierConfig = ClassifierConfig(),
                     cache_dir: str | Path | None = None) -> Classifier:
    """Fit an evaluator from scratch (deterministic given the seed, on one machine and thread
    count); ``info`` holds its settings, training accuracy and time, and the ceiling.
    ``cache_dir``: where the spoken clips are cached (the default cache when ``None``)."""
    start = time.monotonic()
    count = config.clips_per_triple * len(triples("all"))
    x, raw = real_latents(config, "all", count, seed=config.seed, stream="evaluator",
                          cache_dir=cache_dir)
    labels = torch.from_numpy(raw["labels"])
    torch.manual_seed(config.seed)  # the initial weights
    net = WordNet(config.n_mels, config.width, pitch_bands(config.sample_rate, config.n_mels))
    mean, std, w, b = _fit_pitch(pitch_features(x, config), torch.from_numpy(raw["pitch"]))
    net.pitch_mean.copy_(mean)
    net.pitch_std.copy_(std)
    net.pitch_weight.copy_(w)
    net.pitch_bias.copy_(b)
    net.speed_threshold.copy_(_fit_speed(voiced_seconds(x, config), labels,
                                         torch.from_numpy(raw["speed"])))
    floor = (math.log(config.log_eps) - config.shift) / config.scale
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    net.train()
    for _ in range(config.steps):
        idx = torch.randint(0, len(x), (config.batch,), generator=g)
        loss = F.cross_entropy(net(_augment(x[idx], config, floor, g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    classifier = Classifier(config, net, {})
    combos = {f"{p}-{s}": int(((raw["pitch"] == PITCHES.index(p)) &
                               (raw["speed"] == SPEEDS.index(s))).sum()) for p, s in COMBINATIONS}
    heard = classifier.judge(x)
    train = {"word_acc": float(np.mean([a == VOCABULARY[y] for a, y in
                                        zip(heard.words, raw["labels"])])),
             "pitch_acc": float(np.mean([a == PITCHES[p] for a, p in
                                         zip(heard.pitches, raw["pitch"])])),
             "speed_acc": float(np.mean([heard.speed(i, VOCABULARY[y]) == SPEEDS[s] for i, (y, s)
                                         in enumerate(zip(raw["labels"], raw["speed"]))]))}
    classifier.info = {"settings": config.settings(), "clips": count, "combinations": combos,
                       "train": train, "final_loss": float(loss.detach()),
                       "architecture": "WordNet", "words": list(VOCABULARY),
                       "heldout_triples": [list(t) for t in triples("heldout")],
                       "torch": torch.__version__}
    classifier.info["ceiling"] = ceiling(classifier, config.eval_clips, cache_dir)
    classifier.info["train_seconds"] = round(time.monotonic() - start, 1)
    return classifier


def classifier_folder(config: ClassifierConfig, cache_dir: str | Path | None = None) -> Path:
    return CLASSIFIER_CACHE.folder(config.settings(), cache_dir)


def load_classifier(config: ClassifierConfig = ClassifierConfig(),
                    cache_dir: str | Path | None = None, *, progress: bool = True) -> Classifier:
    """The evaluator of ``config`` from the cache (``cache_dir``, else the default cache), fitted
    and cached first if it is not there (its clips are cached there too). Its weights' SHA-256
    is checked against the record (:class:`ClassifierCacheError` if it differs)."""
    return CLASSIFIER_CACHE.load_or_train(
        config.settings(), cache_dir=cache_dir, progress=progress,
        train=lambda: train_classifier(config, cache_dir),
        empty=lambda: WordNet(config.n_mels, config.width,
                              pitch_bands(config.sample_rate, config.n_mels)),
        wrap=lambda net, info: Classifier(config, net, info))


@functools.cache
def classifier_for(config: ClassifierConfig) -> Classifier:
    """The evaluator of ``config`` in the default cache, loaded once per process."""
    return load_classifier(config)


def default_classifier() -> Classifier:
    """The evaluator of the default audio settings (:class:`ClassifierConfig` defaults)."""
    return classifier_for(ClassifierConfig())


def judge(latents: Tensor, classifier: Classifier | None = None) -> Judgement:
    """What the evaluator (default: :func:`default_classifier`) hears in latents ``[B, T, D]``."""
    return (classifier or default_classifier()).judge(latents)
