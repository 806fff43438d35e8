"""How the trainable model is spread over processes: one process, DDP, or FSDP2.

``parallel="ddp"`` (the default): every rank holds the whole model and DDP all-reduces the
gradients. Checkpoints are one file, written by rank 0.

``parallel="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 1-D device mesh of
all ranks (``init_device_mesh("cuda" | "cpu", (world,))``; gloo on CPU works). Every transformer
block of the backbone is its own unit, then the root (the rest of the backbone and the
projection head), so a rank holds 1/world of every parameter, gradient and AdamW moment and
all-gathers one block at a time. (The rest of the backbone is not a unit of its own: FSDP2 hooks
the backward on the tensors of a module's output, and the backbone returns a ``BackboneOutput``,
which FSDP2 cannot look into.) Parameters stay fp32 (bf16 comes from the trainer's autocast on
CUDA, as under DDP). Checkpoints are directories of shards (:mod:`selfflow_core.sharded`).

The EMA teacher (and the evaluation EMA) are sharded exactly like the student: same units, same
rows on the same rank. The EMA update is then a local ``lerp`` of each shard on the matching
student shard, with no communication and 1/world of the memory, and the teacher's truncated
forward all-gathers only the blocks it runs (1..k). (The alternative, a full replicated copy per
rank updated from gathered parameters, would all-gather the whole model every step and keep a
full copy per rank.) FSDP2 keeps a root's parameters unsharded after a forward without backward;
the copies are resharded after every forward so their parameters are shards whenever the EMA
update or a checkpoint reads them.

Per-block activation checkpointing (``Block.activation_checkpointing``) and ``torch.compile``
(``block.compile()``) are applied to the student's blocks before sharding; neither renames a
parameter, so state dicts, EMA copies and checkpoints are the same with them on or off.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from selfflow_core import checkpoint, sharded
from selfflow_core.config import ConfigError
from selfflow_core.distributed import Dist


class Parallel:
    """The trainer's strategy: ``kind`` is the config's ``parallel``; one process is ``"none"``."""

    def __init__(self, kind: str, dist: Dist) -> None:
        self.kind = kind if dist.enabled else "none"
        self.dist = dist

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def prepare(self, model: nn.Module, copies: list[nn.Module], *, compile: bool = False,
                activation_checkpointing: bool = False, find_unused: bool = False) -> nn.Module:
        """Apply checkpointing and compile per block, then DDP or FSDP2 (``model`` and its
        ``copies`` of the backbone: the EMA models). Returns the module to call for training."""
        blocks = list(getattr(model.backbone, "blocks", []))
        if activation_checkpointing:
            if not blocks or not all(hasattr(b, "activation_checkpointing") for b in blocks):
                problem = (f"$.activation_checkpointing: the backbone "
                           f"{type(model.backbone).__name__} has no blocks that support it")
                raise ConfigError([problem])
            for block in blocks:
                block.activation_checkpointing = True
        if compile:
            for block in blocks:
                block.compile()
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(model, find_unused_parameters=find_unused)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
            for copy in copies:
                shard(copy, mesh)
                copy.register_forward_hook(lambda module, args, out: module.reshard())
            shard(model, mesh, blocks)
            # the backbone alone (sampling from the student): gather the root's part first
            model.backbone.register_forward_pre_hook(lambda module, args: model.unshard())
            model.backbone.register_forward_hook(
                lambda module, args, out: None if torch.is_grad_enabled() else model.reshard())
        return model

    def no_sync(self, trained: nn.Module):
        """The context of a micro-batch that only accumulates gradients (no reduction yet)."""
        if self.kind == "ddp":
            return trained.no_sync()
        if self.kind == "fsdp":
            return _fsdp_no_sync(trained)
        return nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip to a global norm (over all shards); the norm as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- checkpoints ---------------------------------------------------------------------------
    def optimizer_state_dict(self, model: nn.Module, optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer)  # keyed by parameter name, sharded

    def load_optimizer_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state)

    def checkpoint_path(self, directory: Path, step: int) -> Path:
        return checkpoint.path_for(directory, step, sharded=self.sharded)

    def save(self, state: Callable[[], dict], directory: Path, step: int, *, keep: int
             ) -> Path | None:
        """Rank 0 writes a file (one process, DDP) or every rank its shards (FSDP2)."""
        if self.sharded:
            return sharded.save(state(), directory, step, keep=keep, is_main=self.dist.is_main,
                                barrier=self.dist.barrier)
        if not self.dist.is_main:
            return None
        return checkpoint.save(state(), directory, step, keep=keep)

    def load(self, path: Path) -> dict:
        """The checkpoint at ``path`` without its shards (read later by :meth:`load_shards`)."""
        state = checkpoint.load(path, map_location=self.dist.device, shards=False)
        if self.sharded != ("sharded" in state):
            raise checkpoint.CheckpointError(
                f"checkpoint {path} is {'' if 'sharded' in state else 'not '}sharded but this "
                f"run is {self.kind} with {self.dist.world_size} process(es)")
        return state

    def load_shards(self, path: Path, state: dict, template: Callable[[], dict]) -> dict:
        """``state`` with this rank's shards read in (FSDP2); ``template``: the run's state."""
        return sharded.load_shards(path, state, template()) if self.sharded else state


def shard(root: nn.Module, mesh, blocks=None) -> None:
    """FSDP2 per block (``root.blocks`` unless given), then the rest of ``root`` as one unit."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(root, "blocks", []) if blocks is None else blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
