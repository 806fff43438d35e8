"""Frozen pretrained text encoders from local Hugging Face model directories.

Three kinds, one behaviour:

- ``t5``: ``T5EncoderModel`` (``MT5EncoderModel``, ``UMT5EncoderModel`` for those model types; a
  full encoder-decoder checkpoint loads too, without its decoder);
- ``clip``: ``CLIPTextModel``; its pooled output (the final hidden state at the EOS token) is
  ``TextEncoding.pooled``;
- ``auto``: any ``AutoModel``; ``pooled`` is its ``pooler_output`` when it has one (BERT), unless
  the checkpoint lacks the pooler's weights.

A checkpoint whose weights do not fill the model (other than a missing pooler) is refused rather
than completed with random weights, and ``t5``/``clip`` check config.json's ``model_type``.

Each loads the tokenizer with ``AutoTokenizer`` and the model from ``path``, a local directory as
``save_pretrained`` writes it, **never** from the Hub: ``local_files_only=True`` and
``HF_HUB_OFFLINE=1`` while loading, and the path must be an existing directory before
transformers sees it (a Hub id such as ``t5-small`` is refused with the same one-line error as a
missing directory). The model runs in float32 with gradients off (``trainable = False``); the
embeddings are stored in ``dtype``.

Captions are tokenized with the model's own special tokens, padded on the right (or truncated) to
``max_length``; the mask is the tokenizer's attention mask (special tokens count as real tokens)
and the embeddings at padding positions are exactly zero. The empty prompt ``""`` is the null
prompt of classifier-free guidance; these encoders give it as mask all False, embeddings and
pooled vector zero (the model is not run on it; like diffusers' ``force_zeros_for_empty_prompt``),
as the byte-level encoder does. The core keeps whatever an encoder gives for ``""`` in the
store's schema, once, and uses it for caption dropout and guidance alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from attrs import validators as v

from selfflow_core import (
    ConfigError,
    SelfFlowError,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    TextSpec,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the top-level files of a model directory that the version hash covers besides the weights:
#: config.json, the tokenizer's files (tokenizer.json, vocab.json, merges.txt, spiece.model, ...)
HASHED_SUFFIXES = (".json", ".txt", ".model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
EXPECTED = ("a local directory written by save_pretrained (config.json, model weights as "
            "*.safetensors or pytorch_model*.bin, and the tokenizer's files)")


class ModelDirError(SelfFlowError, FileNotFoundError):
    """A text encoder's ``path`` is not a local directory holding a saved model and tokenizer (or
    they cannot be loaded from it); the message names the path and what was expected."""

    def __init__(self, kind: str, path: str, reason: str) -> None:
        self.kind, self.path, self.reason = kind, path, reason
        super().__init__(f"text encoder {kind!r}: path {path!r} {reason}")

    def __reduce__(self):
        return (type(self), (self.kind, self.path, self.reason))


def weight_files(directory: Path) -> list[Path]:
    """The weight files transformers loads from ``directory``: its ``*.safetensors`` files, else
    its ``*.bin`` files (sorted by name)."""
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == suffix)
        if found:
            return found
    return []


def model_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a usable model directory (one line, naming what was expected), or
    None. Looks only at the file names: cheap enough for ``problems()``."""
    if not path:
        return f"is empty; expected {EXPECTED}"
    p = Path(path).expanduser()
    if not p.exists():
        return f"does not exist; expected {EXPECTED} (models are never downloaded)"
    if not p.is_dir():
        return f"is not a directory; expected {EXPECTED}"
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not weight_files(p):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        missing.append("a tokenizer (tokenizer_config.json or tokenizer.json)")
    if missing:
        return f"has no {', no '.join(missing)}; expected {EXPECTED}"
    return None


def model_dir_version(directory: Path) -> str:
    """SHA-256 over the names and contents of ``directory``'s config, tokenizer and weight files
    (:data:`HASHED_SUFFIXES` plus :func:`weight_files`, top level only): deterministic, and it
    changes when any of them does. Reads every weight byte once (about a second per GB)."""
    files = {p for p in directory.iterdir() if p.is_file() and p.suffix in HASHED_SUFFIXES}
    files.update(weight_files(directory))
    total = hashlib.sha256()
    for p in sorted(files, key=lambda f: f.name):
        one = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                one.update(block)
        total.update(f"{p.name}\0{p.stat().st_size}\0{one.hexdigest()}\n".encode())
    return total.hexdigest()


def read_model_config(directory: Path) -> dict:
    """``directory``'s config.json (a full CLIP checkpoint's ``text_config`` merged over it);
    an unreadable one is ``{}``."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("text_config"), Mapping):
        data = {**data, **data["text_config"], "model_type": data.get("model_type")}
    return data


def model_type_problem(directory: Path, model_classes: Mapping[str, str]) -> str | None:
    """Why the model in ``directory`` is not one ``model_classes`` loads, or None (also None
    when ``model_classes`` is empty: any model)."""
    if not model_classes:
        return None
    model_type = read_model_config(directory).get("model_type")
    if model_type in model_classes:
        return None
    return (f"holds a model of type {model_type!r} (config.json model_type); expected one of "
            f"{sorted(model_classes)} (kind 'auto' loads any model)")


def positions_limit(directory: Path) -> int | None:
    """The model's absolute-position limit from its config.json (None: none or unreadable)."""
    data = read_model_config(directory)
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(data.get(key), int) and data[key] > 0:
            return data[key]
    return None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub access off (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``) and transformers' progress
    bars quiet, for the duration of a load; the previous settings come back after it."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    finally:
        for k, value in saved.items():
            if value is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = value


def _device_ok(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{attribute.name}: not a torch device: {value!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{attribute.name}: must be 'cpu' or 'cuda[:N]', got {value!r}")


class PretrainedTextEncoder(TextEncoder):
    """A frozen transformers model and its tokenizer: captions -> ``embeddings`` [B, L, D] (the
    last hidden state, zero at padding), ``mask`` [B, L] and, where the model pools, ``pooled``
    [B, P]. Subclasses name the model class; see the module doc for the details."""

    trainable = False
    #: whether this kind reports the model's ``pooler_output`` as ``pooled``
    uses_pooler: ClassVar[bool] = True

    @attrs.frozen(kw_only=True)
    class Config(TextEncoderConfig):
        """``path``: the local model directory; ``max_length``: tokens per caption (padded or
        truncated to it); ``dtype``: of the stored embeddings; ``device``: where the model runs;
        ``batch_size``: captions per forward pass in ``encode``."""

        #: config.json's ``model_type`` -> the ``transformers`` class that loads it (empty: any
        #: model type, loaded with ``AutoModel``)
        model_classes: ClassVar[Mapping[str, str]] = {}

        path: str = attrs.field(default="", validator=v.instance_of(str))
        max_length: int = attrs.field(default=128, validator=[v.instance_of(int), v.ge(1)])
        dtype: str = attrs.field(default="float32", validator=v.in_(tuple(DTYPES)))
        device: str = attrs.field(default="cpu", validator=[v.instance_of(str), _device_ok])
        batch_size: int = attrs.field(default=32, validator=[v.instance_of(int), v.ge(1)])

        def problems(self) -> list[str]:
            problem = model_dir_problem(self.path)
            if problem is None:
                problem = model_type_problem(Path(self.path).expanduser(), self.model_classes)
            if problem is not None:
                return [f"path: {self.path!r} {problem}"]
            limit = positions_limit(Path(self.path).expanduser())
            if limit is not None and self.max_length > limit:
                return [f"max_length: {self.max_length} exceeds the {limit} positions of the "
                        f"model in {self.path!r}"]
            return []

    def __init__(self, config: PretrainedTextEncoder.Config) -> None:
        self.config = config
        problem = model_dir_problem(config.path)
        if problem is None:
            problem = model_type_problem(Path(config.path).expanduser(), config.model_classes)
        if problem is not None:
            raise ModelDirError(config.kind, config.path, problem)
        others = config.problems()
        if others:
            raise ConfigError(others, source=f"text encoder {config.kind!r}")
        self.directory = Path(config.path).expanduser().resolve()
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError([f"device: {config.device!r}, but CUDA is not available here"],
                              source=f"text encoder {config.kind!r}")
        self.tokenizer, self.model = self._load()
        self._version: str | None = None
        # one tiny forward pass tells the width and whether (and how wide) the model pools
        probe = self._forward(["a"], pad_to=None)
        self.dim = int(probe[1].shape[-1])
        self.pooled_dim = int(probe[2].shape[-1]) if probe[2] is not None else 0

    # ---- loading ----------------------------------------------------------------------------

    def _fail(self, reason: str) -> ModelDirError:
        return ModelDirError(self.config.kind, self.config.path, reason)

    def _model_class_name(self) -> str:
        if not self.config.model_classes:
            return "AutoModel"
        model_type = read_model_config(self.directory).get("model_type")
        return self.config.model_classes[model_type]  # (checked in __init__)

    def _load(self) -> tuple[Any, torch.nn.Module]:
        path, name = str(self.directory), self._model_class_name()
        with offline():
            import transformers

            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                model, loading = getattr(transformers, name).from_pretrained(
                    path, local_files_only=True, dtype=torch.float32, output_loading_info=True)
            except Exception as exc:  # transformers' many kinds: one line naming the path
                text = str(exc).strip()
                first = text.splitlines()[0] if text else type(exc).__name__
                raise self._fail(f"could not be loaded as {name} with its tokenizer: "
                                 f"{first}") from exc
        # weights the checkpoint lacks are random: refuse them, except an absent pooler (a
        # BERT saved without one), which only turns the pooled output off
        missing = sorted(loading.get("missing_keys", ()))
        self._pooler_missing = any(k.split(".")[0] == "pooler" for k in missing)
        missing = [k for k in missing if k.split(".")[0] != "pooler"]
        mismatched = sorted(str(k) for k in loading.get("mismatched_keys", ()))
        if missing or mismatched:
            bad = missing or mismatched
            raise self._fail(f"has weights that do not fit {name}: {len(bad)} "
                             f"{'missing' if missing else 'of another shape'} (e.g. {bad[0]}); "
                             f"expected a checkpoint of this architecture")
        if tokenizer.pad_token_id is None:
            raise self._fail("has a tokenizer without a pad token; expected one (padding to "
                             "max_length needs it)")
        tokenizer.padding_side = "right"
        model.requires_grad_(False)
        model.eval()
        return tokenizer, model.to(self.device)

    # ---- the interface ----------------------------------------------------------------------

    def spec(self) -> TextSpec:
        return TextSpec(max_length=self.config.max_length, dim=self.dim,
                        pooled_dim=self.pooled_dim)

    def encode(self, captions: Sequence[str]) -> TextEncoding:
        """``captions`` -> mask [B, L] bool, embeddings [B, L, D] in ``dtype`` (zero at padding)
        and ``pooled`` [B, P] (or None), on the CPU; the model runs on the non-empty captions,
        ``batch_size`` at a time. ``""`` is the empty prompt: mask all False, zeros."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a sequence of captions, not one string")
        captions = [str(c) for c in captions]
        dtype, length, n = DTYPES[self.config.dtype], self.config.max_length, len(captions)
        mask = torch.zeros(n, length, dtype=torch.bool)
        embeddings = torch.zeros(n, length, self.dim, dtype=dtype)
        pooled = torch.zeros(n, self.pooled_dim, dtype=dtype) if self.pooled_dim else None
        rows = [i for i, c in enumerate(captions) if c]
        step = self.config.batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            m, hidden, pool = self._forward([captions[i] for i in chunk], pad_to=length)
            mask[chunk] = m.cpu()
            embeddings[chunk] = hidden.to(dtype).cpu()
            if pooled is not None:
                pooled[chunk] = pool.to(dtype).cpu()
        return TextEncoding(mask=mask, embeddings=embeddings, pooled=pooled)

    def info(self) -> dict:
        import transformers

        if self._version is None:
            self._version = model_dir_version(self.directory)
        return {"name": f"{self.config.kind}:{type(self.model).__name__}",
                "version": self._version, "version_of": "sha256 of config, tokenizer and weights",
                "max_length": self.config.max_length, "dtype": self.config.dtype,
                "dim": self.dim, "pooled_dim": self.pooled_dim,
                "transformers": transformers.__version__}

    # ---- internals --------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, captions: list[str], pad_to: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mask bool, hidden float32 zeroed at padding, pooled float32 or None) of one batch,
        padded to ``pad_to`` (None: to the longest caption)."""
        if pad_to is None:
            tokens = self.tokenizer(captions, padding=True, return_tensors="pt")
        else:
            tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                    max_length=pad_to, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ModelDirError(self.config.kind, self.config.path,
                                f"holds a {type(self.model).__name__}, which returns no "
                                f"last_hidden_state; expected a text encoder model")
        hidden = hidden.float().masked_fill(~mask[..., None], 0.0)
        pool = (getattr(out, "pooler_output", None)
                if self.uses_pooler and not self._pooler_missing else None)
        if pool is not None:
            pool = pool.float().reshape(pool.shape[0], -1)
        return mask, hidden, pool


class T5TextEncoder(PretrainedTextEncoder):
    """``T5EncoderModel`` + its tokenizer: the last hidden state and the mask (no pooled)."""

    uses_pooler = False

    @attrs.frozen(kw_only=True)
    class Config(PretrainedTextEncoder.Config):
        __doc__ = PretrainedTextEncoder.Config.__doc__
        kind = "t5"
        model_classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
                         "umt5": "UMT5EncoderModel"}

        def build(self) -> T5TextEncoder:
            return T5TextEncoder(self)


class CLIPTextEncoder(PretrainedTextEncoder):
    """``CLIPTextModel`` + its tokenizer: the last hidden state, the mask and the pooled output
    (the final hidden state at the EOS token) as ``pooled``."""

    @attrs.frozen(kw_only=True)
    class Config(PretrainedTextEncoder.Config):
        __doc__ = PretrainedTextEncoder.Config.__doc__
        kind = "clip"
        model_classes = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}
        max_length: int = attrs.field(default=77, validator=[v.instance_of(int), v.ge(1)])

        def build(self) -> CLIPTextEncoder:
            return CLIPTextEncoder(self)


class AutoTextEncoder(PretrainedTextEncoder):
    """Any ``AutoModel`` + ``AutoTokenizer``: the last hidden state and the mask, and
    ``pooler_output`` as ``pooled`` when the model returns one."""


    @attrs.frozen(kw_only=True)
    class Config(PretrainedTextEncoder.Config):
        __doc__ = PretrainedTextEncoder.Config.__doc__
        kind = "auto"

        def build(self) -> AutoTextEncoder:
            return AutoTextEncoder(self)
