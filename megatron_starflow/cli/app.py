"""The ``launch.py`` / ``megatron-starflow`` command line: train | eval | sample, run here or
through a submitit executor (``--executor``)."""

from __future__ import annotations

import argparse
import functools
import sys

from megatron_starflow.cli.evaluate import cmd_eval
from megatron_starflow.cli.quiet import quiet_warnings
from megatron_starflow.cli.sample import cmd_sample
from megatron_starflow.cli.train import cmd_train


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


def main(argv=None, hooks=None) -> int:
    """``hooks``: a ``training.hooks.TrainHooks`` for ``train`` (tests inject faults through it;
    it travels with submitit tasks, so it must pickle)."""
    quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.hooks = hooks
    try:
        if getattr(args, "executor", None) or getattr(args, "dry_run", False) \
                or getattr(args, "slurm_config", None):
            from megatron_starflow.launch.executors import launch

            entry = main if hooks is None else functools.partial(main, hooks=hooks)
            return launch(args.command, argv, args, entry=entry)
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
