"""REPA as a :class:`~selfflow_core.interfaces.TeacherStrategy`.

REPA (Yu et al., arXiv 2410.06940) aligns the student's block-``l`` hidden state, seen through a
projection head, to the features a frozen external encoder computes on the *clean* data, with a
negative-cosine loss. In selfflow that is a teacher whose :meth:`REPATeacher.features` ignores the
noisy view and the layer it is given and returns ``encoder(batch.tokens)``; the core's objective
does the rest (per-token cosine over the generated tokens, weight ``objective.gamma``; REPA's
paper uses 0.5) through REPA's own head: :meth:`REPATeacher.projection_head` gives the core REPA's
three-layer projector (:class:`~selfflow_repa.projector.REPAProjector`, hidden 2048 by default),
in place of Self-Flow's two-layer head.

The encoder is configured by a *path*, never by code: a TorchScript archive written with
``torch.jit.save`` (:func:`save_encoder` writes one). Loading it runs no Python pickle and imports
nothing: the archive holds TorchScript IR and tensors, executed by the TorchScript interpreter.
Treat encoder files like any model weights and only use files you trust. The file's SHA-256 is
stored in every checkpoint, and resuming against a different encoder file is an error.

The module must map clean tokens ``[B, N, C]`` (float32) to per-token features
``[B, N, feature_dim]``; it is called once per training step under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import attrs
import torch
from attrs import validators as v
from torch import Tensor, nn

from selfflow_core import Backbone, ConfigError, TeacherConfig, TeacherStrategy
from selfflow_repa.projector import REPA_HIDDEN, REPA_LAYERS, REPAProjector


class EncoderError(ConfigError):
    """The REPA encoder file is missing, is not a TorchScript archive, or gives wrong shapes (a
    :class:`~selfflow_core.ConfigError` at ``$.teacher.encoder``, so ``selfflow`` reports it as a
    user error)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__([f"$.teacher.encoder: {message}"])

    def __reduce__(self):  # picklable (e.g. across a multiprocessing pool) with its message
        return type(self), (self.message,)


def _missing(path: str) -> str | None:
    if Path(path).expanduser().is_file():
        return None
    return (f"encoder file {path!r} does not exist. `teacher.encoder` must be the path of a "
            f"TorchScript module (torch.jit.save; see selfflow_repa.save_encoder) mapping clean "
            f"tokens [B, N, C] to features [B, N, feature_dim]")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.13 marks TorchScript deprecated; it is still the one pickle-free format for a
    whole module (``torch.export.load`` unpickles), so its deprecation warnings are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated",
                                category=DeprecationWarning)
        yield


def save_encoder(module: nn.Module, path: str | Path, example: Tensor | None = None) -> str:
    """Freeze ``module`` (eval, no grad) and write it as TorchScript to ``path``: scripted, or
    traced on ``example`` tokens ``[B, N, C]`` when given. Returns the file's SHA-256."""
    module = module.eval().requires_grad_(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_jit():
        scripted = (torch.jit.trace(module, example) if example is not None
                    else torch.jit.script(module))
        torch.jit.save(scripted, str(path))
    return file_sha256(path)


def load_encoder(path: str | Path) -> nn.Module:
    """Load a frozen TorchScript encoder on the CPU; a clear :class:`EncoderError` otherwise."""
    p = Path(path).expanduser()
    if (problem := _missing(str(path))) is not None:
        raise EncoderError(problem)
    try:
        with _quiet_jit():
            module = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise EncoderError(
            f"{str(p)!r} is not a TorchScript archive ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pickled modules and state dicts are "
            f"not accepted; export the encoder with torch.jit.save") from None
    module.eval()
    for prm in module.parameters():
        prm.requires_grad_(False)
    return module


def _nonempty(instance, attribute, value):
    if not value.strip():
        raise ValueError("'encoder' must be the path of a TorchScript file (got an empty string)")


class REPATeacher(TeacherStrategy):
    """Targets from a frozen external encoder of the clean tokens (no EMA, no teacher network)."""

    @attrs.frozen(kw_only=True)
    class Config(TeacherConfig):
        """- ``encoder``: path of a TorchScript file mapping clean tokens ``[B, N, C]`` to
          features ``[B, N, feature_dim]`` (configs hold a path, never code).
        - ``feature_dim``: the encoder's feature width (the projector's output width).
        - ``sha256``: optional; when set, the encoder file must have this SHA-256.
        - ``projector_hidden``: the projector's hidden width (REPA's 2048).
        - ``projector_layers``: its Linear layers, SiLU between them (REPA's 3):
          ``Linear(d, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden,
          feature_dim)``. Checkpoints of another projector do not resume.
        """

        kind = "repa"
        encoder: str = attrs.field(validator=[v.instance_of(str), _nonempty])
        feature_dim: int = attrs.field(validator=[v.instance_of(int), v.ge(1)])
        sha256: str = ""
        projector_hidden: int = attrs.field(default=REPA_HIDDEN,
                                            validator=[v.instance_of(int), v.ge(1)])
        projector_layers: int = attrs.field(default=REPA_LAYERS,
                                            validator=[v.instance_of(int), v.ge(1)])

        def problems(self) -> list[str]:
            """Checked by ``selfflow config check`` and before a run builds anything."""
            problem = _missing(self.encoder)
            return [] if problem is None else [f"encoder: {problem}"]

        def build(self) -> REPATeacher:
            return REPATeacher(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.encoder = load_encoder(config.encoder)
        self.encoder_sha256 = file_sha256(Path(config.encoder).expanduser())
        if config.sha256 and config.sha256.lower() != self.encoder_sha256:
            raise EncoderError(f"{config.encoder!r} has SHA-256 "
                               f"{self.encoder_sha256}, the config expects {config.sha256}")

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def projection_head(self, width: int) -> REPAProjector:
        """REPA's projector from the student's ``width`` to ``feature_dim`` (the core builds
        no head of its own for a REPA run)."""
        return REPAProjector(width, self.config.feature_dim, hidden=self.config.projector_hidden,
                             layers=self.config.projector_layers)

    def attach(self, student: Backbone) -> None:
        param = next(student.parameters(), None)
        if param is not None:
            self.encoder = self.encoder.to(param.device)

    @torch.no_grad()
    def features(self, x_t, t, batch, *, layer):
        """``encoder(batch.tokens)``: REPA aligns to features of the clean data, so the noisy
        view ``x_t``, its times ``t`` and ``layer`` are not used."""
        tokens = batch.tokens.float()
        out = self.encoder(tokens)
        b, n = tokens.shape[:2]
        if not isinstance(out, Tensor) or tuple(out.shape) != (b, n, self.config.feature_dim):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise EncoderError(
                f"{self.config.encoder!r} returned {shape} for tokens "
                f"{tuple(tokens.shape)}; expected ({b}, {n}, {self.config.feature_dim}) "
                f"(batch, tokens, feature_dim)")
        return out.detach()

    def state_dict(self):
        return {"encoder_sha256": self.encoder_sha256}

    def load_state_dict(self, state):
        saved = state.get("encoder_sha256")
        if saved is not None and saved != self.encoder_sha256:
            raise EncoderError(
                f"the checkpoint was trained against an encoder with SHA-256 "
                f"{saved}, but {self.config.encoder!r} has {self.encoder_sha256}")
