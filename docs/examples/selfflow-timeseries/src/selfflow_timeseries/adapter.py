"""The timeseries modality: multichannel 1-D signals ``[C, L]`` -> patch tokens along time.

Offline, a :class:`~selfflow_core.Source` yields signals ``[n, C, L]`` and labels
(the built-in ``sensors`` source makes them up deterministically; a ``.npy``/``.npz`` path reads
your own) and :meth:`TimeseriesModality.encode` scales them into the ``latents`` field. Online,
:meth:`TimeseriesModality.tokenize` cuts every signal into ``patch`` consecutive time steps per
token (all channels of a patch in one token) with the token's index as its 1-D position, and
:meth:`TimeseriesModality.detokenize` puts them back (both with the helpers of
:mod:`selfflow_core.tokens`). Samples are written as ``samples.npz`` and an SVG plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from selfflow_core import (
    DualTimestep,
    FieldSpec,
    ModalityAdapter,
    ModalityConfig,
    Source,
    TokenBatch,
    Uniform,
)
from selfflow_core.tokens import (
    class_labels,
    expand_batch,
    grid_positions,
    latent_fields,
    patchify,
    unpatchify,
)
from torch import Tensor

#: line colours of the SVG plot, one per channel (cycled)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


class SensorSource(Source):
    """``count`` synthetic sensor recordings, deterministic and indexable (so encoding resumes).

    Sample ``i`` has class ``k = i % patterns``. Channel ``c`` is a sum of two sinusoids with
    ``1 + k`` and ``2 + k + c`` cycles per window, amplitudes and a phase drawn per sample from a
    generator seeded by ``(seed, i)``, plus Gaussian noise of standard deviation ``noise``.
    """

    def __init__(self, count: int, channels: int, length: int, patterns: int, noise: float,
                 seed: int) -> None:
        self.count, self.channels, self.length = count, channels, length
        self.patterns, self.noise, self.seed = patterns, noise, seed
        self.description = (f"synthetic sensors: {count} x {channels} ch x {length} steps, "
                            f"{patterns} classes, noise {noise}, seed {seed}")

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        n, c, length = stop - start, self.channels, self.length
        signals = np.empty((n, c, length), dtype=np.float32)
        labels = np.arange(start, stop, dtype=np.int64) % self.patterns
        t = np.arange(length) / length
        ch = np.arange(c)[:, None]
        for j, i in enumerate(range(start, stop)):
            rng = np.random.default_rng([self.seed, i])
            k = labels[j]
            a1, a2 = rng.uniform(0.5, 1.0, (c, 1)), rng.uniform(0.1, 0.4, (c, 1))
            phase = rng.uniform(0, 2 * np.pi) + ch * np.pi / c
            wave = (a1 * np.sin(2 * np.pi * (1 + k) * t + phase)
                    + a2 * np.sin(2 * np.pi * (2 + k + ch) * t + 2 * phase))
            signals[j] = wave + rng.normal(0, self.noise, (c, length))
        return {"signals": signals, "labels": labels}


class ArraySource(Source):
    """Your recordings from a file: a ``.npy`` array ``[N, C, L]``, or a ``.npz`` with
    ``signals`` ``[N, C, L]`` and optionally ``labels`` ``[N]`` (default: all 0)."""

    def __init__(self, path: str | Path, channels: int, length: int) -> None:
        self.path = Path(path).expanduser()
        if self.path.suffix == ".npz":
            with np.load(self.path) as data:
                if "signals" not in data:
                    raise ValueError(f"{self.path}: a .npz source needs a 'signals' array "
                                     f"(found {sorted(data.files)})")
                self.signals = np.asarray(data["signals"])
                labels = data.get("labels")
        else:
            self.signals, labels = np.load(self.path, mmap_mode="r"), None
        if self.signals.ndim != 3 or self.signals.shape[1:] != (channels, length):
            raise ValueError(f"{self.path}: signals have shape {self.signals.shape}, expected "
                             f"[N, {channels}, {length}] (channels, length of the config)")
        n = len(self.signals)
        self.labels = (np.zeros(n, dtype=np.int64) if labels is None
                       else np.asarray(labels, dtype=np.int64).reshape(n))
        self.description = f"signals from {self.path}: {n} x {channels} ch x {length} steps"

    def __len__(self) -> int:
        return len(self.signals)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {"signals": np.array(self.signals[start:stop], dtype=np.float32),
                "labels": self.labels[start:stop].copy()}


def plot_svg(signals: np.ndarray, labels: np.ndarray | None, path: Path, *,
             columns: int = 4) -> Path:
    """Write signals ``[B, C, L]`` as an SVG grid of small line plots (one colour per channel),
    labelled with their class; no plotting library needed."""
    b, c, length = signals.shape
    w, h, pad = 240, 90, 6
    cols = max(1, min(columns, b))
    rows = -(-b // cols)
    top = float(np.abs(signals).max()) or 1.0
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * w}" height="{rows * h}" '
              f'font-family="sans-serif" font-size="11">'),
             f'<rect width="{cols * w}" height="{rows * h}" fill="white"/>']
    xs = pad + np.arange(length) / max(length - 1, 1) * (w - 2 * pad)
    for i in range(b):
        x0, y0 = (i % cols) * w, (i // cols) * h
        parts.append(f'<rect x="{x0 + 1}" y="{y0 + 1}" width="{w - 2}" height="{h - 2}" '
                     f'fill="none" stroke="#ccc"/>')
        for ch in range(c):
            ys = h / 2 - signals[i, ch] / top * (h / 2 - pad)
            points = " ".join(f"{x0 + x:.1f},{y0 + y:.1f}" for x, y in zip(xs, ys, strict=True))
            parts.append(f'<polyline points="{points}" fill="none" stroke-width="1" '
                         f'stroke="{COLOURS[ch % len(COLOURS)]}"/>')
        if labels is not None:
            parts.append(f'<text x="{x0 + pad}" y="{y0 + 13}">class {int(labels[i])}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


class TimeseriesModality(ModalityAdapter):
    """Multichannel 1-D signals as tokens of ``patch`` time steps x all channels, positioned by
    their index along time."""

    name = "timeseries"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """- ``length``: time steps per signal; a multiple of ``patch``.
        - ``channels``: signals per sample (e.g. the axes of an accelerometer).
        - ``patch``: time steps per token (``token_dim = channels * patch``).
        - ``classes``: number of class labels (0: unconditional); the null class is ``classes``.
        - ``count``, ``noise``, ``seed``: size, noise level and seed of the ``sensors`` source.
        - ``scale``: stored latents are ``scale * signal`` (bring your data to about unit scale).
        """

        kind = "timeseries"
        length: int = attrs.field(default=64, validator=v.ge(1))
        channels: int = attrs.field(default=3, validator=v.ge(1))
        patch: int = attrs.field(default=4, validator=v.ge(1))
        classes: int = attrs.field(default=4, validator=v.ge(0))
        count: int = attrs.field(default=2048, validator=v.ge(1))
        noise: float = attrs.field(default=0.05, validator=v.ge(0))
        scale: float = attrs.field(default=1.0, validator=v.gt(0))
        seed: int = 0

        @length.validator
        def _check_length(self, attribute: Any, value: int) -> None:
            patch = getattr(self, "patch", 1)  # validators may run before `patch` is set
            if value % patch:
                raise ValueError(f"'length' must be a multiple of patch {patch} (got {value})")

        def default_scheduler(self) -> DualTimestep.Config:
            """The timesteps of a run that names no scheduler: t and s from uniform p(t), and a
            quarter of the tokens take s (the paper: 0.25 images, 0.1 video, 0.5 audio)."""
            return DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25)

        def build(self) -> TimeseriesModality:
            return TimeseriesModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens per signal: ``length / patch``."""
        return self.config.length // self.config.patch

    @property
    def token_dim(self) -> int:
        return self.config.channels * self.config.patch

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def fields(self) -> Mapping[str, FieldSpec]:
        # float32 latents [channels, length] and int64 labels (all 0 when unconditional)
        return latent_fields((self.config.channels, self.config.length))

    def encoder_info(self) -> Mapping[str, Any]:
        return {"name": "scale", "version": "1", "settings": {"scale": self.config.scale}}

    def normalization(self) -> Mapping[str, Any]:
        return {"scale": self.config.scale, "shift": 0.0}

    # ---- offline ------------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return ("sensors",)

    def open_source(self, source: str) -> Source:
        c = self.config
        if source == "sensors":
            return SensorSource(c.count, c.channels, c.length, c.classes or 1, c.noise, c.seed)
        if Path(source).expanduser().is_file():
            return ArraySource(source, c.channels, c.length)
        raise ValueError(f"timeseries modality: unknown source {source!r}; built-in sources: "
                         f"sensors, or a path to a .npy/.npz file of signals [N, C, L]")

    def encode(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        signals = np.asarray(raw["signals"], dtype=np.float32)
        return {"latents": (signals * np.float32(self.config.scale)).astype(np.float32),
                "labels": np.asarray(raw["labels"], dtype=np.int64)}

    # ---- online -------------------------------------------------------------------------------

    def _positions(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        # [B, N, 1]: each token's index along time
        return expand_batch(grid_positions(self.num_tokens, device=device), n)

    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        x = fields["latents"].float()  # [B, C, L]
        # one token per `patch` time steps, all channels: [B, L / patch, C * patch], the values
        # of a token channel by channel
        tokens = patchify(x, (self.config.patch,))
        return TokenBatch.single(tokens, self._positions(x.shape[0], x.device),
                                 labels=class_labels(fields, self.num_classes))

    def detokenize(self, tokens: Tensor) -> Tensor:
        c = self.config
        return unpatchify(tokens, (c.patch,), (c.channels, c.length))  # exact inverse

    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        return TokenBatch.single(torch.zeros(n, self.num_tokens, self.token_dim),
                                 self._positions(n))

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        signals = latents.detach().float().cpu().numpy() / self.config.scale
        lab = None if labels is None else labels.detach().cpu().numpy()
        npz = out_dir / "samples.npz"
        np.savez(npz, signals=signals, **({} if lab is None else {"labels": lab}))
        return [npz, plot_svg(signals, lab, out_dir / "samples.svg")]
