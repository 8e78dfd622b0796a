"""Context-parallel sampling from a checkpoint: ``launch.py sample --cp N`` and the ranks of
``tools/benchmark.py sampling --cp N``. Each rank loads the checkpoint and runs
``sampling.cp_jacobi.cp_generate`` on its frames."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from megatron_starflow.cli.quiet import quiet_warnings
from megatron_starflow.cli.sample_args import (check_against_model, check_outputs, conditioning_of,
                                               prompts_of, write_samples)


def rank_summary(ranks: list[dict]) -> dict:
    """Critical-path view of per-rank timings: the last rank to finish sets the wall time."""
    return {
        "max_wall_seconds": max(r["wall_seconds"] for r in ranks),
        "network_evals_total": sum(r["network_evals"] for r in ranks),
        "network_evals_max_rank": max(r["network_evals"] for r in ranks),
        "final_passes_total": sum(r["final_passes"] for r in ranks),
    }


def sample_worker(args) -> None:
    """One rank of ``launch.py sample --cp N`` (spawned locally, or started by torchrun/SLURM):
    every rank loads the checkpoint and samples its frames; rank 0 writes the mp4(s) / grid and
    prints the same JSON record as one-rank sampling, plus ``cp`` and per-rank ``cp_ranks``."""
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.cp_jacobi import cp_generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    quiet_warnings()
    prompts = args._prompts
    prefix = conditioning_of(args)
    system, step, _ = load_system(args.checkpoint, getattr(args, "device", None),
                                  getattr(args, "weights", "auto"))
    check_against_model(args, system, prompts, None if prefix is None else prefix.shape[0],
                        warn=dist.get_rank() == 0)
    if dist.get_world_size() != args.cp:
        raise ValueError(f"--cp {args.cp} but the launcher started {dist.get_world_size()} processes")
    opts = SolverOptions(solver="jacobi", first_block=args.block_size[0],
                         later_block=args.block_size[-1], tau=args.tau, guidance=args.cfg)
    out = cp_generate(system, prompts, args.frames, args.seed, opts, prefix,
                      temperature=args.temperature)
    if dist.get_rank() == 0:
        record = write_samples(args, out, system.cfg.data.fps, step, prompts, "jacobi")
        record.update({"cp": args.cp, "cp_frames": out.ranges, "cp_summary": rank_summary(out.ranks),
                       "cp_ranks": [{k: (round(v, 4) if isinstance(v, float) else v)
                                     for k, v in r.items()} for r in out.ranks]})
        print(json.dumps(record), flush=True)
    dist.barrier()


def cmd_sample_cp(args) -> int:
    """``launch.py sample ... --cp N``: under torchrun / SLURM with N processes, run this rank;
    otherwise spawn N local gloo processes."""
    from megatron_starflow.parallel.context_parallel import launched_world, spawn_local

    if args.cp < 1:
        raise ValueError(f"--cp must be >= 1, got {args.cp}")
    if args.solver != "jacobi":
        raise ValueError("--cp N > 1 runs the pipelined Jacobi solver; drop --solver sequential")
    args._prompts = prompts_of(args)
    check_outputs(args, len(args._prompts))
    if args.task in ("i2v", "v2v") and not (args.image if args.task == "i2v" else args.video):
        raise ValueError(f"--task {args.task} needs --{'image' if args.task == 'i2v' else 'video'} PATH")
    world = launched_world()
    if world:
        if world != args.cp:
            raise ValueError(f"--cp {args.cp} but the launcher started {world} processes")
        sample_worker(args)
    else:
        import logging

        import torch.multiprocessing as mp

        # a failing rank makes torch log "Terminating process ... via signal SIGTERM" for the
        # others: the rank's own error below is the one line the user needs
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            spawn_local(args.cp, sample_worker, args)
        except mp.ProcessRaisedException as exc:
            raise _one_line(exc) from None
        finally:
            spawn_log.setLevel(level)
    return 0


def _one_line(exc: Exception) -> Exception:
    """A spawned rank's failure (a traceback in text) -> the rank's own error when it is one of
    the one-line kinds (bad input, a sampling chunk that diverged), else ``exc`` itself."""
    from megatron_starflow.sampling.jacobi import SamplingDiverged

    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for kind in (ValueError, FileNotFoundError, SamplingDiverged):
        prefix = f"{kind.__module__}.{kind.__name__}: " if kind is SamplingDiverged else f"{kind.__name__}: "
        if last.startswith(prefix) or last.startswith(f"{kind.__name__}: "):
            return kind(last.split(": ", 1)[1])
    return exc


def benchmark_worker(checkpoint: str, captions: list[str], frames: int, seed: int, opts: dict,
                     warmup: int, out_path: str) -> None:
    """One rank of ``tools/benchmark.py sampling --cp N``: warm up, then time one CP generation
    (from a barrier to the end of the deep + shallow inversion); rank 0 saves tokens and timings."""
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.cp_jacobi import cp_generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    quiet_warnings()
    system, _, _ = load_system(checkpoint)
    solver = SolverOptions(**opts)
    for _ in range(warmup):
        cp_generate(system, captions[:1], frames, seed, solver)
    dist.barrier()
    t0 = time.perf_counter()
    out = cp_generate(system, captions, frames, seed, solver)
    seconds = time.perf_counter() - t0
    if dist.get_rank() == 0:
        torch.save({"seconds": seconds, "tokens": out.tokens, "video": out.video,
                    "deep_network_evals": out.deep.network_evals,
                    "shallow_network_evals": out.shallow.network_evals,
                    "invert_seconds": out.seconds.get("invert"), "ranks": out.ranks,
                    "ranges": out.ranges, "threads": torch.get_num_threads()}, out_path)
    dist.barrier()
