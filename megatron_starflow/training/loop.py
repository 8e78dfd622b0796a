"""Training entry point.

The loop itself (noise-augmented NLL + FSM, AdamW, warm-up + cosine, clip + skip rule, held-out
evaluation, atomic checkpoints, exact resume, preemption, JSONL/wandb metrics, tqdm) is in
``training/distributed_loop.py``: one process or every rank of a torchrun / submitit / SLURM launch.
"""

from __future__ import annotations

from megatron_starflow.config import Config


def train(cfg: Config, run_dir: str | None = None, quiet: bool = False, preemption=None):
    """Train (one process, or every rank of a torchrun / submitit / SLURM launch): the loop of
    ``training/distributed_loop.py``, which resumes exactly (sampler position and every RNG state
    are checkpointed), guards against divergence and checkpoints on preemption: a run killed and
    resumed takes exactly the steps of an uninterrupted one."""
    from megatron_starflow.training.distributed_loop import train as train_any

    return train_any(cfg, run_dir, quiet, preemption)
