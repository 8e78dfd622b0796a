#!/usr/bin/env python
"""Per-GPU memory of a preset under TP x PP x DP: parameters, gradients, optimizer, activations.

    python tools/estimate_memory.py --preset 7b                       # table over 96-GPU layouts + recommendation
    python tools/estimate_memory.py --preset 7b --tp 2 --pp 1 --dp 48 --recompute --distributed-optimizer
    python tools/estimate_memory.py --preset 7b --gpus 192 --micro-batch 1 --gpu-gb 80 [--json]

The formulas (bytes per parameter, saved activations per layer of our stacks, pipeline in-flight
micro-batches) are in ``megatron_starflow/parallel/memory.py``; parameter counts per stage and TP
rank come from the model built on the meta device. Memory per GPU is the maximum over pipeline
stages. "fits" means under the GPU's memory less ``--reserve`` (default 10 %: CUDA context, NCCL
buffers, allocator fragmentation, transient gradient buffers of the backward).
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def main(argv=None) -> dict:
    from megatron_starflow.config import load_config
    from megatron_starflow.parallel import memory

    from megatron_starflow.cli import checks
    from megatron_starflow.config import PRESETS

    parser = checks.ArgumentParser(prog="tools/estimate_memory.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", choices=list(PRESETS))
    parser.add_argument("--config", type=checks.input_file)
    parser.add_argument("--tp", type=checks.integer(1), help=">= 1")
    parser.add_argument("--pp", type=checks.integer(1), help=">= 1")
    parser.add_argument("--dp", type=checks.integer(1), help=">= 1")
    parser.add_argument("--gpus", type=checks.integer(1), default=96, help=">= 1")
    parser.add_argument("--recompute", action="store_true", help="the single layout: with recompute")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="the single layout: shard master weights + Adam over DP (the table always uses it)")
    parser.add_argument("--micro-batch", type=checks.integer(1), default=1, help=">= 1")
    parser.add_argument("--no-sp", action="store_true", help="sequence parallelism off (on by default when tp > 1)")
    parser.add_argument("--gpu-gb", type=checks.real(0.0, None, lo_open=True), default=80.0,
                        help="memory of one GPU in GB (> 0)")
    parser.add_argument("--reserve", type=checks.real(0.0, 1.0, hi_open=True), default=0.10,
                        help="fraction kept free, in [0, 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    checks.or_usage_error(parser, load_config, args.config, args.overrides, preset=args.preset)
    cfg = load_config(args.config, args.overrides, preset=args.preset)
    inventory = memory.param_inventory(cfg)
    budget = args.gpu_gb * 1e9 * (1 - args.reserve)
    report = {"preset": cfg.preset, "gpus": args.gpus, "gpu_gb": args.gpu_gb, "budget_gb": budget / 1e9,
              "micro_batch": args.micro_batch, "total_params": inventory.total}

    if args.tp or args.pp or args.dp:
        tp, pp = args.tp or 1, args.pp or 1
        dp = args.dp or max(1, args.gpus // (tp * pp))
        layout = memory.Layout(tp, pp, dp, not args.no_sp, args.recompute, args.distributed_optimizer,
                               args.micro_batch)
        single = memory.estimate(cfg, layout, inventory)
        report["layout"] = single
        if not args.json:
            print(f"{cfg.preset}: tp={tp} pp={pp} dp={dp} sp={layout.sp and tp > 1} recompute={args.recompute} "
                  f"distributed_optimizer={args.distributed_optimizer} micro_batch={args.micro_batch}  (GB = 1e9 bytes)")
            print(f"{'stage':>5} {'blocks':<14} {'params/rank':>12} {'in-flight':>9} {'params':>7} "
                  f"{'grads':>6} {'optim':>6} {'activ':>6} {'total':>6}")
            for r in single["stages"]:
                blocks = ",".join(map(str, r["blocks"])) + ("+den" if r["stage"] == 0 else "")
                print(f"{r['stage']:>5} {blocks:<14} {r['params_per_rank'] / 1e9:>11.3f}B "
                      f"{r['in_flight_microbatches']:>9} {_gb(r['params']):>7} {_gb(r['grads']):>6} "
                      f"{_gb(r['optimizer']):>6} {_gb(r['activations']):>6} {_gb(r['total']):>6}")
            fits = single["max_total"] <= budget
            print(f"max over ranks: {_gb(single['max_total'])} GB (stage {single['max_stage']}); budget "
                  f"{budget / 1e9:.0f} GB: {'fits' if fits else 'DOES NOT FIT'}")
            worst = max(single["stages"], key=lambda r: r["checkpoint_total"])
            whole = sum(r["checkpoint_total"] * tp * dp for r in single["stages"])
            print(f"sharded checkpoint: each rank writes {_gb(worst['checkpoint_total'])} GB "
                  f"({_gb(worst['checkpoint_optimizer'])} GB fp32 master + Adam rows, "
                  f"{_gb(worst['checkpoint_weights'])} GB weights on average; stage "
                  f"{worst['stage']}); the whole checkpoint is {_gb(whole)} GB\n")

    results = [memory.estimate(cfg, lay, inventory)
               for lay in memory.candidate_layouts(cfg, args.gpus, micro_batch=args.micro_batch)]
    report["table"] = [{**r["layout"], "max_total_gb": r["max_total"] / 1e9, "max_stage": r["max_stage"],
                        "params_gb": r["max_row"]["params"] / 1e9, "grads_gb": r["max_row"]["grads"] / 1e9,
                        "optimizer_gb": r["max_row"]["optimizer"] / 1e9,
                        "activations_gb": r["max_row"]["activations"] / 1e9,
                        "fits": r["max_total"] <= budget} for r in results]
    best = memory.recommend(results, budget)
    report["recommended"] = None if best is None else best["layout"]
    if args.json:
        print(json.dumps(report, indent=1))
        return report
    print(f"{cfg.preset} on {args.gpus} x {args.gpu_gb:.0f} GB GPUs, bf16 + distributed optimizer, "
          f"SP when tp > 1, micro-batch {args.micro_batch}; GB per GPU (max over pipeline stages), "
          f"budget {budget / 1e9:.0f} GB")
    rows: dict = {}
    for row in report["table"]:
        rows.setdefault((row["tp"], row["pp"], row["dp"]), {})[row["recompute"]] = row
    print("| tp | pp | dp | params+grads+optimizer | activations | total | activations, recompute | "
          "total, recompute | fits (recompute) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for (tp, pp, dp), pair in rows.items():
        off, on = pair[False], pair[True]
        static = on["params_gb"] + on["grads_gb"] + on["optimizer_gb"]
        fits = ("yes" if off["fits"] else "no") + f" ({'yes' if on['fits'] else 'no'})"
        print(f"| {tp} | {pp} | {dp} | {static:.1f} | {off['activations_gb']:.1f} | "
              f"{off['max_total_gb']:.1f} | {on['activations_gb']:.1f} | {on['max_total_gb']:.1f} | {fits} |")
    if best is None:
        print("no candidate layout fits; raise --gpus, lower data sizes or the micro-batch")
    else:
        lay = best["layout"]
        print(f"recommended: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} sp={lay['sp']} "
              f"recompute={lay['recompute']} distributed optimizer, {best['max_total'] / 1e9:.1f} GB per GPU "
              f"(rule: no recompute if anything fits without it, then the smallest tp*pp, then fewest stages)")
    return report


if __name__ == "__main__":
    main()
