"""How the trainable model is spread over processes: one process, DDP, or FSDP2.

``parallel="ddp"`` (the default): every rank holds the whole model and DDP all-reduces the
gradients. Checkpoints are one file, written by rank 0.

``parallel="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 1-D device mesh of
all ranks (``init_device_mesh("cuda" | "cpu", (world,))``; gloo on CPU works). Every transformer
block of the backbone is its own unit, then the root (the rest of the backbone and the
projection head, where the run has one: none without a representation loss), so a rank holds
1/world of every parameter, gradient and AdamW moment and all-gathers one block at a time.
(The rest of the backbone is not a unit of its own: FSDP2 hooks the backward on the tensors of a
module's output, and the backbone returns a ``BackboneOutput``, which FSDP2 cannot look into.)
Parameters stay fp32 (bf16 comes from the trainer's autocast on CUDA, as under DDP). Checkpoints
are directories of shards (:mod:`selfflow_core.runtime.checkpoint.dcp`).

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

from selfflow_core.errors import CheckpointError, ConfigError
from selfflow_core.runtime import checkpoint
from selfflow_core.runtime.checkpoint import dcp
from selfflow_core.runtime.dist import Dist

__all__ = ["DDP", "FSDP", "Parallel", "SingleProcess", "make_parallel"]


class Parallel:
    """A way to spread the trainable model over processes; chosen once by :func:`make_parallel`.
    The trainer calls these methods and never asks which strategy it holds."""

    #: every rank runs the sampling model (its shards), rank 0 saves the samples
    samples_on_every_rank = False

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    def prepare(self, model: nn.Module, copies: list[nn.Module], *, compile: bool = False,
                activation_checkpointing: bool = False, find_unused: bool = False) -> nn.Module:
        """Apply checkpointing and compile per block, then the strategy (``model`` and its
        ``copies`` of the backbone: the EMA models). Returns the module to call for training."""
        blocks = list(model.backbone.repeated_blocks())
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
        return self.wrap(model, copies, blocks, find_unused=find_unused)

    def wrap(self, model: nn.Module, copies: list[nn.Module], blocks: list[nn.Module], *,
             find_unused: bool) -> nn.Module:
        return model

    def no_sync(self, trained: nn.Module):
        """The context of a micro-batch that only accumulates gradients (no reduction yet)."""
        return nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip to a global norm (over all shards); the norm as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- checkpoints: one file, written by rank 0 ---------------------------------------------
    def optimizer_state_dict(self, model: nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def checkpoint_path(self, directory: Path, step: int) -> Path:
        return checkpoint.path_for(directory, step)

    def save(self, state: Callable[[], dict], directory: Path, step: int, *, keep: int
             ) -> Path | None:
        if not self.dist.is_main:
            return None
        return checkpoint.save(state(), directory, step, keep=keep)

    def load(self, path: Path) -> dict:
        """The checkpoint at ``path``, without its shards (read later by :meth:`load_shards`)."""
        state = checkpoint.load_meta(path, map_location=self.dist.device)
        if ("sharded" in state) != isinstance(self, FSDP):
            raise CheckpointError(
                f"checkpoint {path} is {'' if 'sharded' in state else 'not '}sharded but this "
                f"run is {self.name} with {self.dist.world_size} process(es)")
        return state

    def load_shards(self, path: Path, state: dict, template: Callable[[], dict]) -> dict:
        """``state`` with this rank's shards read in (FSDP2); ``template``: the run's state."""
        return state

    name = "one process"


class SingleProcess(Parallel):
    """One process: the model as it is."""


class DDP(Parallel):
    """Every rank holds the whole model; DDP all-reduces the gradients."""

    name = "ddp"

    def wrap(self, model, copies, blocks, *, find_unused):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=find_unused)

    def no_sync(self, trained):
        return trained.no_sync()


class FSDP(Parallel):
    """FSDP2 per block; the EMA copies sharded like the student; DCP checkpoint directories."""

    name = "fsdp"
    samples_on_every_rank = True

    def wrap(self, model, copies, blocks, *, find_unused):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
        for copy in copies:
            shard(copy, mesh, copy.repeated_blocks())
            copy.register_forward_hook(lambda module, args, out: module.reshard())
        shard(model, mesh, blocks)
        # the backbone alone (sampling from the student): gather the root's part first
        model.backbone.register_forward_pre_hook(lambda module, args: model.unshard())
        model.backbone.register_forward_hook(
            lambda module, args, out: None if torch.is_grad_enabled() else model.reshard())
        return model

    def no_sync(self, trained):
        return _fsdp_no_sync(trained)

    def optimizer_state_dict(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer)  # keyed by parameter name, sharded

    def load_optimizer_state_dict(self, model, optimizer, state):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state)

    def checkpoint_path(self, directory, step):
        return checkpoint.path_for(directory, step, sharded=True)

    def save(self, state, directory, step, *, keep):
        """Collective: every rank writes its shards."""
        return dcp.save(state(), directory, step, keep=keep, is_main=self.dist.is_main,
                        barrier=self.dist.barrier)

    def load_shards(self, path, state, template):
        return dcp.load_shards(path, state, template())


STRATEGIES: dict[str, type[Parallel]] = {"ddp": DDP, "fsdp": FSDP}


def make_parallel(kind: str, dist: Dist) -> Parallel:
    """The strategy for the config's ``parallel`` (``"ddp"`` or ``"fsdp"``); one process is
    :class:`SingleProcess` whatever ``kind`` says."""
    return STRATEGIES[kind](dist) if dist.enabled else SingleProcess(dist)


def shard(root: nn.Module, mesh, blocks) -> None:
    """FSDP2 per block of ``blocks``, then the rest of ``root`` as one unit."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
