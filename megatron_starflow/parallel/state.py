"""Initialise torch.distributed and megatron-core's ``parallel_state`` from whatever launched us.

Megatron-Core modules (even with every parallel size 1) look up their process groups in
``parallel_state``, so a single CPU process needs a (one-rank, gloo) process group too. Launchers:
torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; SLURM/submitit set SLURM_PROCID/SLURM_NTASKS; a plain
``python`` call gets a one-rank group on a free local port.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_and_world() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def initialize(tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1, backend: str | None = None) -> None:
    """Idempotent: set up the default process group and megatron's model-parallel groups."""
    from megatron.core import parallel_state

    from megatron_starflow.parallel import cpu_backend

    cpu_backend.install()
    if not dist.is_initialized():
        rank, world, local_rank = _rank_and_world()
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp * parallel.pp * "
                         f"parallel.cp = {tp}*{pp}*{cp}; change the parallel sizes or the number "
                         f"of processes")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
    )


def ensure_single_process() -> None:
    """What a plain one-process CPU run (tests, tools) calls before building a model."""
    initialize(1, 1, 1, 1)
