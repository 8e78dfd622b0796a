"""The one device decision of a process, and the collective backend that goes with it.

``select_device("auto")`` is ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; ``"cpu"`` and
``"cuda"`` force one (``"cuda"`` without CUDA is one clear error). Every command (train, eval,
sample, CP sample) calls this once and passes the result down: models, text encoders, codecs,
batches, noise generators and KV caches are placed on it by their callers, and nothing below
branches the algorithm on it. The backend follows the device, never ``torch.cuda.is_available()``:
a CPU run on a CUDA node must still use gloo, since NCCL cannot reduce CPU tensors.
"""

from __future__ import annotations

import os

import torch

from megatron_starflow.config import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def local_rank() -> int:
    env = os.environ
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in env:
            return int(env[key])
    return 0


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (or ``cuda:N``) -> the device this process computes on."""
    requested = (requested or "auto").strip().lower()
    kind = requested.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(f"device {requested!r} is not one of {', '.join(DEVICE_CHOICES)} "
                          f"(train.device / --device)")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if kind == "auto":
            return torch.device("cpu")
        raise ConfigError(f"--device {requested} was requested but this machine has no usable CUDA "
                          f"device (torch {torch.__version__}, cuda build: "
                          f"{torch.version.cuda or 'none'}); use --device cpu or --device auto")
    index = int(requested.split(":", 1)[1]) if ":" in requested else local_rank()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device cuda:{index}: only {torch.cuda.device_count()} CUDA devices "
                          f"are visible to this process (LOCAL_RANK / CUDA_VISIBLE_DEVICES)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def generator_on(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator whose draws are made on ``device`` (noise, dequantisation, dropout)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))
