"""The optimizer seam of the loop: one interface, megatron's semantics.

``ShardedAdamW`` (``training/sharded_optimizer.py``) is megatron's distributed optimizer recipe
written over torch collectives: fp32 gradient accumulation in ``main_grad`` buffers, gradients
averaged over data x context parallel ranks, fp32 master weights and AdamW moments split by rows
over those ranks, per-group global norms with TP duplicates counted once, clipping, and an
all-gather of the updated rows into the (bf16 or fp32) model parameters. It runs on any device and
backend, so the CPU (gloo) runs and tests exercise the same optimizer a GPU run uses, and its
checkpoint state is DTensors that torch.distributed.checkpoint reshards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_starflow.config import Config
from megatron_starflow.training.layout import ProcessLayout


def build_optimizer(cfg: Config, groups: list[dict], layout: ProcessLayout):
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    tr = cfg.train
    main_dtype = torch.float64 if tr.dtype == "float64" else torch.float32
    return ShardedAdamW(groups=groups, betas=(tr.beta1, tr.beta2), eps=1e-8,
                        weight_decay=tr.weight_decay, shard_group=layout.dp_cp_group,
                        norm_group=None, counts_in_norm=layout.counts_in_norm,
                        main_dtype=main_dtype)


def reduce_sequence_parallel_grads(groups: list[dict], tp_group) -> None:
    """Sequence parallelism: parameters applied to a slice of the sequence (norms, RowParallel
    biases; megatron marks them ``sequence_parallel``) hold partial gradients on each TP rank:
    sum them over TP (one flat collective)."""
    grads = [p.main_grad for g in groups for _, p in g["params"]
             if getattr(p, "sequence_parallel", False)]
    if not grads or dist.get_world_size(tp_group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
