"""Map full (one-process) weights to tensor-parallel shards and back.

Megatron marks every TP-sharded parameter with ``tensor_model_parallel=True`` and its
``partition_dim``: 0 for ColumnParallelLinear weights and biases (linear_qkv, linear_fc1), 1 for
RowParallelLinear weights (linear_proj, linear_fc2); RowParallel biases and the norms are
replicated. Shards are contiguous chunks of the partition dim, rank r owning chunk r. This is also
right for ``linear_qkv``: megatron stores its rows grouped per query group ([q_g, k_g, v_g] for
group g, here one group per head), so a contiguous chunk of rows holds whole heads with their own
q, k and v. (Checkpoints in the authors' [q all heads; k; v] layout are regrouped by the importer
before they reach this function.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension megatron splits a TP-sharded parameter along; None for a replicated one."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim", 0))
    return None


def shard_full_state_dict(full: dict[str, torch.Tensor], model: nn.Module, tp_rank: int,
                          tp_size: int) -> dict[str, torch.Tensor]:
    """The state dict ``model`` (built with TP size ``tp_size``) should load on ``tp_rank``, from the
    state dict of the same architecture built with TP size 1. Keys present in ``model`` only."""
    params = dict(model.named_parameters())
    out = {}
    for key, local in model.state_dict().items():
        if key not in full and not torch.is_tensor(local):
            out[key] = local  # megatron's `_extra_state` (None without TE): nothing to shard
            continue
        if key not in full:
            raise KeyError(f"{key} is missing from the full state dict")
        value = full[key]
        if not torch.is_tensor(value):  # e.g. megatron's `_extra_state` (None without TE)
            out[key] = value
            continue
        dim = partition_dim(params[key]) if key in params else None
        if dim is not None and tp_size > 1:
            if value.shape[dim] % tp_size:
                raise ValueError(f"{key}: dim {dim} of size {value.shape[dim]} is not divisible by "
                                 f"tp={tp_size}")
            value = value.chunk(tp_size, dim=dim)[tp_rank]
        if tuple(value.shape) != tuple(local.shape):
            raise ValueError(f"{key}: shard shape {tuple(value.shape)} != model shape {tuple(local.shape)}")
        out[key] = value.clone()
    return out


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load one-process weights into a TP model on this rank (megatron's TP group)."""
    from megatron.core import parallel_state

    model.load_state_dict(shard_full_state_dict(
        full, model, parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size()))


def gather_tp_tensor(tensor: torch.Tensor, param: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather a TP-sharded tensor (a parameter or its grad) into its full shape; replicated
    tensors are returned unchanged. Collective over the TP group: every TP rank must call it."""
    from megatron.core import parallel_state

    dim = partition_dim(param)
    group = group or parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if dim is None or size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full parameters (or their grads) of a TP model, by name; collective over the TP group."""
    out = {}
    for name, param in model.named_parameters():
        value = param.grad if grads else param.detach()
        if value is None:
            value = torch.zeros_like(param)
        out[name] = gather_tp_tensor(value, param)
    return out
