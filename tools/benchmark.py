#!/usr/bin/env python
"""Benchmarks of megatron_starflow, one subcommand each; every run prints one JSON object.

    python tools/benchmark.py sampling --checkpoint runs/tiny [--prompts 2] [--seed 0]
                                       [--tau 1e-3] [--block-size 16 64]
    python tools/benchmark.py sampling --cp 2 --checkpoint runs/tiny   # one-rank vs 2 CP ranks

``sampling`` loads a checkpoint and generates the same T2V batch (same prompts, same noise) three
ways: (a) sequential, KV-cached, token by token; (b) plain block Jacobi (chunks start from z);
(c) video-aware Jacobi (chunks in frame n > 0 start from frame n-1). It reports, per method, the
wall seconds, the deep and shallow network evaluations and token evaluations, the deep block's
inversion seconds per token evaluation, and the largest absolute difference to the sequential
result, both of the tokens before denoising (``Generation.tokens``) and of the uint8 video, plus
the speed-up of each method over the sequential one. ``equal_output`` then walks video-aware
Jacobi down a tau ladder (``--tau``, 10x smaller, ..., 0), with and without the commit pass,
until the video is within 2/255 of the sequential one, and reports that tau and the speed-up
over sequential at equal output (``megatron_starflow/sampling/speed.py``).

``data`` writes synthetic VP9 and H.264 files, packs them into video, decoded-clip and latent
shards and times each input path per rank (``benchmarks/data_throughput.py``, which has more
options): clips/s against what a 7B step consumes.

New benchmarks (``train``, ...) are added as one ``cmd_<name>`` function and one
``add_parser`` block in ``build_parser``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# Method name -> (solver, video_aware), in the order they run; the first one is the reference.
SAMPLING_METHODS = {
    "sequential": ("sequential", False),
    "jacobi": ("jacobi", False),
    "jacobi_video_aware": ("jacobi", True),
}


def _prompts(count: int) -> list[str]:
    """``count`` captions of the synthetic held-out split (deterministic)."""
    from megatron_starflow.data.synthetic import all_captions

    if count < 1:
        raise ValueError(f"--prompts must be >= 1, got {count}")
    return all_captions("heldout", count)


def _max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def run_sampling_benchmark(checkpoint: str, prompts: int = 2, seed: int = 0, tau: float = 1e-3,
                           block_size: tuple[int, ...] = (16, 64), frames: int = 0,
                           guidance: float = 0.0, warmup: int = 1, repeats: int = 1,
                           threads: int = 0, device: str | None = None,
                           equal_output: bool = True) -> dict:
    """Sequential vs plain Jacobi vs video-aware Jacobi on one checkpoint -> a JSON-ready dict.
    Per method also the deep block's seconds per token evaluation; ``equal_output``: the
    Jacobi-vs-sequential speed-up at equal output (``sampling.speed.equal_output_speedup``: the
    first tau of a ladder whose video is within 2/255 of sequential, with and without the commit
    pass).
    ``device``: auto | cpu | cuda (None: the checkpoint config's ``train.device``); the wall times
    include the copy of the video to the CPU, which waits for the device."""
    import torch

    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.speed import equal_output_speedup, run_summary

    if not block_size or len(block_size) > 2 or min(block_size) < 1:
        raise ValueError(f"--block-size takes one or two sizes >= 1 (first frame, later frames), "
                         f"got {list(block_size)}")
    if tau < 0:
        raise ValueError(f"--tau must be >= 0, got {tau}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if threads:
        torch.set_num_threads(threads)
    first, later = block_size[0], block_size[-1]
    system, step, step_dir = load_system(checkpoint, device)
    captions = _prompts(prompts)
    frames = frames or system.cfg.data.frames

    def options(solver: str, video_aware: bool) -> SolverOptions:
        return SolverOptions(solver=solver, first_block=first, later_block=later, tau=tau,
                             video_aware=video_aware, guidance=guidance)

    for _ in range(warmup):  # first-call costs (allocator, kernels, cached RoPE tables)
        generate(system, captions[:1], frames, seed, options("jacobi", True))

    results, outputs = {}, {}
    for name, (solver, video_aware) in SAMPLING_METHODS.items():
        best, out = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(system, captions, frames, seed, options(solver, video_aware))
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        outputs[name] = out
        results[name] = {
            **run_summary(out, best),
            "invert_seconds": out.seconds.get("invert"),
            "deep_jacobi_iterations": out.deep.iterations,
        }
    reference = outputs["sequential"]
    for name, out in outputs.items():
        results[name]["max_abs_token_diff"] = _max_abs(out.tokens, reference.tokens)
        results[name]["max_abs_video_diff"] = int(round(_max_abs(out.video, reference.video)))
    seq = results["sequential"]
    t, h, w, c = reference.tokens.shape[1:]
    equal = None
    if equal_output:
        equal = equal_output_speedup(system, captions, frames, seed, (first, later), tau, guidance,
                                     reference=(reference, seq["seconds"]))
    return {
        "benchmark": "sampling",
        "checkpoint": step_dir,
        "step": step,
        "prompts": len(captions),
        "seed": seed,
        "frames": frames,
        "token_grid": [t, h, w, c],
        "tau": tau,
        "block_size": [first, later],
        "guidance": guidance,
        "dtype": str(system.dtype).replace("torch.", ""),
        "device": str(system.device),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "methods": results,
        "speedup_vs_sequential": {name: seq["seconds"] / max(r["seconds"], 1e-12)
                                  for name, r in results.items() if name != "sequential"},
        "deep_eval_ratio_vs_sequential": {
            name: seq["deep_network_evals"] / max(r["deep_network_evals"], 1)
            for name, r in results.items() if name != "sequential"},
        "equal_output": equal,
    }


def run_cp_sampling_benchmark(checkpoint: str, cp: int = 2, prompts: int = 2, seed: int = 0,
                              tau: float = 1e-3, block_size: tuple[int, ...] = (16, 64),
                              frames: int = 0, guidance: float = 0.0, warmup: int = 1,
                              threads: int = 0) -> dict:
    """One-rank video-aware Jacobi (this process) vs ``cp`` context-parallel ranks (pipelined
    Jacobi, spawned local gloo processes) on the same T2V batch and noise, in one run: wall seconds,
    deep / shallow network evaluations, per-rank timings and the largest token / video difference
    between the two. Each CP process gets ``threads`` torch threads (default cores / cp); the
    one-rank run gets ``threads * cp`` (the same cores in all)."""
    import os
    import tempfile

    import torch

    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.parallel.context_parallel import spawn_local
    from megatron_starflow.cli.sample_cp import benchmark_worker, rank_summary
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    if cp < 2:
        raise ValueError(f"--cp must be >= 2 for the context-parallel comparison, got {cp}")
    if not block_size or len(block_size) > 2 or min(block_size) < 1:
        raise ValueError(f"--block-size takes one or two sizes >= 1, got {list(block_size)}")
    if tau < 0:
        raise ValueError(f"--tau must be >= 0, got {tau}")
    per_rank = threads or max(1, (os.cpu_count() or 1) // cp)
    torch.set_num_threads(per_rank * cp)
    system, step, step_dir = load_system(checkpoint)
    captions = _prompts(prompts)
    frames = frames or system.cfg.data.frames
    opts = dict(solver="jacobi", first_block=block_size[0], later_block=block_size[-1], tau=tau,
                video_aware=True, guidance=guidance)
    for _ in range(warmup):
        generate(system, captions[:1], frames, seed, SolverOptions(**opts))
    t0 = time.perf_counter()
    one = generate(system, captions, frames, seed, SolverOptions(**opts))
    one_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cp.pt")
        t0 = time.perf_counter()
        spawn_local(cp, benchmark_worker, checkpoint, captions, frames, seed, opts, warmup, path,
                    threads=per_rank)
        launch_seconds = time.perf_counter() - t0
        res = torch.load(path, weights_only=False)
    t, h, w, c = one.tokens.shape[1:]
    return {
        "benchmark": "sampling_cp",
        "checkpoint": step_dir, "step": step, "prompts": len(captions), "seed": seed,
        "frames": frames, "token_grid": [t, h, w, c], "tau": tau,
        "block_size": [block_size[0], block_size[-1]], "guidance": guidance,
        "dtype": str(system.dtype).replace("torch.", ""), "cpu_count": os.cpu_count(),
        "one_rank": {"seconds": one_seconds, "invert_seconds": one.seconds.get("invert"),
                     "torch_threads": per_rank * cp,
                     "deep_network_evals": one.deep.network_evals,
                     "shallow_network_evals": one.shallow.network_evals,
                     "deep_jacobi_iterations": one.deep.iterations},
        "cp": {"ranks": cp, "seconds": res["seconds"], "invert_seconds": res["invert_seconds"],
               "torch_threads_per_rank": res["threads"],
               "launch_seconds_incl_process_start": launch_seconds,
               "deep_network_evals": res["deep_network_evals"],
               "shallow_network_evals": res["shallow_network_evals"],
               "frames_per_rank": res["ranges"], **rank_summary(res["ranks"]),
               "per_rank": [{k: r[k] for k in ("rank", "frames", "network_evals",
                                               "speculative_passes", "context_passes",
                                               "final_passes", "iterations", "compute_seconds",
                                               "communication_seconds", "idle_seconds",
                                               "wall_seconds")} for r in res["ranks"]]},
        "speedup_cp_vs_one_rank": one_seconds / max(res["seconds"], 1e-12),
        "max_abs_token_diff": _max_abs(res["tokens"], one.tokens),
        "max_abs_video_diff": int(round(_max_abs(res["video"], one.video))),
    }


def cmd_sampling(args) -> int:
    if args.cp != 1:
        result = run_cp_sampling_benchmark(args.checkpoint, args.cp, args.prompts, args.seed,
                                           args.tau, tuple(args.block_size), args.frames, args.cfg,
                                           args.warmup, args.threads)
        print(json.dumps(result, indent=2))
        return 0
    result = run_sampling_benchmark(args.checkpoint, args.prompts, args.seed, args.tau,
                                    tuple(args.block_size), args.frames, args.cfg, args.warmup,
                                    args.repeats, args.threads,
                                    equal_output=not args.no_equal_output)
    print(json.dumps(result, indent=2))
    return 0


def run_data_benchmark(clips: int = 48, frames: int = 8, size: int = 32, file_frames: int = 16,
                       batch: int = 8, epochs: int = 2, threads: int = 2, workdir: str = "") -> dict:
    """``benchmarks/data_throughput.py``'s ``run`` on ``size x size`` clips: clips/s per rank of
    every input path (DALI, PyAV, decoded-clip shards, latent shards at the 7B shapes; in the loop
    and with 2 decode workers) against what a 7B step consumes. ``epochs`` passes are timed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("starflow_data_throughput",
                                                  REPO / "benchmarks" / "data_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(clips=clips, file_frames=file_frames, frames=frames, height=size, width=size,
                      batch=batch, timed_clips=epochs * clips, threads=threads, workdir=workdir)


def cmd_data(args) -> int:
    result = run_data_benchmark(args.clips, args.frames, args.size, args.file_frames, args.batch,
                                args.epochs, args.threads, args.workdir)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from megatron_starflow.cli import checks

    parser = checks.ArgumentParser(prog="tools/benchmark.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    sa = sub.add_parser("sampling", help="sequential vs Jacobi vs video-aware Jacobi inversion")
    sa.add_argument("--checkpoint", required=True, type=checks.input_path,
                    help="run, checkpoints or step folder")
    sa.add_argument("--prompts", type=checks.integer(1), default=2,
                    help="batch of synthetic held-out captions (>= 1)")
    sa.add_argument("--seed", type=checks.SEED, default=0, help="in [0, 2^63 - 1]")
    sa.add_argument("--tau", type=checks.TAU, default=1e-3, help="Jacobi early-stop tolerance in [0, 1]")
    sa.add_argument("--block-size", type=checks.integer(1), nargs="+", default=[16, 64], metavar="A",
                    help="Jacobi chunk sizes (>= 1): first frame [, later frames]")
    sa.add_argument("--frames", type=checks.integer(1), default=0,
                    help="pixel frames, >= 1 (default: training length)")
    sa.add_argument("--cfg", type=checks.GUIDANCE, default=0.0,
                    help=f"guidance weight w in [0, {checks.GUIDANCE_MAX:g}]")
    sa.add_argument("--warmup", type=checks.integer(0), default=1, help="untimed warm-up generations (>= 0)")
    sa.add_argument("--repeats", type=checks.integer(1), default=1,
                    help="timed runs per method (min is kept; >= 1)")
    sa.add_argument("--threads", type=checks.integer(0), default=0, help="torch CPU threads (0 = default)")
    sa.add_argument("--cp", type=checks.integer(1), default=1,
                    help="N >= 2: one-rank vs N context-parallel ranks (pipelined Jacobi)")
    sa.add_argument("--no-equal-output", action="store_true",
                    help="skip the search for the tau at which video-aware Jacobi gives the "
                         "sequential video within 2/255 (the speed-up at equal output)")
    sa.set_defaults(func=cmd_sampling)

    da = sub.add_parser("data", help="clips/s: DALI CPU vs PyAV decoding vs latent shards")
    da.add_argument("--clips", type=checks.integer(1), default=48, help="synthetic VP9 files (>= 1)")
    da.add_argument("--frames", type=checks.integer(1), default=8, help="frames per clip (>= 1)")
    da.add_argument("--size", type=checks.integer(8, 4096), default=32,
                    help="height = width of files and clips, even, in [8, 4096]")
    da.add_argument("--file-frames", type=checks.integer(1), default=16,
                    help="frames per file (>= --frames)")
    da.add_argument("--batch", type=checks.integer(1), default=8, help=">= 1")
    da.add_argument("--epochs", type=checks.integer(1), default=2, help="timed passes over the data (>= 1)")
    da.add_argument("--threads", type=checks.integer(1), default=2, help="torch / DALI CPU threads (>= 1)")
    da.add_argument("--workdir", default="", help="where files and shards go (default: a temp dir)")
    da.set_defaults(func=cmd_data)
    return parser


def _sibling_tool(name: str):
    """Another script of tools/ as a module (loaded from its file: tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"starflow_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    from megatron_starflow.cli.quiet import quiet_warnings

    quiet_warnings()
    from megatron_starflow.cli import checks

    args, code = checks.parse(build_parser(), argv)
    if args is None:
        return code
    try:
        if args.command == "sampling" and len(args.block_size) > 2:
            raise ValueError(f"--block-size takes 1 or 2 values (first frame [, later frames]), "
                             f"got {len(args.block_size)}")
        if args.command == "data":
            if args.size % 2:
                raise ValueError(f"--size {args.size}: 4:2:0 VP9 needs an even size")
            if args.file_frames < args.frames:
                raise ValueError(f"--file-frames {args.file_frames} is fewer than --frames "
                                 f"{args.frames}: a clip must fit in a file")
            if args.workdir:
                checks.check_output_folder("--workdir", args.workdir)
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
