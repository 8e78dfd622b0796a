"""Training entry point and the pieces every loop shares (result record, dtypes, parameter groups).

The loop itself (noise-augmented NLL + FSM, AdamW, warm-up + cosine, clip + skip rule, held-out
evaluation, atomic checkpoints, exact resume, preemption, JSONL/wandb metrics, tqdm) is in
``training/distributed_loop.py``: one process or every rank of a torchrun / submitit / SLURM launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_starflow.config import Config
from megatron_starflow.models.system import StarFlowSystem

DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    skipped: int
    eval_start: dict
    eval_end: dict
    seconds: float
    preempted: bool = False  # stopped by SIGTERM/SIGUSR1 after a checkpoint (and a requeue)
    stop_reason: str = ""


def _param_groups(system: StarFlowSystem) -> tuple[list, list]:
    """(flow + text encoder params, denoiser params): clipped and skip-tested separately, as the
    reference gives the denoiser its own optimizer."""
    den = system.model.learnable_self_denoiser
    den_ids = {id(p) for p in den.parameters()} if den is not None else set()
    flow = [p for p in system.parameters() if p.requires_grad and id(p) not in den_ids]
    return flow, [p for p in den.parameters()] if den is not None else []


def train(cfg: Config, run_dir: str | None = None, quiet: bool = False, preemption=None) -> TrainResult:
    """Train (one process, or every rank of a torchrun / submitit / SLURM launch): the loop of
    ``training/distributed_loop.py``, which resumes exactly (sampler position and every RNG state
    are checkpointed), guards against divergence and checkpoints on preemption: a run killed and
    resumed takes exactly the steps of an uninterrupted one."""
    from megatron_starflow.training.distributed_loop import train as train_any

    return train_any(cfg, run_dir, quiet, preemption)
