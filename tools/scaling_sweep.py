#!/usr/bin/env python
"""Scaling-law sweep: train a grid of model sizes x token budgets, collect each run's final
held-out bits/dim from its metrics.jsonl, fit

    L(N)    = a * N^-alpha + c                 (per token budget; c = 0 with only 2 sizes)
    L(N, D) = E + A * N^-alpha + B * D^-beta   (when the grid has >= 2 sizes, >= 2 budgets and
                                                at least 6 runs)

where N = flow parameters (shallow + deep blocks, without text projections and denoiser) and
D = latent tokens seen (steps * global batch * tokens per clip), and write a CSV, a PNG plot (PIL)
and the fitted exponents (JSON, also printed).

    # CPU: 4 sizes x 2 budgets, one process per run, one run at a time
    python tools/scaling_sweep.py --out runs/scaling --sizes xs,s,m,l --steps 60,100
    # SLURM: submit every grid point (launch.py --executor slurm), later collect + fit
    python tools/scaling_sweep.py --out runs/scaling_7b --config examples/configs/starflow_v_7b_480p.yaml \\
        --sizes ... --steps ... --executor slurm --nodes 1 --gpus-per-node 8 --partition h100
    python tools/scaling_sweep.py --out runs/scaling_7b --sizes ... --steps ... --collect-only

Sizes are names of SIZES below or ``SHALLOW/DEEP/DEEP_LAYERS`` widths (e.g. ``32/64/2``).
Extra ``section.key=value`` overrides go to every run. The fitter is plain numpy: variable
projection (for each exponent on a fine log grid, a, c by linear least squares; then a golden-
section refinement of the best exponent).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (shallow_width, deep_width, deep_layers); head_dim 16 everywhere
SIZES = {
    "xs": (16, 32, 1),
    "s": (32, 64, 2),
    "m": (48, 96, 3),
    "l": (64, 128, 4),
    "xl": (96, 192, 4),
}
# What every CPU sweep run shares (small clips, one denoiser layer, sparse logging).
CPU_BASE = ["data.frames=4", "data.height=16", "data.width=16", "data.batch_size=8",
            "data.num_train_clips=1024", "data.num_heldout_clips=32", "model.head_dim=16",
            "model.shallow_layers=1", "model.denoiser_layers=1", "train.warmup_steps=10",
            "train.eval_batches=4", "train.log_every=10", "train.wandb_mode=disabled"]


def parse_size(spec: str) -> tuple[str, tuple[int, int, int]]:
    if spec in SIZES:
        return spec, SIZES[spec]
    parts = spec.split("/")
    if len(parts) != 3:
        raise ValueError(f"size {spec!r}: a name of {sorted(SIZES)} or SHALLOW/DEEP/DEEP_LAYERS")
    s, d, layers = (int(p) for p in parts)
    return f"s{s}_d{d}x{layers}", (s, d, layers)


def size_overrides(widths: tuple[int, int, int]) -> list[str]:
    s, d, layers = widths
    return [f"model.shallow_width={s}", f"model.deep_width={d}", f"model.deep_layers={layers}"]


def run_overrides(widths, steps: int, extra: list[str], cpu_base: bool) -> list[str]:
    ov = (CPU_BASE if cpu_base else []) + size_overrides(widths)
    ov += [f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
           f"train.warmup_steps={max(0, min(steps // 6, 10))}"]
    return ov + list(extra)


def model_size(config: str | None, overrides: list[str]) -> tuple[int, int]:
    """(N flow parameters, latent tokens per clip) from the config, on the meta device."""
    import torch

    from megatron_starflow.config import load_config
    from megatron_starflow.models.starflow import StarFlowV, count_parameters
    from megatron_starflow.parallel.state import ensure_single_process, latent_grid

    cfg = load_config(config, overrides)
    ensure_single_process()
    with torch.device("meta"):
        parts = count_parameters(StarFlowV(cfg.model))
    t, h, w = latent_grid(cfg)
    return int(parts["shallow"] + parts["deep"]), int(t * h * w)


def final_heldout(run_dir: str, metric: str) -> tuple[float | None, int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None, 0
    rows = [json.loads(line) for line in open(path) if line.strip()]
    held = [r for r in rows if r.get("split") == "heldout" and metric in r]
    if not held:
        return None, 0
    last = held[-1]
    return float(last[metric]), int(last["step"])


# ------------------------------------------------------------------------------ fitting

def _golden(f, lo: float, hi: float, iters: int = 60) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_power_law(n, loss, with_offset: bool | None = None) -> dict:
    """L = a * N^-alpha + c by least squares (c = 0 when ``with_offset`` is False, or when there
    are fewer than 3 distinct N). Returns a, alpha, c, rmse, points."""
    n = np.asarray(n, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if len(n) < 2 or len(set(n.tolist())) < 2:
        raise ValueError("a power-law fit needs at least 2 distinct model sizes")
    if with_offset is None:
        with_offset = len(set(n.tolist())) >= 3
    x = n / n.min()  # conditioning: a refers to N / N_min, converted back below

    def solve(alpha):
        cols = [x ** -alpha] + ([np.ones_like(x)] if with_offset else [])
        design = np.stack(cols, 1)
        coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
        resid = design @ coef - loss
        return float(resid @ resid), coef

    grid = np.exp(np.linspace(math.log(1e-3), math.log(4.0), 400))
    errs = [solve(a)[0] for a in grid]
    i = int(np.argmin(errs))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    alpha = _golden(lambda a: solve(a)[0], lo, hi)
    sse, coef = solve(alpha)
    a = float(coef[0]) * n.min() ** alpha
    c = float(coef[1]) if with_offset else 0.0
    return {"a": a, "alpha": float(alpha), "c": c, "rmse": math.sqrt(sse / len(n)),
            "points": int(len(n)), "with_offset": bool(with_offset)}


def fit_joint(n, d, loss) -> dict:
    """L = E + A * N^-alpha + B * D^-beta: (E, A, B) by linear least squares for each (alpha,
    beta) of a log grid, then a coordinate-wise golden refinement."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if len(loss) < 6 or len(set(n.tolist())) < 2 or len(set(d.tolist())) < 2:
        raise ValueError("the joint fit needs >= 6 runs with >= 2 sizes and >= 2 budgets")
    xn, xd = n / n.min(), d / d.min()

    def solve(alpha, beta):
        design = np.stack([np.ones_like(xn), xn ** -alpha, xd ** -beta], 1)
        coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
        resid = design @ coef - loss
        return float(resid @ resid), coef

    grid = np.exp(np.linspace(math.log(1e-3), math.log(4.0), 80))
    best = min(((solve(a, b)[0], a, b) for a in grid for b in grid))
    _, alpha, beta = best
    for _ in range(3):
        alpha = _golden(lambda a: solve(a, beta)[0], alpha / 1.5, alpha * 1.5, 40)
        beta = _golden(lambda b: solve(alpha, b)[0], beta / 1.5, beta * 1.5, 40)
    sse, coef = solve(alpha, beta)
    return {"E": float(coef[0]), "A": float(coef[1]) * n.min() ** alpha, "alpha": float(alpha),
            "B": float(coef[2]) * d.min() ** beta, "beta": float(beta),
            "rmse": math.sqrt(sse / len(loss)), "points": int(len(loss))}


# ------------------------------------------------------------------------------ plot (PIL)

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def plot(rows: list[dict], fits: dict, path: str, metric: str, width: int = 760, height: int = 520) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, 190, 40, 60
    pts = [(r["params"], r["loss"], r["steps"]) for r in rows if r["loss"] is not None]
    if not pts:
        img.save(path)
        return
    ns = [p[0] for p in pts]
    ls = [p[1] for p in pts]
    lx0, lx1 = math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1
    y0, y1 = min(ls), max(ls)
    pad = 0.1 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(nv, lv):
        x = left + (math.log10(nv) - lx0) / (lx1 - lx0) * (width - left - right)
        y = top + (y1 - lv) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in range(math.floor(lx0), math.ceil(lx1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lx0 <= math.log10(v) <= lx1:
                x, _ = to_px(v, y0)
                draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
                draw.text((x - 14, height - bottom + 8), f"{v:.0e}" if m == 1 else "", fill="black", font=font)
    for k in range(6):
        lv = y0 + k * (y1 - y0) / 5
        _, y = to_px(10 ** lx0, lv)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((8, y - 6), f"{lv:.3f}", fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 70, height - 25),
              "N (flow parameters, log)", fill="black", font=font)
    draw.text((8, 12), f"final held-out {metric}", fill="black", font=font)
    budgets = sorted({p[2] for p in pts})
    for bi, steps in enumerate(budgets):
        colour = COLOURS[bi % len(COLOURS)]
        for nv, lv, s in pts:
            if s == steps:
                x, y = to_px(nv, lv)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        fit = fits.get(f"steps_{steps}")
        if fit:
            curve = []
            for i in range(101):
                nv = 10 ** (lx0 + (lx1 - lx0) * i / 100)
                lv = fit["a"] * nv ** -fit["alpha"] + fit["c"]
                if y0 <= lv <= y1:
                    curve.append(to_px(nv, lv))
            if len(curve) > 1:
                draw.line(curve, fill=colour, width=2)
        label = f"{steps} steps" + (f": alpha={fit['alpha']:.3f}" if fit else "")
        draw.rectangle([width - right + 12, top + 8 + 18 * bi, width - right + 22, top + 18 + 18 * bi], fill=colour)
        draw.text((width - right + 28, top + 7 + 18 * bi), label, fill="black", font=font)
    joint = fits.get("joint")
    if joint:
        draw.text((width - right + 12, top + 30 + 18 * len(budgets)),
                  f"L(N,D): alpha={joint['alpha']:.3f}\n        beta={joint['beta']:.3f}",
                  fill="black", font=font)
    img.save(path)


# ------------------------------------------------------------------------------ the sweep

def _sizes(text: str) -> list:
    try:
        sizes = [parse_size(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes or any(v < 1 for _, widths in sizes for v in widths):
        raise argparse.ArgumentTypeError(f"must be names of {sorted(SIZES)} or SHALLOW/DEEP/LAYERS "
                                         f"with positive integers, comma-separated, got {text!r}")
    return sizes


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"must be training steps >= 1, comma-separated, got {text!r}")
    return budgets


def _count_text(text: str) -> str:
    """A count >= 1, kept as text (it is passed on to launch.py)."""
    from megatron_starflow.cli import checks

    return str(checks.integer(1)(text))


def main(argv=None) -> int:
    from megatron_starflow.cli import checks

    p = checks.ArgumentParser(prog="tools/scaling_sweep.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (one run folder per grid point; an "
                                                "existing sweep is continued)")
    p.add_argument("--config", default=os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
                   type=checks.input_file)
    p.add_argument("--sizes", default="xs,s,m,l", type=_sizes,
                   help=f"comma-separated names of {sorted(SIZES)} or SHALLOW/DEEP/DEEP_LAYERS")
    p.add_argument("--steps", default="60,100", type=_budgets,
                   help="token budgets as training steps (>= 1, comma-separated)")
    p.add_argument("--metric", default="bits_per_dim", help="held-out metric to fit (or pixel_bits_per_dim)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: one process per run, here, one after the other; slurm: submit "
                        "each run through launch.py --executor slurm (collect later)")
    p.add_argument("--no-cpu-base", action="store_true", help="do not add the small-CPU settings")
    p.add_argument("--collect-only", action="store_true", help="only collect, fit and plot")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--threads", type=checks.integer(0), default=0,
                   help="local: torch threads per run (0: torch's default)")
    p.add_argument("--nodes", default="1", type=_count_text)
    p.add_argument("--gpus-per-node", default="8", type=_count_text)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args, code = checks.parse(p, argv)
    if args is None:
        return code
    checks.or_usage_error(p, checks.check_output_folder, "--out", args.out)
    sizes, budgets = args.sizes, args.steps
    os.makedirs(args.out, exist_ok=True)
    cpu_base = not args.no_cpu_base and args.executor == "local"
    extra = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
    rows = []
    for name, widths in sizes:
        for steps in budgets:
            run_dir = os.path.join(args.out, f"{name}_steps{steps}")
            ov = run_overrides(widths, steps, extra, cpu_base)
            cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "train", "--config", args.config,
                   "--out", run_dir]
            if args.executor == "slurm":
                cmd += ["--executor", "slurm", "--nodes", args.nodes, "--gpus-per-node", args.gpus_per_node]
                for flag in ("partition", "time", "account"):
                    if getattr(args, flag):
                        cmd += [f"--{flag}", getattr(args, flag)]
            cmd += ov
            done_loss, done_step = final_heldout(run_dir, args.metric)
            seconds = None
            if args.dry_run:
                print(" ".join(cmd))
            elif not args.collect_only and done_step < steps:
                t0 = time.time()
                # not this process's one-rank rendezvous (model_size() initialises one)
                env = {k: v for k, v in os.environ.items() if k not in
                       ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env=dict(env, PYTHONWARNINGS="ignore"))
                seconds = round(time.time() - t0, 1)
                if proc.returncode != 0:
                    print(f"run {run_dir} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                print(f"{run_dir}: exit {proc.returncode} in {seconds}s", file=sys.stderr, flush=True)
            loss, at = final_heldout(run_dir, args.metric)
            n_params, tokens_per_clip = model_size(args.config, ov)
            from megatron_starflow.config import load_config

            cfg = load_config(args.config, ov)
            tokens = steps * cfg.data.batch_size * tokens_per_clip
            rows.append({"size": name, "shallow_width": widths[0], "deep_width": widths[1],
                         "deep_layers": widths[2], "params": n_params, "steps": steps,
                         "tokens": tokens, "loss": loss if at == steps else None,
                         "metric": args.metric, "run_dir": run_dir, "seconds": seconds})
    if args.dry_run:
        return 0
    csv_path = os.path.join(args.out, "scaling.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fits: dict = {}
    done = [r for r in rows if r["loss"] is not None]
    for steps in budgets:
        pts = [r for r in done if r["steps"] == steps]
        try:
            fits[f"steps_{steps}"] = fit_power_law([r["params"] for r in pts], [r["loss"] for r in pts])
        except ValueError as exc:
            fits[f"steps_{steps}"] = None
            print(f"L(N) at {steps} steps: not fitted ({exc})", file=sys.stderr)
    try:
        fits["joint"] = fit_joint([r["params"] for r in done], [r["tokens"] for r in done],
                                  [r["loss"] for r in done])
    except ValueError as exc:
        fits["joint"] = None
        print(f"L(N, D): not fitted ({exc})", file=sys.stderr)
    png = os.path.join(args.out, "scaling.png")
    plot(rows, fits, png, args.metric)
    summary = {"csv": csv_path, "png": png, "metric": args.metric, "runs": len(rows),
               "finished": len(done), "fits": fits}
    with open(os.path.join(args.out, "fits.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
