"""The ``launch.py`` / ``megatron-starflow`` command line: train | eval | sample, run here or
through a submitit executor (``--executor``)."""

from __future__ import annotations

import argparse
import errno
import functools
import sys

from megatron_starflow.cli import checks
from megatron_starflow.cli.evaluate import cmd_eval
from megatron_starflow.cli.quiet import quiet_warnings
from megatron_starflow.cli.sample import cmd_sample
from megatron_starflow.cli.train import cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = checks.ArgumentParser(prog="launch.py", description="megatron_starflow: STARFlow-V")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model")
    tr.add_argument("--config", type=checks.input_file,
                    help="YAML config (e.g. examples/configs/tiny_cpu.yaml)")
    tr.add_argument("--out", help="run folder (default: train.out_dir); an existing run resumes")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="held-out bits/dim and denoiser PSNR of a checkpoint")
    ev.add_argument("--checkpoint", required=True, type=checks.input_path)
    ev.add_argument("--batches", type=checks.integer(1), default=8, help="held-out batches (>= 1)")
    ev.add_argument("--suite", choices=["cpu"], default=None,
                    help="cpu: also prompt adherence, temporal consistency, I2V/V2V, long-video "
                         "drift, denoiser PSNR/SSIM, per-frame bits/dim -> JSON report + PNG page")
    ev.add_argument("--samples", type=checks.integer(1), default=16,
                    help="suite: T2V samples (held-out captions, >= 1)")
    ev.add_argument("--cfg", type=checks.GUIDANCE, default=1.0,
                    help=f"suite: guidance weight w in [0, {checks.GUIDANCE_MAX:g}]")
    ev.add_argument("--seed", type=checks.SEED, default=0,
                    help="suite: sampling seed in [0, 2^63 - 1]")
    ev.add_argument("--temperature", type=checks.TEMPERATURE, default=1.0,
                    help="suite: scale of the prior noise z in [0, 4] (1: the model's distribution)")
    ev.add_argument("--solver", choices=["sequential", "jacobi"], default="jacobi",
                    help="suite: sampler (jacobi: video-aware, tau 1e-3; sequential: exact)")
    ev.add_argument("--candidates", type=checks.integer(1), default=1,
                    help="suite: T2V best of N samples per caption, ranked by the flow's likelihood "
                         "ratio log p(x|caption) - log p(x|empty) (1: plain sampling)")
    ev.add_argument("--threads", type=checks.integer(0), default=0,
                    help="suite: torch threads (0: torch's default)")
    ev.add_argument("--out", help="suite: report JSON (default RUN/eval/cpu_suite_STEP.json)")
    ev.add_argument("--png", help="suite: page PNG (default: the report path with .png)")
    ev.add_argument("--overwrite", action="store_true",
                    help="suite: replace an existing report / page (otherwise an error)")
    ev.set_defaults(func=cmd_eval)
    sa = sub.add_parser("sample", help="write videos from a checkpoint")
    sa.add_argument("--checkpoint", required=True, type=checks.input_path)
    sa.add_argument("--task", choices=["t2v", "i2v", "v2v"], default="t2v")
    sa.add_argument("--prompt", action="append",
                    help="caption (repeat for several); a caption longer than the model's text "
                         "length (model.text_length tokens) is truncated to it, with a warning")
    sa.add_argument("--prompts", type=checks.input_file,
                    help="UTF-8 text file, one prompt per line (batched; truncated as --prompt)")
    sa.add_argument("--image", type=checks.input_file, help="i2v: first frame (PNG/JPEG/npy)")
    sa.add_argument("--video", type=checks.input_file, help="v2v: conditioning video")
    sa.add_argument("--context-frames", type=checks.integer(0), default=0,
                    help="v2v: frames of --video to keep (0: all)")
    sa.add_argument("--frames", type=checks.integer(1), default=None,
                    help="pixel frames to generate, >= 1, a count the codec makes (default: the "
                         "training length; more: a long video)")
    sa.add_argument("--long-context", type=checks.integer(0), default=0,
                    help="videos longer than training: latent frames re-encoded per window, below "
                         "the training length (0: 3/4 of it)")
    sa.add_argument("--cfg", type=checks.GUIDANCE, default=0.0,
                    help=f"guidance weight w in [0, {checks.GUIDANCE_MAX:g}] (0: none)")
    sa.add_argument("--seed", type=checks.SEED, default=0, help="in [0, 2^63 - 1]")
    sa.add_argument("--candidates", type=checks.integer(1), default=1,
                    help="best of N samples per prompt, ranked by the flow's likelihood ratio "
                         "log p(x|prompt) - log p(x|empty) (1: plain sampling)")
    sa.add_argument("--temperature", type=checks.TEMPERATURE, default=1.0,
                    help="scale of the prior noise z in [0, 4]: 1 samples the model's distribution, "
                         "lower values trade diversity for cleaner samples")
    sa.add_argument("--solver", choices=["sequential", "jacobi"], default="jacobi")
    sa.add_argument("--block-size", type=checks.integer(1), nargs="+", default=[16, 64],
                    help="Jacobi chunk sizes (>= 1): first frame [, later frames]")
    sa.add_argument("--tau", type=checks.TAU, default=1e-3,
                    help="Jacobi stop rule in [0, 1]: relative squared change (0: exact)")
    sa.add_argument("--out", default="out.mp4",
                    help="mp4 (a batch: OUT_0.mp4, OUT_1.mp4, ...); an existing file needs "
                         "--overwrite")
    sa.add_argument("--grid", help="also write a PNG frame grid here")
    sa.add_argument("--overwrite", action="store_true", help="replace existing --out / --grid files")
    sa.add_argument("--cp", type=checks.integer(1), default=1,
                    help="context-parallel ranks sharing the frames (pipelined Jacobi); spawns N "
                         "local gloo processes unless torchrun/SLURM started N")
    sa.set_defaults(func=cmd_sample)
    for sub_parser in (ev, sa):
        sub_parser.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                                help="training checkpoints: auto = the EMA weights when the "
                                     "checkpoint holds them (train.ema_decay > 0), else the raw ones")
    for sub_parser in (tr, ev, sa):
        sub_parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                                help="where to compute (default: train.device of the config, "
                                     "'auto' = cuda:LOCAL_RANK when CUDA is present, else cpu)")
        add_launcher_arguments(sub_parser)
    return parser


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor local|debug|slurm`` and its resources (megatron_starflow/launch/executors.py)."""
    g = p.add_argument_group("launcher (submitit)")
    g.add_argument("--executor", choices=["local", "debug", "slurm"], default=None,
                   help="run through submitit: local processes, in-process debug, or SLURM")
    g.add_argument("--nodes", type=checks.integer(1), default=None)
    g.add_argument("--gpus-per-node", type=checks.integer(1), default=None,
                   help="one task (process) per GPU; local CPU runs: processes")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default=None, type=_time, help="minutes or [D-]HH:MM[:SS]")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--cpus-per-task", type=checks.integer(1), default=None)
    g.add_argument("--mem", default=None)
    g.add_argument("--signal-delay-s", type=checks.integer(0), default=None)
    g.add_argument("--job-name", default=None)
    g.add_argument("--job-dir", default=None, help="submitit's folder (default RUN/submitit)")
    g.add_argument("--slurm-config", default=None, type=checks.input_file,
                   help="YAML of launcher settings (examples/slurm/)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the resolved config; submit nothing")


def _time(text: str) -> str:
    """``--time``: minutes or [D-]HH:MM[:SS], more than zero."""
    from megatron_starflow.launch.executors import parse_time_minutes

    try:
        minutes = parse_time_minutes(text)
    except ValueError:
        minutes = None
    if not minutes or minutes < 1:
        raise argparse.ArgumentTypeError(f"must be minutes >= 1 or [D-]HH:MM[:SS] of at least a "
                                         f"minute, got {text!r}")
    return text


def check_paths(args) -> None:
    """The checks that need more than one flag: outputs (``--overwrite``), flags that belong to
    another task, the number of --block-size values."""
    command = args.command
    if getattr(args, "job_dir", None):
        checks.check_output_folder("--job-dir", args.job_dir)
    if command == "train" and args.out:
        checks.check_output_folder("--out", args.out)
    if command == "eval" and args.suite is None:
        for flag in ("out", "png"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} is written by --suite cpu only; add --suite cpu")
    if command == "eval":
        for flag in ("out", "png"):
            if getattr(args, flag):
                checks.check_output_file(f"--{flag}", getattr(args, flag), args.overwrite)
    if command == "sample":
        if len(args.block_size) > 2:
            raise ValueError(f"--block-size takes 1 or 2 values (first frame [, later frames]), "
                             f"got {len(args.block_size)}")
        if args.image and args.task != "i2v":
            raise ValueError(f"--image is the first frame of --task i2v, not --task {args.task}")
        if args.video and args.task != "v2v":
            raise ValueError(f"--video is the given clip of --task v2v, not --task {args.task}")
        if args.context_frames and args.task != "v2v":
            raise ValueError(f"--context-frames applies to --task v2v, not --task {args.task}")
        # --out / --grid: checked by cmd_sample once the prompts (their count) are read


def main(argv=None, hooks=None) -> int:
    """``hooks``: a ``training.hooks.TrainHooks`` for ``train`` (tests inject faults through it;
    it travels with submitit tasks, so it must pickle)."""
    quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, code = checks.parse(build_parser(), argv)
    if args is None:  # a bad argument (one line printed, 2) or --help (0)
        return code
    args.hooks = hooks
    try:
        check_paths(args)
        if getattr(args, "executor", None) or getattr(args, "dry_run", False) \
                or getattr(args, "slurm_config", None):
            from megatron_starflow.launch.executors import launch

            entry = main if hooks is None else functools.partial(main, hooks=hooks)
            return launch(args.command, argv, args, entry=entry)
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "SamplingDiverged":
            raise
        print(f"error: {exc}", file=sys.stderr)  # a chunk went NaN / inf: stopped, named
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # checkpoints are written under a temporary name and renamed when complete, so the one
        # being written is discarded and `latest` names the previous one; outputs likewise
        print(f"error: no space left on device ({exc.filename or exc}); nothing half-written is "
              f"used: the previous checkpoint is still `latest` and the same command resumes from "
              f"it once space is freed", file=sys.stderr)
        return 1
