"""The one device decision of a process, and the collective backend that goes with it.

``select_device("auto")`` is ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; ``"cpu"`` and
``"cuda"`` force one (``"cuda"`` without CUDA is one clear error). Every command (train, eval,
sample, CP sample) calls this once and passes the result down: models, text encoders, codecs,
batches, masks, RoPE tables and KV caches are placed on it by their callers, and nothing below
branches the algorithm on it. Random inputs (training noise, held-out noise, sampling noise) are
drawn from CPU generators and moved, so a seed gives the same draws on any device. The backend
follows the device, never ``torch.cuda.is_available()``: a CPU run on a CUDA node must still use
gloo, since NCCL cannot reduce CPU tensors.
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


def select_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (or ``cuda:N``) -> the device this process computes on.

    A ``torch.device`` is taken as it is: that is how tests run the commands on a device that is
    neither the CPU nor CUDA (torch's ``lazy`` device, which computes on the CPU but refuses CPU
    tensors mixed in: tests/helpers_device.py). Users choose with the strings."""
    if isinstance(requested, torch.device):
        return requested
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


def check_layers_on(parallel, device: torch.device) -> None:
    """``parallel.spec=te`` (and with it ``parallel.fp8``) builds Transformer Engine layers, which
    run only on CUDA with transformer_engine installed: anything else is one ``ConfigError``
    naming the key and the fix, raised before any process group or model is built."""
    if parallel.spec != "te":
        return
    keys = "parallel.spec=te"
    if parallel.fp8 != "none":
        keys += f" / parallel.fp8={parallel.fp8}"
    fix = "parallel.spec=local parallel.fp8=none"
    if torch.device(device).type != "cuda":
        raise ConfigError(f"{keys} builds Transformer Engine layers, which need a CUDA device, but "
                          f"this run computes on {torch.device(device).type}; set {fix} (the same "
                          f"parameters, pure torch), or run with --device cuda on a GPU node with "
                          f"requirements-gpu.txt installed")
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own errors when its CUDA libraries are missing
        raise ConfigError(f"{keys} needs transformer_engine, which does not import here ({exc}); "
                          f"pip install -r requirements-gpu.txt, or set {fix}") from None
