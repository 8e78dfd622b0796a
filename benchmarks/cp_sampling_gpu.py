#!/usr/bin/env python
"""Context-parallel Jacobi sampling of the deep block on GPUs: one-rank vs N-rank wall time.

    torchrun --nproc_per_node N benchmarks/cp_sampling_gpu.py [--preset small] [--frames 8]
        [--tokens-hw 16 16] [--batch 1] [--tau 1e-3] [--block-size 32 128] [--dtype bf16]
        [--guidance 0] [--head-std 0.05] [--repeats 2] [--out cp_gpu.json]
    torchrun --nproc_per_node 2 benchmarks/cp_sampling_gpu.py --cpu-dry-run --preset tiny \
        --frames 4 --tokens-hw 4 4 --repeats 1          # check the script on CPU first

Builds the deep flow block of a config preset (random weights; flow heads drawn with
``--head-std`` so the inverse is not the identity), random text embeddings and noise (the same on
every rank), then times, with CUDA synchronisation:
  * one-rank video-aware block Jacobi (``BlockInverter``) on rank 0 (the others wait), and
  * the pipelined CP Jacobi over all ranks (``sampling.cp_jacobi.cp_invert_block``),
and prints one JSON line: both wall times, network evaluations, per-rank timings and the largest
token difference. With one GPU per rank (N GPUs) the default group uses NCCL; with fewer GPUs
than ranks (e.g. a one-GPU machine, a functional check) pass ``--backend gloo``: the ranks then
share the GPU(s) and the timing says little about speed-up. CP messages (tokens + committed KV)
always travel over two-rank gloo groups staged through host memory.

Without CUDA it exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset of the deep block (tiny small 100m 1b 3b 7b)")
    p.add_argument("--frames", type=int, default=8, help="latent frames")
    p.add_argument("--tokens-hw", type=int, nargs=2, default=[16, 16], metavar=("H", "W"),
                   help="tokens per frame (height width)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--block-size", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--head-std", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (min kept); one warm-up")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                   help="default group backend (default: nccl when every rank has its own GPU)")
    p.add_argument("--out", default="", help="also write the JSON here (rank 0)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the same script on CPU (gloo, float32) to check it before a GPU run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("error: benchmarks/cp_sampling_gpu.py needs CUDA GPUs (torch.cuda.is_available() is "
              "False); on CPU use: python tools/benchmark.py sampling --cp 2 --checkpoint DIR",
              file=sys.stderr)
        return 2
    import torch.distributed as dist

    from megatron_starflow.config import from_preset
    from megatron_starflow.models.flow_block import FlowBlock
    from megatron_starflow.models.layout import SlotLayout
    from megatron_starflow.parallel import state
    from megatron_starflow.sampling.cp_jacobi import cp_invert_block
    from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu_dry_run:
        gpus, backend, device, dtype = 0, "gloo", torch.device("cpu"), torch.float32
        sync = lambda: None  # noqa: E731
        torch.set_num_threads(1)
    else:
        gpus = torch.cuda.device_count()
        backend = args.backend or ("nccl" if gpus >= world else "gloo")
        torch.cuda.set_device(local % gpus)
        device = torch.device("cuda", local % gpus)
        dtype = getattr(torch, DTYPES[args.dtype])
        sync = torch.cuda.synchronize
    state.initialize(1, 1, backend=backend)
    rank = dist.get_rank()

    m = from_preset(args.preset).model
    torch.manual_seed(0)
    block = FlowBlock(m.token_channels, m.deep_width, m.deep_layers, m.head_dim, m.mlp_ratio,
                      m.soft_clip, m.text_width, m.init_std, m.rope_base, m.rope_time_fraction)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (block.proj_out.weight, block.proj_out.bias, block.final_norm.weight):
            p.copy_(torch.randn(p.shape, generator=gen) * args.head_std)
    block = block.to(device=device, dtype=dtype).eval()
    h, w = args.tokens_hw
    layout = SlotLayout(m.text_length, args.frames, h, w, with_time=True, pt_seq_len=m.pt_seq_len,
                        window=m.attn_window)
    b, c, n = args.batch, m.token_channels, args.frames * h * w
    text = torch.randn(b, m.text_length, m.text_width, generator=gen).to(device, dtype)
    uncond = torch.randn(b, m.text_length, m.text_width, generator=gen).to(device, dtype) if args.guidance else None
    z = torch.randn(b, n, c, generator=gen).to(device, dtype)
    opts = SolverOptions("jacobi", args.block_size[0], args.block_size[-1], args.tau,
                         video_aware=True, guidance=args.guidance)

    def timed(fn):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    one, one_s, one_stats = None, [], None
    for i in range(args.repeats + 1):
        if rank == 0:
            inv = BlockInverter(block, layout, opts, text, uncond)
            out, s = timed(lambda: inv.run(z))
            one, one_stats = out, inv.stats
        else:
            _, s = timed(lambda: None)
        if i:
            one_s.append(s)
        dist.barrier()
    cp_s, res = [], None
    for i in range(args.repeats + 1):
        res, s = timed(lambda: cp_invert_block(block, z, layout, opts, text, uncond))
        if i:
            cp_s.append(s)
        dist.barrier()
    x_own, stats, timing, ranges = res
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (x_own.float().cpu(), stats.network_evals, timing.__dict__))
    if rank == 0:
        x = torch.cat([p[0] for p in parts], dim=1)
        record = {
            "benchmark": "cp_sampling_gpu",
            "device": "cpu (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name(device),
            "gpus": gpus, "ranks": dist.get_world_size(), "backend": backend,
            "preset": args.preset, "deep_width": m.deep_width, "deep_layers": m.deep_layers,
            "frames": args.frames, "tokens_per_frame": h * w, "batch": b,
            "dtype": str(dtype).replace("torch.", ""),
            "tau": args.tau, "block_size": args.block_size, "guidance": args.guidance,
            "one_rank": {"seconds": min(one_s), "network_evals": one_stats.network_evals,
                         "iterations": one_stats.iterations},
            "cp": {"seconds": min(cp_s), "frames_per_rank": ranges,
                   "network_evals_total": sum(p[1] for p in parts), "per_rank": [p[2] for p in parts]},
            "speedup": min(one_s) / max(min(cp_s), 1e-12),
            "max_abs_token_diff": float((x - one.float().cpu()).abs().max()),
        }
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line + "\n")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
