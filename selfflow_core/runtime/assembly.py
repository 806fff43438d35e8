"""Turning a validated ``TrainerConfig`` into live objects: the modalities (adapter, scheduler,
id offset) and the trainable model (backbone + projection head, the head only where a
representation loss is computed: the teacher strategy's own, else the core's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from torch import nn

from selfflow_core.config.run import TrainerConfig
from selfflow_core.data.order import ShuffledWrite
from selfflow_core.interfaces import ModalityAdapter, TextEncoder, TextSpec, TimestepScheduler
from selfflow_core.objective import SelfFlowObjective, uses_representation
from selfflow_core.prompts import CAPTIONS, WithTextEmbeddings


@attrs.define
class ModalityRuntime:
    name: str
    spec: Any
    adapter: ModalityAdapter
    scheduler: TimestepScheduler
    id_offset: int


def build_modalities(config: TrainerConfig, text: TextEncoder | None = None
                     ) -> list[ModalityRuntime]:
    """Each modality's adapter, scheduler and id offset. With a frozen ``text`` encoder, a
    captioned modality's adapter also stores the encoder's output for every caption; with
    ``shuffle_on_write``, its store is written in that seed's random order."""
    out, offset = [], 0
    for name, spec in config.modalities.items():
        adapter = spec.modality.build()
        if spec.shuffle_on_write is not None:  # the store is written in a random order
            adapter = ShuffledWrite(adapter, spec.shuffle_on_write)
        if text is not None and not text.trainable and CAPTIONS in adapter.fields():
            adapter = WithTextEmbeddings(adapter, text)
        out.append(ModalityRuntime(name, spec, adapter, spec.scheduler.build(), offset))
        offset += len(adapter.token_dims)
    return out


class StudentWithHead(nn.Module):
    """The trainable part (backbone + projection head) as one module, so DDP sees one forward."""

    def __init__(self, backbone: nn.Module, objective: SelfFlowObjective) -> None:
        super().__init__()
        self.backbone, self.objective = backbone, objective

    def forward(self, teacher, batch, plan, noise):
        return self.objective(self.backbone, teacher, batch, plan, noise)


def build_model(config: TrainerConfig, modalities: list[ModalityRuntime],
                teacher, *, text: TextSpec | None = None) -> StudentWithHead:
    """The backbone for the modalities' token widths and classes (and the text encoder's
    output, ``text``, in prompt-conditioned runs), with its projection head."""
    dims = [d for m in modalities for d in m.adapter.token_dims]
    classes = max(m.adapter.num_classes for m in modalities)
    extra = {"text": text} if text is not None else {}
    backbone = config.backbone.build(token_dims=dims, num_classes=classes, **extra)
    # no projection head where no representation loss is computed (vanilla, DTS, gamma 0); the
    # teacher's own head where it has one (REPA's projector), else the core's
    representation = uses_representation(config.objective, teacher)
    objective = SelfFlowObjective(config.objective, depth=backbone.depth, width=backbone.width,
                                  target_width=teacher.feature_dim,
                                  representation=representation,
                                  head=teacher.projection_head(backbone.width)
                                  if representation else None)
    return StudentWithHead(backbone, objective)


def drop_unused_head(state: dict) -> dict:
    """A checkpoint (one file) of a run without representation loss, written when such runs
    still built a projection head they never used: without the head and its (empty) optimizer
    entries, so that the run resumes. The head's parameters are the model's last
    (:class:`StudentWithHead`: the backbone's, then the head's)."""
    opt = state["optimizer"]
    ids = [i for group in opt["param_groups"] for i in group["params"]]
    gone = set(ids[len(ids) - len(state["head"]):])
    groups = [{**g, "params": [i for i in g["params"] if i not in gone]}
              for g in opt["param_groups"]]
    kept = {i: s for i, s in opt["state"].items() if i not in gone}
    return {**state, "head": {}, "optimizer": {**opt, "state": kept, "param_groups": groups}}


def store_path(spec) -> str:
    return str(Path(spec.store).expanduser()) if "://" not in spec.store else spec.store
