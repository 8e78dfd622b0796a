#!/usr/bin/env python
"""Speed regression benchmark of the model code: prints (and writes) JSON figures, never passes or
fails on a wall-clock time.

    python benchmarks/regression.py [--models tiny,25m] [--rows train,denoiser,...] [--repeats 3]
        [--threads 1] [--out FILE.json] [--baseline benchmarks/results/regression_cpu.json]

The models are those of ``benchmarks/compare_ml_starflow.py`` (tiny: widths 64 / 128; 25m: widths
256 / 384; 8 latent frames of 8 x 8 tokens; random weights with a fixed seed), without the
authors' code. Per row, the stacks' fast path (``TransformerStack.uses_fast_path``) and megatron's
TransformerBlock path are timed interleaved on the same weights, so ``fast_vs_megatron`` (median
CPU-time ratio) is a machine-independent figure of what the fast path buys. Rows:

* ``train``: forward + backward of the flow NLL and of the FSM loss (``flow_and_fsm_backward``);
* ``denoiser``: the FSM denoiser forward;
* ``sequential``: the whole inverse (deep + shallow blocks), one token at a time;
* ``jacobi``: video-aware Jacobi, chunks 16 / 64, tau = 1e-3 (default options: with the commit
  pass); ``jacobi_exact``: tau = 0; ``jacobi_cfg``: guidance w = 3.5 (unconditional text: another
  random embedding).

Deterministic figures come with every row: network passes and token evaluations of the deep and
shallow blocks, and the max |token| difference to the sequential inverse. ``--baseline`` adds,
per row, the CPU-time ratio to the baseline file's figure (a number to read, not a verdict) and
whether the work counts changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ("train", "denoiser", "sequential", "jacobi", "jacobi_exact", "jacobi_cfg")


def _compare_module():
    """build_config / randomize / MODELS of compare_ml_starflow.py (it imports the authors' code
    only when asked to build their model)."""
    spec = importlib.util.spec_from_file_location("starflow_compare", os.path.join(HERE, "compare_ml_starflow.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def set_fast(model, fast: bool) -> None:
    from megatron_starflow.models.transformer import TransformerStack

    for module in model.modules():
        if isinstance(module, TransformerStack):
            module.fast = fast


def timed_pair(model, fn, repeats: int) -> dict:
    """``fn`` on the fast path and on megatron's path, interleaved -> medians and ratios."""
    cpu = {True: [], False: []}
    wall = {True: [], False: []}
    for r in range(repeats):
        for fast in ((True, False) if r % 2 == 0 else (False, True)):
            set_fast(model, fast)
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[fast].append(time.perf_counter() - t0)
            cpu[fast].append(time.thread_time() - c0)
    set_fast(model, True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"cpu_s": med[True], "wall_s": statistics.median(wall[True]),
            "megatron_path_cpu_s": med[False], "fast_vs_megatron": med[True] / med[False]}


def run_model(name: str, rows, repeats: int) -> dict:
    import torch

    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.sampling.generate import deep_inverse, shallow_inverse
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.training.losses import flow_and_fsm_backward

    cmp = _compare_module()
    cfg = cmp.build_config(name)
    m = cfg.model
    torch.manual_seed(0)
    model = StarFlowV(m).float()
    cmp.randomize(model, 0, 0.5)
    shape = cmp.MODELS[name]
    t, h, w, c = cmp.FRAMES, cmp.HEIGHT, cmp.WIDTH, m.token_channels
    g = torch.Generator().manual_seed(1)
    out = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "rows": {}}
    if "train" in rows or "denoiser" in rows:
        b = shape["batch_train"]
        noisy = torch.randn(b, t, h, w, c, generator=g)
        text = torch.randn(b, m.text_length, m.text_width, generator=g)
        if "train" in rows:
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                flow_and_fsm_backward(model, noisy, text, 1.0)

            step()
            out["rows"]["train"] = {"batch": b, **timed_pair(model, step, repeats)}
            model.zero_grad(set_to_none=True)
        model.eval()
        if "denoiser" in rows:
            with torch.no_grad():
                fn = lambda: model.denoise_score(noisy, text)  # noqa: E731
                fn()
                out["rows"]["denoiser"] = {"batch": b, **timed_pair(model, fn, repeats)}
    model.eval()
    b = shape["batch_sample"]
    z = torch.randn(b, t, h, w, c, generator=g)
    text = torch.randn(b, m.text_length, m.text_width, generator=g)
    uncond = torch.randn(b, m.text_length, m.text_width, generator=g)

    def inverse(opts, guided=False):
        u, deep = deep_inverse(model, z.reshape(b, t * h * w, c), (t, h, w), opts, text,
                               uncond if guided else None, None, t)
        x, shallow = shallow_inverse(model, u.reshape(b * t, h * w, c), h, w, opts)
        return x, deep, shallow

    settings = {"sequential": (SolverOptions("sequential"), False),
                "jacobi": (SolverOptions("jacobi", 16, 64, 1e-3), False),
                "jacobi_exact": (SolverOptions("jacobi", 16, 64, 0.0), False),
                "jacobi_cfg": (SolverOptions("jacobi", 16, 64, 1e-3, guidance=3.5), True)}
    with torch.no_grad():
        reference = {}
        for row, (opts, guided) in settings.items():
            if row not in rows:
                continue
            if guided not in reference:
                seq_opts = SolverOptions("sequential", guidance=3.5 if guided else 0.0)
                reference[guided] = inverse(seq_opts, guided)[0]
            x, deep, shallow = inverse(opts, guided)
            out["rows"][row] = {
                "batch": b, "tau": opts.tau, "guidance": opts.guidance,
                "work": {"deep_passes": deep.network_evals, "deep_tokens": deep.token_evals,
                         "shallow_passes": shallow.network_evals,
                         "shallow_tokens": shallow.token_evals},
                "max_abs_vs_sequential": (x - reference[guided]).abs().max().item(),
                **timed_pair(model, lambda: inverse(opts, guided), repeats)}
    return out


def compare_to_baseline(result: dict, baseline: dict) -> dict:
    base = {(mod["model"], row): r for mod in baseline.get("models", []) for row, r in mod["rows"].items()}
    out = {}
    for mod in result["models"]:
        for row, r in mod["rows"].items():
            old = base.get((mod["model"], row))
            if old is None:
                continue
            entry = {"cpu_time_vs_baseline": r["cpu_s"] / old["cpu_s"],
                     "fast_vs_megatron_then": old.get("fast_vs_megatron"),
                     "fast_vs_megatron_now": r["fast_vs_megatron"]}
            if "work" in r:
                entry["work_changed"] = r["work"] != old.get("work")
                entry["max_abs_vs_sequential_then_now"] = [old.get("max_abs_vs_sequential"),
                                                           r["max_abs_vs_sequential"]]
            out[f"{mod['model']}/{row}"] = entry
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,25m")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--baseline", default="")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    cmp = _compare_module()
    bad = [r for r in rows if r not in ROWS] + [m for m in args.models.split(",") if m not in cmp.MODELS]
    if bad or args.repeats < 1:
        raise SystemExit(f"unknown rows/models {bad} or --repeats < 1; rows: {', '.join(ROWS)}; "
                         f"models: {', '.join(cmp.MODELS)}")
    import torch

    from megatron_starflow.cli.quiet import quiet_warnings
    from megatron_starflow.parallel.state import ensure_single_process

    quiet_warnings()
    torch.set_num_threads(args.threads)
    ensure_single_process()
    result = {"benchmark": "regression", "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "repeats": args.repeats,
              "timing": "medians of this thread's CPU time (and wall), fast path and megatron's "
                        "path interleaved",
              "models": [run_model(name, rows, args.repeats) for name in args.models.split(",")]}
    if args.baseline:
        with open(args.baseline) as f:
            result["vs_baseline"] = compare_to_baseline(result, json.load(f))
    cmp.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
