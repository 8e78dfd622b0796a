"""Initialise torch.distributed and megatron-core's ``parallel_state`` from whatever launched us.

Megatron-Core modules (even with every parallel size 1) look up their process groups in
``parallel_state``, so a single CPU process needs a (one-rank, gloo) process group too. Launchers:
torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; SLURM/submitit set SLURM_PROCID/SLURM_NTASKS; a plain
``python`` call gets a one-rank group on a free local port.

``validate_parallel(cfg, world_size)`` checks, before anything is built, that the parallel sizes
divide what they must divide, and names the offending key. Data parallelism is derived:
``dp = world / (tp * pp * cp)`` (an explicit ``parallel.dp`` must agree).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from megatron_starflow.config import Config, ConfigError

# Latent-grid factors of the Wan2.2 VAE (16x spatial, 4x temporal): used only to validate sequence
# lengths before the codec (and its weights) are loaded.
_WAN_SPATIAL, _WAN_TEMPORAL = 16, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) that torchrun or SLURM/submitit set; (0, 1, 0) for a plain
    process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


# ------------------------------------------------------------------------------ validation

def latent_grid(cfg: Config) -> tuple[int, int, int]:
    """(frames, height, width) of the token grid the model sees for the configured clips."""
    d, p = cfg.data, cfg.model.patch_size
    if d.codec == "s2d":
        return d.frames // d.s2d_frames, d.height // (d.s2d_patch * p), d.width // (d.s2d_patch * p)
    return 1 + (d.frames - 1) // _WAN_TEMPORAL, d.height // (_WAN_SPATIAL * p), d.width // (_WAN_SPATIAL * p)


def validate_parallel(cfg: Config, world_size: int) -> int:
    """Raise ``ConfigError`` (a ValueError) naming the key when a parallel size does not divide what
    it shards; return the derived data-parallel size."""
    m, p = cfg.model, cfg.parallel
    for key in ("tp", "pp", "vpp", "cp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp * "
                          f"parallel.cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel}; change the parallel "
                          f"sizes or the number of processes")
    dp = world_size // model_parallel
    if p.dp not in (-1, dp):
        raise ConfigError(f"parallel.dp={p.dp} but world size {world_size} / (tp*pp*cp = "
                          f"{model_parallel}) = {dp}; set parallel.dp=-1 to derive it")
    if p.cp > 1:
        # Our own CP attention (parallel/context_parallel.py) splits whole latent frames.
        frames = latent_grid(cfg)[0]
        if frames < p.cp:
            raise ConfigError(f"parallel.cp={p.cp} splits latent frames over ranks, but a clip has "
                              f"only {frames} latent frames (data.frames={cfg.data.frames}); use "
                              f"parallel.cp <= {frames} or longer clips")
        if p.pp > 1:
            raise ConfigError(f"parallel.cp={p.cp} with parallel.pp={p.pp}: context parallelism "
                              f"and pipeline parallelism do not combine yet; use one of them")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits the "
                          "sequence over the tensor-parallel group)")
    stacks = {"model.shallow_width": m.shallow_width, "model.deep_width": m.deep_width}
    if m.use_denoiser:
        stacks["model.denoiser_width"] = m.resolved_denoiser_width
    for key, width in stacks.items():
        if width % m.head_dim:
            raise ConfigError(f"{key}={width} is not divisible by model.head_dim={m.head_dim}")
        heads = width // m.head_dim
        if heads % p.tp:
            raise ConfigError(f"{key}={width} / model.head_dim={m.head_dim} = {heads} attention heads "
                              f"is not divisible by parallel.tp={p.tp} (each TP rank owns whole heads)")
        if (m.mlp_ratio * width) % p.tp:
            raise ConfigError(f"MLP width model.mlp_ratio * {key} = {m.mlp_ratio * width} is not "
                              f"divisible by parallel.tp={p.tp}")
    if p.sp:
        t, h, w = latent_grid(cfg)
        lengths = {"shallow blocks (tokens per frame = latent height * width)": h * w,
                   "deep block (model.text_length + tokens of the clip)": m.text_length + t * h * w}
        if m.use_denoiser:
            lengths["denoiser (model.text_length + tokens of the clip)"] = m.text_length + t * h * w
        for what, length in lengths.items():
            if length % p.tp:
                raise ConfigError(f"parallel.sp=true: the sequence of the {what} is {length} tokens, "
                                  f"not divisible by parallel.tp={p.tp}; change data.height/width/"
                                  f"frames or model.text_length, or set parallel.sp=false")
    if p.pp > 1 and m.num_blocks < p.pp:
        raise ConfigError(f"model.num_blocks={m.num_blocks} flow blocks cannot fill parallel.pp={p.pp} "
                          f"pipeline stages (stages own whole flow blocks)")
    if p.vpp > 1:
        raise ConfigError("parallel.vpp > 1: the interleaved pipeline schedule is not implemented for "
                          "the flow-block chain (parallel.pipeline runs 1F1B); set parallel.vpp=1")
    return dp


# ------------------------------------------------------------------------------ initialisation

def initialize(tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1, backend: str | None = None,
               seed: int = 1234) -> None:
    """Idempotent: set up the default process group and megatron's model-parallel groups, and
    (tp > 1) seed megatron's RNG tracker: its forks are entered by every TransformerBlock under SP;
    they only drive dropout, which this model does not use. Sequence parallelism is no process
    group: it is ``parallel.sp`` of the config, passed to the model (``StarFlowV(..., parallel=)``)."""
    from megatron.core import parallel_state

    from megatron_starflow.parallel import cpu_backend

    cpu_backend.install()
    if not dist.is_initialized():
        rank, world, local_rank = rank_and_world()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if world == 1 and "MASTER_PORT" not in os.environ:
            # A lone process gets its own free port without touching os.environ, so that
            # subprocesses it starts later (tools, tests, sweeps) do not inherit a bound port.
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp
                and parallel_state.get_context_parallel_world_size() == cp):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
    )
    if tp > 1 or torch.cuda.is_available():
        # Megatron's linears initialise their weights inside the tracker's fork: on CPU only under
        # TP (one CPU process draws from torch's default generator alone); where CUDA exists they
        # are built on the GPU (``use_cpu_initialization`` is off) and always enter the fork,
        # which raises "cuda rng state model-parallel-rng is not added" on an unseeded tracker.
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def initialize_from_config(cfg: Config, backend: str | None = None) -> int:
    """Validate ``cfg.parallel`` against the launcher's world size, initialise, return dp."""
    world = dist.get_world_size() if dist.is_initialized() else rank_and_world()[1]
    dp = validate_parallel(cfg, world)
    p = cfg.parallel
    initialize(p.tp, p.pp, p.vpp, p.cp, backend)
    return dp


def ensure_single_process() -> None:
    """What a plain one-process CPU run (tests, tools) calls before building a model."""
    initialize(1, 1, 1, 1)
