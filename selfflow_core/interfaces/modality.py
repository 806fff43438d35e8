"""Modality adapters: raw data -> stored latents (offline) -> tokens (online) -> samples."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
from torch import Tensor

from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.interfaces.timesteps import SchedulerConfig
from selfflow_core.types import TokenBatch


@attrs.frozen(kw_only=True)
class ModalityConfig(ComponentConfig):
    """Base config of modality adapters; ``build()`` returns a :class:`ModalityAdapter`."""

    def default_scheduler(self) -> SchedulerConfig | None:
        """The timestep scheduler of a :class:`~selfflow_core.ModalitySpec` that names none:
        this modality's paper settings (mask ratio, p(t) and its shift, low-SNR tail), e.g.
        ``DualTimestep.Config(distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
        mask_ratio=0.1)`` for video. ``None`` (the default): the core's
        ``DualTimestep.Config()``, uniform p(t) and mask ratio 0.25 (the paper's images)."""
        return None


@attrs.frozen(kw_only=True)
class FieldSpec:
    """One per-sample array of a latent store: its per-sample ``shape`` and numpy ``dtype``."""

    shape: tuple[int, ...]
    dtype: str


class Source(abc.ABC):
    """A deterministic, indexable raw dataset a modality can encode (so encoding can resume)."""

    description: str = ""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, start: int, stop: int) -> Any:
        """Raw samples ``start:stop`` in the form the adapter's ``encode`` takes."""


class ModalityAdapter(abc.ABC):
    """Everything selfflow needs to know about one modality.

    Offline: :meth:`open_source` + :meth:`encode` produce the arrays of :meth:`fields`, written
    to a zarr store. Online: :meth:`tokenize` turns a batch read from the store into a
    :class:`TokenBatch`; :meth:`detokenize` inverts it for the generated field; :meth:`save_samples`
    writes what a person can look at or listen to.
    """

    #: the registered kind, e.g. ``"image"``
    name: ClassVar[str] = ""
    #: the field that is generated (tokenized/detokenized); others are labels or conditioning
    latent_field: ClassVar[str] = "latents"

    @property
    @abc.abstractmethod
    def token_dim(self) -> int:
        """Channels per token (``C``)."""

    @property
    def token_dims(self) -> tuple[int, ...]:
        """Channels per token of each token kind, for sequences mixing several kinds (audio +
        video): one input/output projection each, kind ``i`` having modality id ``offset + i``.
        One kind by default."""
        return (self.token_dim,)

    @property
    def num_classes(self) -> int:
        """Number of class labels (0: unconditional). Label ``num_classes`` is the null class."""
        return 0

    @abc.abstractmethod
    def fields(self) -> Mapping[str, FieldSpec]:
        """The arrays a store of this modality holds, by name, with per-sample shape and dtype."""

    def encoder_info(self) -> Mapping[str, Any]:
        """Name, version and settings of the encoder that makes the latents (stored in the
        schema)."""
        return {"name": "identity", "version": "1"}

    def normalization(self) -> Mapping[str, Any]:
        """How stored latents relate to model inputs (recorded in the store's schema)."""
        return {"scale": 1.0, "shift": 0.0}

    def sources(self) -> Sequence[str]:
        """Names of the built-in raw datasets :meth:`open_source` accepts."""
        return ()

    @abc.abstractmethod
    def open_source(self, source: str) -> Source:
        """Open raw data by built-in name or path."""

    @abc.abstractmethod
    def encode(self, raw: Any) -> Mapping[str, np.ndarray]:
        """Raw samples -> one array per field, sample axis first."""

    @abc.abstractmethod
    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        """A batch of stored fields (tensors, sample axis first) -> tokens."""

    @abc.abstractmethod
    def detokenize(self, tokens: Tensor) -> Tensor:
        """Tokens [B, N, C] -> the latent field [B, ...] (inverse of :meth:`tokenize`)."""

    @abc.abstractmethod
    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        """A batch to sample into: positions, masks and conditioning tokens for ``n`` samples.
        Generated tokens' values are ignored (they are replaced by noise). ``fields`` supplies
        conditioning (e.g. robot state) for modalities that need it."""

    @abc.abstractmethod
    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """Decode generated latents and write them (PNG, GIF, WAV, ...); return the files."""

    def save_prompt_samples(self, latents: Tensor, labels: Tensor | None,
                            prompts: Sequence[str], out_dir: Path) -> list[Path]:
        """Samples of a prompt-conditioned run, ``prompts[i]`` being sample ``i``'s: override
        to name files after their prompt or show it under its sample; by default
        :meth:`save_samples` (the core writes ``prompts.json`` beside them either way)."""
        return self.save_samples(latents, labels, out_dir)

    # ---- prompt-following evaluation (optional) ---------------------------------------------

    def evaluation_prompts(self, n: int) -> Sequence[str]:
        """``n`` prompts to measure prompt following on (e.g. held-out words); empty (the
        default): the modality has no prompt evaluator."""
        return ()

    def prompt_metrics(self, latents: Tensor, prompts: Sequence[str]) -> Mapping[str, float]:
        """Metrics of generated ``latents`` (the latent field, ``[B, ...]``, as
        :meth:`detokenize` gives) against the ``prompts`` they were generated from, by a fixed
        evaluator (``selfflow evaluate``, and logged with the trainer's samples). Only called
        when :meth:`evaluation_prompts` gives prompts."""
        raise NotImplementedError(f"{type(self).__qualname__} has no prompt evaluator")
