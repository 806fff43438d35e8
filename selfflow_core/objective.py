"""The Self-Flow objective: flow matching + gamma * representation loss, both over the generated
tokens (valid and not conditioning: ``TokenBatch.target_mask``).

``L = mean ||f(x_tau, tau) - (x1 - x0)||^2 + gamma * mean(1 - cos(head(h_l), sg(teacher_k)))``,
the student's block-``l`` state seen through a small head, the teacher's raw block-``k`` state
seen on the cleaner view ``min(t, s)``; cosine in fp32. Both views share one noise draw.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import Tensor, nn

from selfflow_core.errors import CheckpointError
from selfflow_core.flow import interpolate, velocity_target
from selfflow_core.interfaces import Backbone, TeacherStrategy
from selfflow_core.types import LossTerms, TimestepPlan, TokenBatch


def _layer(value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a block index (int) or a fraction of depth (float): {value!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"a fraction of depth must be in (0, 1]: {value}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"blocks are 1-indexed: {value}")


def resolve_layer(value: int | float, depth: int) -> int:
    """An int is a 1-indexed block; a float is a fraction of depth, rounded half up and clamped to
    [1, depth] (depth 28: 0.3 -> 8, 0.7 -> 20; depth 12: 0.3 -> 4, 0.7 -> 8)."""
    return value if isinstance(value, int) else min(depth, max(1, int(value * depth + 0.5)))


@attrs.frozen(kw_only=True)
class ObjectiveConfig:
    """``gamma``: representation-loss weight (0.8). Layers: student ``l`` and teacher ``k``."""

    gamma: float = attrs.field(default=0.8, validator=v.ge(0))
    student_layer: int | float = attrs.field(default=0.3, validator=lambda *a: _layer(a[2]))
    teacher_layer: int | float = attrs.field(default=0.7, validator=lambda *a: _layer(a[2]))

    def layers(self, depth: int) -> tuple[int, int]:
        l, k = resolve_layer(self.student_layer, depth), resolve_layer(self.teacher_layer, depth)
        problems = [f"{name} {i} is outside 1..{depth} (backbone depth)"
                    for name, i in (("student_layer", l), ("teacher_layer", k))
                    if not 1 <= i <= depth]
        if not problems and l >= k:
            problems.append(f"student_layer {l} must be shallower than teacher_layer {k}")
        if problems:
            raise ValueError("; ".join(problems))
        return l, k


class ProjectionHead(nn.Sequential):
    """Linear(d, 2d) - SiLU - Linear(2d, d_target)."""

    def __init__(self, width: int, target_width: int | None = None) -> None:
        super().__init__(nn.Linear(width, 2 * width), nn.SiLU(),
                         nn.Linear(2 * width, target_width or width))


def _widths(state: dict) -> str:
    """A head's widths from its state dict, e.g. ``64 -> 128 -> 6`` (its Linear weights)."""
    shapes = [tuple(v.shape) for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not shapes:
        return "no head"
    return " -> ".join(str(w) for w in [shapes[0][1], *(s[0] for s in shapes)])


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def uses_representation(config: ObjectiveConfig, teacher: TeacherStrategy) -> bool:
    """Whether a run computes the representation loss: its teacher gives targets and
    ``gamma > 0`` (not so for vanilla flow matching, DTS alone or ``gamma = 0``)."""
    return bool(teacher.provides_targets) and config.gamma > 0


class SelfFlowObjective(nn.Module):
    """Holds the projection head; ``forward`` computes one step's :class:`LossTerms`.

    The head is ``head`` when given (a teacher strategy's own,
    :meth:`~selfflow_core.interfaces.TeacherStrategy.projection_head`), else a
    :class:`ProjectionHead` of output width ``target_width``.
    ``representation=False`` (the run's teacher gives no targets) or ``gamma = 0`` builds no head
    (``head`` is None, the state dict empty): a head outside the graph would leave DDP waiting
    for gradients that never come."""

    def __init__(self, config: ObjectiveConfig, *, depth: int, width: int,
                 target_width: int | None = None, representation: bool = True,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.student_layer, self.teacher_layer = config.layers(depth)
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(f"a projection head must be a torch.nn.Module, got "
                            f"{type(head).__name__}")
        used = representation and config.gamma > 0
        self.head = (head if head is not None else ProjectionHead(width, target_width)
                     ) if used else None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`; a head of another shape (a checkpoint
        written with another projection head) is a :class:`~selfflow_core.CheckpointError`."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            lines = [x.strip() for x in str(exc).splitlines()]
            first = " ".join(lines[1:] or lines)[:200]  # past "Error(s) in loading ...:"
            raise CheckpointError(
                f"the checkpoint's projection head ({_widths(state_dict)}) does not fit this "
                f"run's ({_widths(self.state_dict())}): {first}. A checkpoint written with "
                f"another head (e.g. a REPA run from before REPA's three-layer projector) "
                f"cannot be resumed; train in a run directory of its own (run_dir=...)"
            ) from None

    def forward(self, student: Backbone, teacher: TeacherStrategy, batch: TokenBatch,
                plan: TimestepPlan, noise: Tensor) -> LossTerms:
        x0, l, k = batch.tokens, self.student_layer, self.teacher_layer
        use_rep = self.head is not None and uses_representation(self.config, teacher)
        out = student(interpolate(x0, noise, plan.student_t), plan.student_t, batch,
                      feature_layers=(l,) if use_rep else ())
        err = (out.velocity.float() - velocity_target(x0, noise).float()).square()
        weight = batch.target_mask.float()[..., None].expand_as(err)
        if batch.channel_valid is not None:
            weight = weight * batch.channel_valid.float()
        flow = masked_mean(err, weight)
        metrics = {"flow": flow.detach()}
        rep = flow.new_zeros(())
        if use_rep:
            target = teacher.features(interpolate(x0, noise, plan.teacher_t), plan.teacher_t,
                                      batch, layer=k)
            with torch.autocast(device_type=x0.device.type, enabled=False):
                pred = self.head(out.features[l].float())
                cos = F.cosine_similarity(pred, target.detach().float(), dim=-1, eps=1e-6)
            rep = masked_mean(1.0 - cos, batch.target_mask.float())
            metrics["rep"] = rep.detach()
            metrics["feature_cos"] = 1.0 - metrics["rep"]
        total = flow + self.config.gamma * rep
        metrics["loss"] = total.detach()
        return LossTerms(total=total, flow=flow, rep=rep, metrics=metrics)
