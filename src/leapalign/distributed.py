"""Sharding the transformer over the processes (train.parallel=fsdp) with PyTorch's FSDP2 `fully_shard`.

Every transformer block is one unit whose parameters, gradients and optimiser state are split over
the ranks; a block's weights are gathered only while it runs.  The adapter keeps calling the same
module (fully_shard changes it in place), so rollouts, methods and rewards are unchanged.  Every
rank runs every model call in the same order, which the shared generators of the trainer ensure
(same (k, j), same number of steps), so the collectives always match.

Saving gathers full tensors on every rank (a collective all ranks join) and the main one writes
them, so checkpoints and LoRA files do not depend on the number of processes.
"""
from __future__ import annotations

import torch


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) split like `ref` on this rank."""
    if not is_sharded(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements)


def block_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The transformer's stacks of blocks (FLUX: transformer_blocks and single_transformer_blocks; SD3, Qwen: transformer_blocks)."""
    return [m for name, m in module.named_children() if isinstance(m, torch.nn.ModuleList) and "block" in name and len(m)]


def shard_transformer(transformer: torch.nn.Module, cpu_offload: bool = False, reshard: bool = True, mesh=None) -> None:
    """fully_shard each block, then the rest of the transformer; optionally keep shards on the CPU between uses.

    reshard=False keeps a block's gathered weights from its forward to its backward (DeepSpeed ZeRO-2's
    trade: gradients and optimiser state stay sharded, one all-gather per block call is saved).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard, "mesh": mesh}  # mesh None: every process of the default group
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    lists = block_lists(transformer)
    if not lists:
        raise ValueError(f"{type(transformer).__name__} has no ModuleList of blocks to shard")
    for blocks in lists:
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(transformer, **kwargs)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered weights a forward without backward left behind (evaluation with fsdp_reshard=False),
    so that what runs next (an EMA swap, a save, the optimiser) sees the shards, not a stale whole copy."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value whole and on the CPU (collective when sharded)."""
    return {k: full(v.detach()).cpu().contiguous() for k, v in tensors.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with sharded state tensors gathered (collective when sharded)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: (full(v).cpu() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of full_optimizer_state: each whole state tensor split like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state)
    state["state"] = {i: {k: (shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                      for i, s in state["state"].items()}
    optimizer.load_state_dict(state)
