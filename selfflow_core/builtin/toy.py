"""A toy modality that ships with the core: short 1-D sequences of class-dependent waves.

It exists so the core runs and is tested with no modality plugin installed, and as the smallest
complete example of a :class:`~selfflow_core.interfaces.ModalityAdapter`.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch
from attrs import validators as v

from selfflow_core.interfaces import FieldSpec, ModalityAdapter, ModalityConfig, Source
from selfflow_core.prompts import CAPTIONS
from selfflow_core.types import TokenBatch


class WaveSource(Source):
    """``count`` deterministic samples: token ``i`` of class ``k`` is a wave of frequency ``k + 1``
    across channels, phase-shifted along the sequence, plus small noise."""

    def __init__(self, count: int, tokens: int, channels: int, classes: int, seed: int,
                 captions: int = 0) -> None:
        self.count, self.tokens, self.channels, self.classes = count, tokens, channels, classes
        self.seed, self.captions = seed, captions
        self.description = f"toy waves: {count} x {tokens} tokens x {channels} ch, seed {seed}"

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        idx = np.arange(start, stop)
        labels = idx % self.classes
        rng = [np.random.default_rng([self.seed, int(i)]) for i in idx]
        phase = np.array([r.uniform(0, 2 * np.pi) for r in rng])
        i = np.arange(self.tokens)[None, :, None]
        c = np.arange(self.channels)[None, None, :]
        waves = np.sin((labels[:, None, None] + 1) * (c / self.channels * 2 * np.pi + 0.3 * i)
                       + phase[:, None, None])
        noise = np.stack([r.normal(0, 0.05, (self.tokens, self.channels)) for r in rng])
        out = {"latents": (waves + noise).astype(np.float32), "labels": labels.astype(np.int64)}
        if self.captions:
            out[CAPTIONS] = toy_captions(labels, self.captions)
        return out


#: caption templates of the toy waves (a class in words; the last caption of a sample is "")
TEMPLATES = ("a wave of frequency {}", "{} cycles", "frequency {} waves")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def toy_captions(labels: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` captions naming each sample's frequency (class + 1) in words; with ``k > 1``
    the last one is empty (a missing caption, never drawn)."""
    out = np.empty((len(labels), k), dtype=object)
    for row, label in enumerate(labels):
        word = NUMBERS[int(label) % len(NUMBERS)]
        for j in range(k):
            out[row, j] = "" if k > 1 and j == k - 1 else TEMPLATES[j % len(TEMPLATES)].format(word)
    return out


class ToyModality(ModalityAdapter):
    name = "toy"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        kind = "toy"
        tokens: int = attrs.field(default=16, validator=v.ge(1))
        channels: int = attrs.field(default=8, validator=v.ge(1))
        classes: int = attrs.field(default=4, validator=v.ge(0))
        count: int = attrs.field(default=512, validator=v.ge(1))
        seed: int = 0
        #: captions per sample (0: none; > 0 stores a ``captions`` field naming the frequency
        #: in words, for prompt-conditioned runs)
        captions: int = attrs.field(default=0, validator=v.ge(0))

        def build(self) -> ToyModality:
            return ToyModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def token_dim(self) -> int:
        return self.config.channels

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def fields(self):
        c = self.config
        out = {"latents": FieldSpec(shape=(c.tokens, c.channels), dtype="float32"),
               "labels": FieldSpec(shape=(), dtype="int64")}
        if c.captions:
            out[CAPTIONS] = FieldSpec(shape=(c.captions,), dtype="str")
        return out

    def sources(self):
        return ("waves",)

    def open_source(self, source: str) -> WaveSource:
        if source != "waves":
            raise ValueError(f"toy modality: unknown source {source!r}; sources: waves")
        c = self.config
        return WaveSource(c.count, c.tokens, c.channels, max(c.classes, 1), c.seed, c.captions)

    def encode(self, raw):
        return raw

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.config.tokens, dtype=torch.float32)[None, :, None].expand(n, -1, 1)

    def tokenize(self, fields):
        x = fields["latents"].float()
        labels = fields.get("labels") if self.num_classes else None
        return TokenBatch.single(x, self._positions(x.shape[0]).to(x.device), labels=labels)

    def detokenize(self, tokens):
        return tokens

    def prompt(self, n, fields=None):
        c = self.config
        return TokenBatch.single(torch.zeros(n, c.tokens, c.channels), self._positions(n))

    def evaluation_prompts(self, n):
        """With captions: ``n`` prompts naming frequencies 1..classes in turn."""
        if not self.config.captions:
            return ()
        k = max(self.config.classes, 1)
        return [TEMPLATES[0].format(NUMBERS[i % k]) for i in range(n)]

    def prompt_metrics(self, latents, prompts):
        """``frequency_acc``: the fraction of samples whose strongest frequency across channels
        (averaged over tokens) is the one their prompt names (a fixed evaluator: an FFT)."""
        spectrum = torch.fft.rfft(latents.float(), dim=-1).abs().mean(1)  # [B, C//2 + 1]
        found = spectrum[:, 1:].argmax(-1) + 1
        named = torch.tensor([next(i + 1 for i, w in enumerate(NUMBERS) if w in p.split())
                              for p in prompts])
        return {"frequency_acc": float((found == named).float().mean())}

    def save_samples(self, latents, labels, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "samples.npy"
        np.save(path, latents.detach().cpu().numpy())
        return [path]
