#!/usr/bin/env python
"""Recipe sweep for prompt adherence: train a few named recipes (a base config plus overrides),
keep a checkpoint every ``--ckpt-every`` steps, score T2V prompt adherence of every checkpoint on
the held-out captions (the analyser of ``evaluation/analyser.py``) for a grid of guidance weights,
prior temperatures, best-of-N candidates (``sampling/rerank.py``) and weights (EMA / raw), and write

    OUT/sweep.jsonl   one row per (recipe, checkpoint, weights, w, T, N): step, training minutes,
                      overall and per-attribute accuracy (resumable: rows already there are kept)
    OUT/sweep.md      the table, best setting per recipe first, then adherence against minutes
    OUT/curve.png     overall adherence against training minutes, one line per recipe

    python tools/quality_sweep.py --out runs/quality_sweep --config examples/configs/tiny_tuned.yaml \\
        --recipe base: --recipe p4:data.s2d_patch=4,model.latent_channels=48 \\
        --steps 1000 --ckpt-every 250 --parallel 2 --threads 1 --guidance 1,2 --temperature 1,0.7

Runs train one per process (``launch.py train``); ``--parallel 2 --threads 1`` uses both cores of a
2-core machine for two recipes at once. Training minutes are the run's own time in training steps
(``train_seconds`` in each checkpoint's meta.json: evaluation and checkpoint writing excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRS = ("overall", "shape", "color", "direction", "background")


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """``NAME:key=value,key=value`` (an empty list after the colon: the base config)."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"--recipe {text!r}: expected NAME:key=value,... (NAME of letters, digits, _ and -)")
    overrides = [o for o in rest.split(",") if o]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise argparse.ArgumentTypeError(f"--recipe {name}: {bad[0]!r} is not section.key=value")
    return name, overrides


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or any(v != v or v < 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= 0, got {text!r}")
    return values


def counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def train_commands(args, recipes) -> list[tuple[str, list[str]]]:
    out = []
    for name, overrides in recipes:
        cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "train", "--out",
               os.path.join(args.out, name)]
        if args.config:
            cmd += ["--config", args.config]
        cmd += list(args.overrides) + overrides
        cmd += [f"train.steps={args.steps}", f"train.ckpt_every={args.ckpt_every}",
                f"train.keep_checkpoints={args.steps // args.ckpt_every + 1}",
                f"train.eval_every={args.steps}", f"train.threads={args.threads}",
                "train.wandb_mode=disabled"]
        out.append((name, cmd))
    return out


# Variables by which a process joins a multi-process job (torchrun, SLURM / submitit). The sweep
# and each of its runs are one process of their own, also when the sweep runs inside such a job.
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def run_parallel(commands, parallel: int, log_dir: str) -> None:
    """Start up to ``parallel`` training processes at a time; a failed run is reported, not fatal
    for the others."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            log = open(os.path.join(log_dir, f"{name}.train.log"), "w")
            print(f"train {name}: {' '.join(cmd[2:])}", flush=True)
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(2)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                print(f"train {name}: {state}", flush=True)


def checkpoints_of(run_dir: str) -> list[tuple[int, str, float | None]]:
    """(step, step folder, training seconds) of every checkpoint of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        meta = os.path.join(root, entry, "meta.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                m = json.load(f)
            found.append((int(m["step"]), os.path.join(root, entry), m.get("train_seconds")))
    return sorted(found)


def evaluate_run(name: str, run_dir: str, args, done: set, sink) -> None:
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.evaluation.adherence import t2v_adherence
    from megatron_starflow.training.checkpoint import NoEMAError

    found = checkpoints_of(run_dir)
    for step, step_dir, seconds in found[-1:] if args.only_last else found:
        for weights in args.weights:
            grid = [(w, t, n) for w in args.guidance for t in args.temperature for n in args.candidates
                    if (name, step, weights, w, t, n) not in done]
            if not grid:
                continue
            try:
                system, _, _ = load_system(step_dir, "cpu", weights)
            except NoEMAError:
                continue  # a recipe without train.ema_decay has raw weights only
            for w, t, n in grid:
                rep, _, _ = t2v_adherence(system, args.samples, w, seed=args.seed,
                                          solver=args.solver, temperature=t, candidates=n)
                row = {"recipe": name, "step": step, "weights": weights, "w": w, "T": t, "N": n,
                       "train_minutes": None if seconds is None else round(seconds / 60, 2),
                       "samples": args.samples, "solver": args.solver,
                       **{a: rep["accuracy"][a] for a in ATTRS}, "valid": rep["valid_fraction"]}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(json.dumps(row), flush=True)


def read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r.setdefault("N", 1)  # rows of sweeps from before best-of-N were plain samples
    return rows


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def table(rows: list[dict], recipes: dict) -> str:
    """Markdown: the best (weights, w, T) of each recipe's last checkpoint, then every row."""
    lines = ["| recipe | overrides | step | train min | weights | w | T | best of N | overall | shape "
             "| colour | direction | background |", "|" + "---|" * 13]
    for name in recipes:
        mine = [r for r in rows if r["recipe"] == name]
        if not mine:
            continue
        last = max(r["step"] for r in mine)
        best = max((r for r in mine if r["step"] == last), key=lambda r: (r["overall"], r["shape"]))
        lines.append(_line(best, recipes[name]))
    lines += ["", "All rows (adherence against training minutes):", "", lines[0], lines[1]]
    for r in sorted(rows, key=lambda r: (r["recipe"], r["step"], r["weights"], r["w"], r["T"], r["N"])):
        lines.append(_line(r, recipes.get(r["recipe"], [])))
    return "\n".join(lines) + "\n"


def _line(r: dict, overrides: list[str]) -> str:
    minutes = "" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
    return (f"| {r['recipe']} | {' '.join(overrides) or '(base)'} | {r['step']} | {minutes} | "
            f"{r['weights']} | {r['w']:g} | {r['T']:g} | {r['N']} | " + " | ".join(pct(r[a]) for a in ATTRS) + " |")


def curve(rows: list[dict], path: str, width: int = 640, height: int = 400) -> None:
    """Best overall adherence (over weights, w, T) of each checkpoint against training minutes."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 50, width - 150, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    series: dict[str, dict[float, float]] = {}
    for r in rows:
        if r["train_minutes"] is not None:
            s = series.setdefault(r["recipe"], {})
            s[r["train_minutes"]] = max(s.get(r["train_minutes"], 0.0), r["overall"])
    xmax = max([m for s in series.values() for m in s] + [1.0])
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    for k, (name, s) in enumerate(sorted(series.items())):
        c = colours[k % len(colours)]
        pts = [(left + (right - left) * m / xmax, bottom - (bottom - top) * v) for m, v in sorted(s.items())]
        if len(pts) > 1:
            draw.line(pts, fill=c, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        draw.text((right + 10, top + 14 * k), name, fill=c, font=font)
    draw.text((left, bottom + 8), "0", fill="black", font=font)
    draw.text((right - 60, bottom + 8), f"{xmax:.0f} train min", fill="black", font=font)
    draw.text((4, top), "100 %", fill="black", font=font)
    draw.text((4, bottom - 10), "0 %", fill="black", font=font)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    from megatron_starflow.cli import checks

    p = checks.ArgumentParser(prog="tools/quality_sweep.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (runs, sweep.jsonl, sweep.md, curve.png; "
                                                "an existing sweep is continued)")
    p.add_argument("--config", default=None, type=checks.input_file,
                   help="base config YAML (default: the tiny preset)")
    p.add_argument("--recipe", action="append", type=parse_recipe, required=True,
                   help="NAME:key=value,... (repeat; 'NAME:' is the base config)")
    p.add_argument("--steps", type=checks.integer(1), default=1000)
    p.add_argument("--ckpt-every", type=checks.integer(1), default=250,
                   help="a checkpoint (and a curve point) every N steps")
    p.add_argument("--parallel", type=checks.integer(1), default=1, help="training processes at once")
    p.add_argument("--threads", type=checks.integer(0), default=0,
                   help="torch threads per process (0: torch's default)")
    p.add_argument("--samples", type=checks.integer(1), default=32,
                   help="T2V samples per score (held-out captions)")
    p.add_argument("--guidance", type=floats, default=[1.0])
    p.add_argument("--temperature", type=floats, default=[1.0])
    p.add_argument("--candidates", type=counts, default=[1],
                   help="best of N samples per caption by the flow's likelihood ratio (comma-separated)")
    p.add_argument("--weights", default="ema,raw", help="comma-separated: ema, raw (ema is skipped "
                                                         "for recipes trained without train.ema_decay)")
    p.add_argument("--solver", choices=["jacobi", "sequential"], default="jacobi")
    p.add_argument("--seed", type=checks.SEED, default=0)
    p.add_argument("--collect-only", action="store_true", help="do not train; evaluate what is there")
    p.add_argument("--only-last", action="store_true",
                   help="score only each run's newest checkpoint (e.g. a costly best-of-N grid)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every recipe")
    args, code = checks.parse(p, argv)
    if args is None:
        return code
    checks.or_usage_error(p, checks.check_output_folder, "--out", args.out)
    for key in RENDEZVOUS_VARIABLES:  # inherited by the training runs too
        os.environ.pop(key, None)
    args.weights = [w for w in args.weights.split(",") if w]
    if not args.weights or set(args.weights) - {"ema", "raw"}:
        p.error(f"--weights: a comma-separated list of ema, raw; got {','.join(args.weights)!r}")
    names = [n for n, _ in args.recipe]
    if len(set(names)) != len(names):
        p.error(f"--recipe: names must be unique, got {names}")
    os.makedirs(args.out, exist_ok=True)
    recipes = dict(args.recipe)
    if not args.collect_only:
        todo = [(n, c) for n, c in train_commands(args, args.recipe)
                if not any(s == args.steps for s, _, _ in checkpoints_of(os.path.join(args.out, n)))]
        run_parallel(todo, args.parallel, args.out)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows_path = os.path.join(args.out, "sweep.jsonl")
    done = {(r["recipe"], r["step"], r["weights"], r["w"], r["T"], r["N"]) for r in read_rows(rows_path)}
    with open(rows_path, "a") as sink:
        for name in names:
            evaluate_run(name, os.path.join(args.out, name), args, done, sink)
    rows = [r for r in read_rows(rows_path) if r["recipe"] in recipes]
    md = os.path.join(args.out, "sweep.md")
    with open(md + ".tmp", "w") as f:
        f.write(table(rows, recipes))
    os.replace(md + ".tmp", md)
    curve(rows, os.path.join(args.out, "curve.png"))
    print(f"table: {md}\ncurve: {os.path.join(args.out, 'curve.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
