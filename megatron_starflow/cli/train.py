"""``launch.py train``: train, then (rank 0) print a JSON summary of the run."""

from __future__ import annotations

import json
import os


def cmd_train(args) -> int:
    from megatron_starflow.config import load_config
    from megatron_starflow.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "device", None):
        cfg.train.device = args.device
    run_dir = args.out or cfg.train.out_dir
    if not args.out:  # --out itself was checked before the config was read
        from megatron_starflow.cli.checks import check_output_folder

        check_output_folder("train.out_dir", run_dir)
    result = train(cfg, run_dir, hooks=getattr(args, "hooks", None))
    if int(os.environ.get("RANK", "0")) != 0:  # multi-process launch: rank 0 reports
        return 0
    summary = {
        "run_dir": result.run_dir, "steps": result.steps, "skipped_steps": result.skipped,
        "train_seconds": round(result.seconds, 1),
        "heldout_bits_per_dim_start": result.eval_start["bits_per_dim"],
        "heldout_bits_per_dim_end": result.eval_end["bits_per_dim"],
        "bits_per_dim_kind": result.eval_end["bits_per_dim_kind"],
    }
    if "pixel_bits_per_dim" in result.eval_end:
        summary["heldout_pixel_bits_per_dim_start"] = result.eval_start["pixel_bits_per_dim"]
        summary["heldout_pixel_bits_per_dim_end"] = result.eval_end["pixel_bits_per_dim"]
    if "denoiser_psnr_gain_db" in result.eval_end:
        summary["denoiser_psnr_gain_db"] = result.eval_end["denoiser_psnr_gain_db"]
    if getattr(result, "preempted", False):
        summary["preempted"], summary["stop_reason"] = True, result.stop_reason
    print(json.dumps(summary, indent=2))
    return 0
