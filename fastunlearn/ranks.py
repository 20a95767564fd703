"""The rank's view of the work, handed to the stages (`Ranks`, from `ranks()`): which pictures this
process computes and how its results combine with the other ranks'. One process is rank 0 of 1,
owning everything, its collectives the identity; under torchrun the collectives are distributed.py's.
With the frozen LLM sharded (--shard-llm), `place_sharded` puts it on the ranks (FSDP2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed as dist
from .errors import UserError


@dataclass
class Ranks:
    """This process's view of the work, handed to the stages: pictures are owned round-robin
    (picture k -> rank k % world) and results combine over the ranks. Rank 0 of 1 owns every
    picture and its collectives are the identity: the plain single-process computation."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # the frozen LLM FSDP2-sharded: every rank must make the same layer calls
    stand_in: object = None  # sharded: one of this rank's samples, run with zero weight (`stand_ins`)

    def owns(self, picture: int) -> bool:
        return picture % self.world == self.rank

    def gather(self, obj, what: str = "exchanging results") -> list:
        """Every rank's `obj`, in rank order."""
        return [obj] if self.world == 1 else dist.all_gather_object(obj, what)

    def all_reduce(self, tensors: dict[str, torch.Tensor], what: str = "summing the Fisher statistics") -> dict:
        """Each tensor summed over the ranks (one collective for all of them)."""
        return tensors if self.world == 1 else dist.all_reduce_sum(tensors, what)

    def sum_gradients(self, params: dict, grads: list, value: float) -> tuple[list, float]:
        """The ranks' shares of a step's gradients (None: no gradient) and loss, summed."""
        return (list(grads), value) if self.world == 1 else dist.all_reduce_grads(params, grads, value)

    def keep_stand_in(self, samples: list) -> None:
        """Sharded: remember one of this rank's samples, to run where it holds too few."""
        if self.sharded and self.stand_in is None and samples:
            self.stand_in = samples[0]

    def stand_ins(self, held: int, widest: int) -> list:
        """The zero-weight stand-in samples this rank runs beside the `held` sequences it holds of a set
        of which some rank holds `widest`: with a sharded LLM, as many as make every rank's layer calls
        the same; none otherwise."""
        if not self.sharded or held >= widest:
            return []
        if self.stand_in is None:
            raise UserError(f"rank {self.rank}: holds no picture; a sharded LLM needs at least one picture per rank "
                            "(use fewer ranks)")
        return [self.stand_in] * (widest - held)


ONE_PROCESS = Ranks()  # the stages' default (never sharded, so never changed)


def ranks() -> Ranks:
    """A Ranks for this process's job: under torchrun its rank, the world size and whether the LLM
    is sharded; else rank 0 of 1."""
    return Ranks(dist.rank(), dist.world_size(), dist.sharding()) if dist.active() else Ranks()


def place_sharded(model, device: torch.device) -> bool:
    """With a sharded LLM (FSDP2): each decoder layer of the frozen LLM fully_shard-ed over the ranks
    (its parameters split on dim 0, all-gathered for its forward and again for its backward, freed
    after each) and activation-checkpointed (its backward recomputes it); everything else (embeddings,
    final norm, lm_head, vision tower, projector) replicated on `device`. Frozen parameters get no
    gradient, so FSDP never reduce-scatters anything. Returns False (nothing done) unless the job runs
    sharded."""
    if not dist.sharding():
        return False
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = model.model.language_model
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UserError(f"{model.config.model_type}: no decoder layers found to shard (language_model.layers)")
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for name, child in model.named_children():
        if child is not model.model:
            child.to(device)
    for name, child in model.model.named_children():
        if child is not lm:
            child.to(device)
    for name, child in lm.named_children():
        if child is not layers:
            child.to(device)
    total = sum(p.numel() * p.element_size() for p in layers.parameters())
    for i, layer in enumerate(layers):
        # activation checkpointing: the backward keeps only each layer's input and recomputes the
        # layer (a 72B layer's saved activations are ~0.3 MB per token; its input 16 KB)
        layers[i] = checkpoint_wrapper(layer)
        fully_shard(layers[i], mesh=mesh)  # moves this rank's shard to the mesh's device
    held = sum(p.to_local().numel() * p.element_size() for p in layers.parameters())
    # distributed.describe() puts the split in the report
    dist._state.shard_bytes = (total, dist.all_gather_object(held, "sharding the LLM")[0])
    for buf_owner in model.modules():  # rotary tables and other buffers
        for k, b in list(buf_owner.named_buffers(recurse=False)):
            if b.device != device:
                setattr(buf_owner, k, b.to(device))
    return True
