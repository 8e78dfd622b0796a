"""Gradient reductions that megatron's DDP/finalize_model_grads would do, for a model trained with
plain torch optimizers (one-process loop, tests, CPU runs where megatron's DDP cannot run).

* Sequence parallelism: params used on a slice of the sequence (layer norms, RowParallel biases,
  marked ``sequence_parallel=True``) get partial grads on each TP rank: sum them over TP.
* Data parallelism: average every grad over the data-parallel group.
Both flatten the grads into one buffer per dtype, so there is one collective per call.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _allreduce(grads: list[torch.Tensor], group, op, scale: float = 1.0) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, op=op, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(synced)


def allreduce_sequence_parallel_grads(model: nn.Module, group=None) -> None:
    from megatron.core import parallel_state

    group = group or parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:
        _allreduce(grads, group, dist.ReduceOp.SUM)


def allreduce_data_parallel_grads(params: Iterable[torch.Tensor], group=None) -> None:
    from megatron.core import parallel_state

    group = group or parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # SUM then scale: gloo has no AVG reduce op.
        _allreduce(grads, group, dist.ReduceOp.SUM, 1.0 / size)
