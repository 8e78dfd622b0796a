#!/usr/bin/env python
"""Per-rank parameter counts of a preset under TP x PP, without any real memory or processes.

    python tools/dry_run_parallel.py --preset 7b --tp 2 --pp 4 [--split 2,2,1,1]

Builds the full model on the meta device (shapes only) and derives every rank's shard from
megatron's own partition attributes: a parameter marked ``tensor_model_parallel`` is split into tp
equal chunks along its ``partition_dim`` (linear_qkv, linear_fc1 weights and biases; linear_proj,
linear_fc2 weights); everything else is replicated over the TP group (layer norms, RowParallel
biases, and outside the stacks: sos, proj_in, proj_txt, final_norm, proj_out). A stage owns whole
flow blocks (``parallel.pipeline.split_blocks``); the denoiser sits on stage 0.

The check printed at the end is exact: sum over ranks of (sharded params) + (replicated params,
counted once per stage) = total parameters of the one-process model.
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def owner_block(name: str, num_blocks: int) -> int:
    """Flow block index owning a parameter (the denoiser is placed with block 0, on stage 0)."""
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    if name.startswith("learnable_self_denoiser."):
        return 0
    raise ValueError(f"parameter {name} belongs to no flow block")


def main(argv=None) -> None:
    import torch

    from megatron_starflow.config import load_config
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel.pipeline import split_blocks
    from megatron_starflow.parallel.state import ensure_single_process

    from megatron_starflow.cli import checks
    from megatron_starflow.config import PRESETS

    parser = checks.ArgumentParser(prog="tools/dry_run_parallel.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", choices=list(PRESETS))
    parser.add_argument("--config", type=checks.input_file)
    parser.add_argument("--tp", type=checks.integer(1), default=2, help=">= 1")
    parser.add_argument("--pp", type=checks.integer(1), default=4, help=">= 1")
    parser.add_argument("--split", default="", help="flow blocks per stage, e.g. 2,2,1,1")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from megatron_starflow.parallel.state import validate_parallel

    def resolve():
        cfg = load_config(args.config, args.overrides, preset=args.preset)
        cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
        validate_parallel(cfg, args.tp * args.pp)
        return cfg, split_blocks(cfg.model, args.pp, args.split or None)

    holder = []
    checks.or_usage_error(parser, lambda: holder.append(resolve()))
    cfg, stages = holder[0]
    ensure_single_process()
    with torch.device("meta"):
        model = StarFlowV(cfg.model)
    stage_of = {b: s for s, r in enumerate(stages) for b in r}
    sharded = [0] * args.pp  # per TP rank of each stage
    replicated = [0] * args.pp
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        stage = stage_of[owner_block(name, cfg.model.num_blocks)]
        if getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            if p.shape[dim] % args.tp:
                raise SystemExit(f"{name}: dim {dim} ({p.shape[dim]}) not divisible by tp={args.tp}")
            sharded[stage] += p.numel() // args.tp
        else:
            replicated[stage] += p.numel()
    ranks = []
    for s in range(args.pp):
        for t in range(args.tp):
            ranks.append({"pp_stage": s, "tp_rank": t, "blocks": list(stages[s]),
                          "denoiser": s == 0, "sharded": sharded[s], "replicated": replicated[s],
                          "params": sharded[s] + replicated[s]})
    recomposed = sum(r["sharded"] for r in ranks) + sum(replicated)
    report = {"preset": cfg.preset, "tp": args.tp, "pp": args.pp, "ranks": ranks,
              "total_params": total,
              "sum_sharded_over_ranks": sum(r["sharded"] for r in ranks),
              "replicated_once_per_stage": sum(replicated),
              "sum_of_rank_params": sum(r["params"] for r in ranks),
              "replicated_copies_beyond_one": (args.tp - 1) * sum(replicated),
              "exact": recomposed == total}
    print(f"{'stage':>5} {'tp':>3} {'blocks':<12} {'sharded':>14} {'replicated':>12} {'params':>14}")
    for r in ranks:
        blocks = ",".join(map(str, r["blocks"])) + ("+den" if r["denoiser"] else "")
        print(f"{r['pp_stage']:>5} {r['tp_rank']:>3} {blocks:<12} {r['sharded']:>14,} "
              f"{r['replicated']:>12,} {r['params']:>14,}")
    print(f"sum over ranks of sharded params {report['sum_sharded_over_ranks']:,} + replicated params "
          f"(once per stage) {report['replicated_once_per_stage']:,} = {recomposed:,}; "
          f"one-process total {total:,}: {'exact' if report['exact'] else 'MISMATCH'}")
    print(f"(sum of per-rank params {report['sum_of_rank_params']:,} = total + (tp-1) x replicated "
          f"= {total:,} + {report['replicated_copies_beyond_one']:,})")
    print(json.dumps({k: v for k, v in report.items() if k != "ranks"}))
    if not report["exact"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
