"""Sharded checkpoints of STARFlow-V with megatron-core's ``dist_checkpointing`` (CPU/gloo or GPU).

``training.checkpoint`` writes one file on rank 0 holding the TP-gathered weights; this module is
the megatron-native alternative: every rank writes its own shards in parallel (``torch_dist``
format), and a checkpoint saved under one TP size loads under another (resharding is done by
megatron at load time from the shards' global offsets).

Layout of the sharded state dict (``model_sharded_state_dict``):

* Each ``TransformerStack`` contributes ``stack.block.sharded_state_dict(prefix=...)``: megatron
  describes its ColumnParallel / RowParallel linears as TP shards of the full tensors, and its norms
  and row-parallel biases as TP replicas. We pass ``metadata={'non_homogeneous_layers': True}`` so
  that megatron keys each layer by its own index (``...block.layers.0.mlp.linear_fc1.weight``)
  instead of stacking all layers along a new leading axis (``...block.layers.mlp.linear_fc1.weight``
  of shape ``[layers, ...]``): with it, every checkpoint key equals the parameter's name in the
  model's plain ``state_dict()``, so the checkpoint can be read by name.
* Every other parameter / buffer (sos_embed, proj_in, proj_txt, final_norm, proj_out, the denoiser's
  heads, and the text encoder's weights when ``text_encoder`` is passed, under ``text_encoder.``) is
  replicated on every rank: a ``ShardedTensor.from_rank_offsets(key, tensor, replica_id=...)``
  without offsets, with ``replica_id = (pp_rank, tp_rank, dp_rank)`` so that only the rank with all
  zeros (the main replica) writes it.

Pipeline parallelism is not covered: our pipeline stages hold whole flow blocks, and a stage's
``StarFlowV`` still builds every block; saving from PP > 1 would need the owning stage to be the
main replica of each block. ``save_dist`` refuses PP > 1.

``save_dist`` writes into ``<dir>.tmp`` (all ranks), then after a barrier rank 0 renames it to
``<dir>`` (replacing an existing one), so an interrupted save never leaves a half-written ``<dir>``.

CPU: megatron-core 0.16.1's ``torch_dist`` writer calls ``torch.cuda.synchronize()`` after copying
tensors to CPU (``filesystem_async.FileSystemWriterAsync.preload_tensors``); ``cpu_backend.install``
makes that call a no-op on a torch without CUDA.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch import nn


def _stacks(module: nn.Module, prefix: str = ""):
    """(state-dict prefix of the wrapped megatron block, block) of every TransformerStack."""
    from megatron_starflow.models.transformer import TransformerStack

    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(sub, TransformerStack):
            yield (f"{name}." if name else "") + "block.", sub.block


def _replica_id() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))


def _module_sharded_state_dict(module: nn.Module, prefix: str) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for block_prefix, block in _stacks(module, prefix):
        out.update(block.sharded_state_dict(prefix=block_prefix,
                                            metadata={"non_homogeneous_layers": True}))
    covered = set(out)
    block_prefixes = tuple(p for p, _ in _stacks(module, prefix))
    replica_id = _replica_id()
    for key, value in module.state_dict(prefix=prefix, keep_vars=True).items():
        if key in covered:
            continue
        if key.startswith(block_prefixes):  # e.g. a TP-sharded tensor megatron did not describe
            raise KeyError(f"{key}: inside a megatron block but not in its sharded_state_dict")
        if not torch.is_tensor(value):
            continue
        out[key] = ShardedTensor.from_rank_offsets(key, value.detach(), replica_id=replica_id)
    return out


def model_sharded_state_dict(model: nn.Module, text_encoder: nn.Module | None = None) -> dict:
    """Megatron sharded state dict of ``model`` (and ``text_encoder`` under ``text_encoder.``),
    keyed (dict keys and checkpoint keys alike) by the plain ``state_dict()`` names."""
    out = _module_sharded_state_dict(model, "")
    if text_encoder is not None:
        out.update(_module_sharded_state_dict(text_encoder, "text_encoder."))
    return out


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_dist(model: nn.Module, directory: str, text_encoder: nn.Module | None = None) -> str:
    """Collective: write ``model``'s shards to ``directory`` (atomically, via ``directory.tmp``)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("save_dist: pipeline parallelism (parallel.pp > 1) is not supported")
    directory = os.path.abspath(directory)
    tmp = directory + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model, text_encoder), tmp)
    dist.barrier()
    if rank == 0:
        if os.path.exists(directory):
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    dist.barrier()
    return directory


def load_dist(model: nn.Module, directory: str, text_encoder: nn.Module | None = None) -> None:
    """Collective: load ``directory`` (saved under any TP size) into ``model`` on this rank."""
    from megatron.core import dist_checkpointing

    sharded = model_sharded_state_dict(model, text_encoder)
    loaded = dist_checkpointing.load(sharded, directory)
    model_state = {k: v for k, v in loaded.items() if not k.startswith("text_encoder.")}
    _load_into(model, model_state)
    if text_encoder is not None:
        _load_into(text_encoder, _strip(loaded, "text_encoder."))


def _load_into(module: nn.Module, state: dict) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Only non-tensor extras (megatron's `_extra_state`, None without TE) may be absent.
    own = module.state_dict()
    missing = [k for k in missing if torch.is_tensor(own.get(k))]
    if missing or unexpected:
        raise KeyError(f"dist checkpoint does not match the model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
