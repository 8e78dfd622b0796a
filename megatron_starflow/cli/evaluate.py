"""``launch.py eval``: held-out likelihood of a checkpoint, or (``--suite cpu``) the quality report
of ``megatron_starflow/evaluation/report.py``."""

from __future__ import annotations

import json
import os
import time


def cmd_eval(args) -> int:
    if getattr(args, "suite", None) == "cpu":
        return cmd_eval_cpu_suite(args)
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.data.datasets import make_datasets
    from megatron_starflow.evaluation.likelihood import evaluate

    system, step, step_dir = load_system(args.checkpoint, getattr(args, "device", None),
                                         getattr(args, "weights", "auto"))
    data = make_datasets(system.cfg)
    result = evaluate(system, data.heldout, batches=args.batches, batch_size=system.cfg.data.batch_size)
    print(json.dumps({"checkpoint": step_dir, "step": step, **result}, indent=2))
    return 0


def cmd_eval_cpu_suite(args) -> int:
    import torch

    from megatron_starflow.cli import checks
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.evaluation.report import run_cpu_suite, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    system, step, step_dir = load_system(args.checkpoint, getattr(args, "device", None),
                                         getattr(args, "weights", "auto"))
    out = args.out
    if not out:
        parent = os.path.dirname(step_dir)
        run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else step_dir
        out = os.path.join(run_dir, "eval", f"cpu_suite_{os.path.basename(step_dir)}.json")
    png = args.png or os.path.splitext(out)[0] + ".png"
    if not (args.out and args.png):  # explicit paths were checked before loading
        checks.check_output_file("--out", out, args.overwrite)
        checks.check_output_file("--png", png, args.overwrite)
    report, images = run_cpu_suite(system, samples=args.samples, guidance=args.cfg, seed=args.seed,
                                   batches=args.batches, solver=args.solver,
                                   temperature=args.temperature, candidates=args.candidates)
    report = {"checkpoint": step_dir, "step": step, "suite": "cpu", **report}
    report["seconds"]["total"] = round(time.time() - t0, 2)
    title = f"{step_dir} (step {step}): CPU quality suite"
    write_report(report, images, out, png, title)
    print(json.dumps({"checkpoint": step_dir, "step": step, "report": out, "page": png,
                      "seconds": report["seconds"], **report["summary"]}, indent=2))
    return 0
