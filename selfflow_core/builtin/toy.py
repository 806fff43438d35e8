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
from selfflow_core.types import TokenBatch


class WaveSource(Source):
    """``count`` deterministic samples: token ``i`` of class ``k`` is a wave of frequency ``k + 1``
    across channels, phase-shifted along the sequence, plus small noise."""

    def __init__(self, count: int, tokens: int, channels: int, classes: int, seed: int) -> None:
        self.count, self.tokens, self.channels, self.classes = count, tokens, channels, classes
        self.seed = seed
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
        return {"latents": (waves + noise).astype(np.float32), "labels": labels.astype(np.int64)}


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
        return {"latents": FieldSpec(shape=(c.tokens, c.channels), dtype="float32"),
                "labels": FieldSpec(shape=(), dtype="int64")}

    def sources(self):
        return ("waves",)

    def open_source(self, source: str) -> WaveSource:
        if source != "waves":
            raise ValueError(f"toy modality: unknown source {source!r}; sources: waves")
        c = self.config
        return WaveSource(c.count, c.tokens, c.channels, max(c.classes, 1), c.seed)

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

    def save_samples(self, latents, labels, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "samples.npy"
        np.save(path, latents.detach().cpu().numpy())
        return [path]
