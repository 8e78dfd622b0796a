"""Command-line entry points behind ``launch.py``: train | eval | sample."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _quiet_warnings() -> None:
    import warnings

    # megatron-core warns at import that TE/apex are absent: expected on CPU, noise for users.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)


def cmd_train(args) -> int:
    from megatron_starflow.config import load_config
    from megatron_starflow.training.loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = args.out or cfg.train.out_dir
    result = train(cfg, run_dir)
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


def load_system(checkpoint: str):
    """A training checkpoint (run / checkpoints / step folder) or an inference folder written by
    ``tools/convert_checkpoint.py export`` / ``tools/import_ml_starflow.py`` -> (system, step, folder)."""
    from megatron_starflow.convert.inference import is_inference_folder, load_inference_system

    if is_inference_folder(checkpoint):
        _, system, meta = load_inference_system(checkpoint)
        return system, int(meta.get("step", 0) or 0), checkpoint
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import load_checkpoint

    cfg, state, step_dir = load_checkpoint(checkpoint)
    ensure_single_process()
    system = StarFlowSystem(cfg, step_dir)
    system.load_trainable_state_dict(state["model"])
    system.eval()
    return system, state.get("step", 0), step_dir


def cmd_eval(args) -> int:
    from megatron_starflow.data.datasets import make_datasets

    if getattr(args, "suite", None) == "cpu":
        return cmd_eval_cpu_suite(args)
    system, step, step_dir = load_system(args.checkpoint)
    data = make_datasets(system.cfg)
    from megatron_starflow.evaluation.likelihood import evaluate

    result = evaluate(system, data.heldout, batches=args.batches, batch_size=system.cfg.data.batch_size)
    print(json.dumps({"checkpoint": step_dir, "step": step, **result}, indent=2))
    return 0


def cmd_eval_cpu_suite(args) -> int:
    """``eval --suite cpu``: the quality report of megatron_starflow/evaluation/report.py."""
    import torch

    from megatron_starflow.evaluation.report import run_cpu_suite, write_report

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    system, step, step_dir = load_system(args.checkpoint)
    out = args.out
    if not out:
        parent = os.path.dirname(step_dir)
        run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else step_dir
        out = os.path.join(run_dir, "eval", f"cpu_suite_{os.path.basename(step_dir)}.json")
    png = args.png or os.path.splitext(out)[0] + ".png"
    report, images = run_cpu_suite(system, samples=args.samples, guidance=args.cfg, seed=args.seed,
                                   batches=args.batches)
    report = {"checkpoint": step_dir, "step": step, "suite": "cpu", **report}
    report["seconds"]["total"] = round(time.time() - t0, 2)
    title = f"{step_dir} (step {step}): CPU quality suite"
    write_report(report, images, out, png, title)
    print(json.dumps({"checkpoint": step_dir, "step": step, "report": out, "page": png,
                      "seconds": report["seconds"], **report["summary"]}, indent=2))
    return 0


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"prompt file {args.prompts!r} does not exist")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {args.prompts!r} holds no prompts (one per line)")
    return prompts


def conditioning_frames(args):
    """The given frames of --task i2v / v2v as a uint8 tensor [F, H, W, 3] (None for t2v)."""
    import torch

    from megatron_starflow.sampling.video_io import read_video

    if args.task not in ("i2v", "v2v"):
        return None
    source = args.image if args.task == "i2v" else args.video
    if not source:
        raise ValueError(f"--task {args.task} needs --{'image' if args.task == 'i2v' else 'video'} PATH")
    frames = read_video(source)
    if args.task == "i2v":
        frames = frames[:1]
    elif args.context_frames:
        frames = frames[:args.context_frames]
    return torch.from_numpy(frames)


def write_samples(args, out, fps: int, step: int, prompts: list[str], solver: str) -> dict:
    """Write one mp4 per prompt (and the optional PNG grid); return the JSON record of the call."""
    from megatron_starflow.sampling.video_io import auto_upscale, frame_grid, write_mp4, write_png

    video = out.video.numpy()
    up = auto_upscale(video.shape[2])
    paths = []
    root, ext = os.path.splitext(args.out)
    for i in range(video.shape[0]):
        path = args.out if video.shape[0] == 1 else f"{root}_{i}{ext or '.mp4'}"
        paths.append(write_mp4(path, video[i], fps=min(fps, 8), upscale=up))
    if args.grid:
        write_png(args.grid, frame_grid(video, upscale=max(1, up // 2)))
    return {"task": args.task, "prompts": prompts, "outputs": paths, "grid": args.grid,
            "checkpoint_step": step, "solver": solver, "cfg": args.cfg, "seed": args.seed,
            "seconds": {k: round(v, 3) for k, v in out.seconds.items()},
            "deep_network_evals": out.deep.network_evals,
            "shallow_network_evals": out.shallow.network_evals,
            "jacobi_iterations": out.deep.iterations}


def cmd_sample(args) -> int:
    from megatron_starflow.sampling.generate import check_prompts, generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    if getattr(args, "cp", 1) != 1:  # context-parallel: N ranks share the frames
        from megatron_starflow.sampling.cp_jacobi import cmd_sample_cp

        return cmd_sample_cp(args)
    prompts = _read_prompts(args)
    check_prompts(prompts)
    prefix = conditioning_frames(args)
    system, step, _ = load_system(args.checkpoint)
    opts = SolverOptions(solver=args.solver, first_block=args.block_size[0],
                         later_block=args.block_size[-1], tau=args.tau, guidance=args.cfg)
    out = generate(system, prompts, args.frames, args.seed, opts, prefix,
                   context_frames=args.long_context)
    print(json.dumps(write_samples(args, out, system.cfg.data.fps, step, prompts, args.solver)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description="megatron_starflow: STARFlow-V")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model")
    tr.add_argument("--config", help="YAML config (e.g. examples/configs/tiny_cpu.yaml)")
    tr.add_argument("--out", help="run folder (default: train.out_dir)")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="held-out bits/dim and denoiser PSNR of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--batches", type=int, default=8)
    ev.add_argument("--suite", choices=["cpu"], default=None,
                    help="cpu: also prompt adherence, temporal consistency, I2V/V2V, long-video "
                         "drift, denoiser PSNR/SSIM, per-frame bits/dim -> JSON report + PNG page")
    ev.add_argument("--samples", type=int, default=16, help="suite: T2V samples (held-out captions)")
    ev.add_argument("--cfg", type=float, default=1.0, help="suite: guidance weight w")
    ev.add_argument("--seed", type=int, default=0, help="suite: sampling seed")
    ev.add_argument("--threads", type=int, default=0, help="suite: torch threads (0: torch's default)")
    ev.add_argument("--out", help="suite: report JSON (default RUN/eval/cpu_suite_STEP.json)")
    ev.add_argument("--png", help="suite: page PNG (default: the report path with .png)")
    ev.set_defaults(func=cmd_eval)
    sa = sub.add_parser("sample", help="write videos from a checkpoint")
    sa.add_argument("--checkpoint", required=True)
    sa.add_argument("--task", choices=["t2v", "i2v", "v2v"], default="t2v")
    sa.add_argument("--prompt", action="append", help="caption (repeat for several)")
    sa.add_argument("--prompts", help="text file, one prompt per line (batched)")
    sa.add_argument("--image", help="i2v: first frame (PNG/JPEG/npy)")
    sa.add_argument("--video", help="v2v: conditioning video")
    sa.add_argument("--context-frames", type=int, default=0, help="v2v: frames of --video to keep")
    sa.add_argument("--frames", type=int, default=0, help="pixel frames to generate (default: training length)")
    sa.add_argument("--long-context", type=int, default=0,
                    help="videos longer than training: latent frames re-encoded per window (default 3/4)")
    sa.add_argument("--cfg", type=float, default=0.0, help="guidance weight w")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--solver", choices=["sequential", "jacobi"], default="jacobi")
    sa.add_argument("--block-size", type=int, nargs="+", default=[16, 64],
                    help="Jacobi chunk sizes: first frame [, later frames]")
    sa.add_argument("--tau", type=float, default=1e-3)
    sa.add_argument("--out", default="out.mp4")
    sa.add_argument("--grid", help="also write a PNG frame grid here")
    sa.add_argument("--cp", type=int, default=1,
                    help="context-parallel ranks sharing the frames (pipelined Jacobi); spawns N "
                         "local gloo processes unless torchrun/SLURM started N")
    sa.set_defaults(func=cmd_sample)
    for sub_parser in (tr, ev, sa):
        add_launcher_arguments(sub_parser)
    return parser


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor local|debug|slurm`` and its resources (megatron_starflow/launch/executors.py)."""
    g = p.add_argument_group("launcher (submitit)")
    g.add_argument("--executor", choices=["local", "debug", "slurm"], default=None,
                   help="run through submitit: local processes, in-process debug, or SLURM")
    g.add_argument("--nodes", type=int, default=None)
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="one task (process) per GPU; local CPU runs: processes")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default=None, help="minutes or [D-]HH:MM[:SS]")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None)
    g.add_argument("--signal-delay-s", type=int, default=None)
    g.add_argument("--job-name", default=None)
    g.add_argument("--job-dir", default=None, help="submitit's folder (default RUN/submitit)")
    g.add_argument("--slurm-config", default=None, help="YAML of launcher settings (examples/slurm/)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the resolved config; submit nothing")


def main(argv=None) -> int:
    _quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "executor", None) or getattr(args, "dry_run", False) \
                or getattr(args, "slurm_config", None):
            from megatron_starflow.launch.executors import launch

            return launch(args.command, argv, args)
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
