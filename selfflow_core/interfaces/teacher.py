"""Teacher strategies: where the representation target comes from."""

from __future__ import annotations

import abc
from typing import Any

import attrs
from torch import Tensor, nn

from selfflow_core.interfaces.backbone import Backbone
from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.types import TokenBatch


@attrs.frozen(kw_only=True)
class TeacherConfig(ComponentConfig):
    """Base config of teacher strategies; ``build()`` -> :class:`TeacherStrategy`."""


class TeacherStrategy(abc.ABC):
    """Provides target features for the representation loss (or none, for plain flow matching)."""

    #: False for strategies that give no target (the representation loss is then skipped)
    provides_targets: bool = True
    #: width of the target features when it differs from the student's (an external encoder);
    #: None: the student's width
    feature_dim: int | None = None

    def attach(self, student: Backbone) -> None:
        """Called once with the student before training (e.g. to copy it)."""

    def update(self, student: Backbone, *, step: int) -> None:
        """Called after every optimizer step."""

    @abc.abstractmethod
    def features(self, x_t: Tensor, t: Tensor, batch: TokenBatch, *, layer: int) -> Tensor | None:
        """Target features [B, N, D] for the teacher's view ``x_t`` at times ``t`` (no grad)."""

    def projection_head(self, width: int) -> nn.Module | None:
        """The projection head this strategy's targets call for, or None (the default) for the
        core's ``ProjectionHead`` (Self-Flow's Linear(d, 2d) - SiLU - Linear(2d, D)).

        A head maps the student's block-``l`` features ``[..., width]`` to the targets' width
        (``feature_dim``, else ``width``). It is trained with the backbone and saved as the
        checkpoint's ``head``; it is asked for only where a representation loss is computed
        (e.g. REPA's teacher returns REPA's three-layer projector)."""
        return None

    @property
    def model(self) -> nn.Module | None:
        """The teacher network, if it has one (the EMA teacher is also an evaluation model)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
