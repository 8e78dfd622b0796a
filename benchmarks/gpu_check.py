#!/usr/bin/env python
"""The GPU check: one command for one lent H100/H200 that finishes in under 8 minutes and prints
one JSON object.

    python benchmarks/gpu_check.py [--budget-s 450] [--workdir DIR] [--only train,sampling,...]
    python benchmarks/gpu_check.py --dry-run-cpu     # tiny shapes on the CPU: checks the script

Sections, in this order (each in its own process with a time limit; a failure or a timeout is
recorded with its error and the next section runs; a section that the remaining budget cannot
hold is skipped and says so):

``train``
    20 steps of the 100m preset's flow through ``launch.py train`` on CUDA, one process, with
    ``train.dtype=bfloat16`` (bf16 parameters, fp32 main weights / grads / Adam state in the
    sharded optimizer), and the same 20 steps with ``train.dtype=float32`` on the machine's CPU:
    the loss curve of both, their per-step difference, the GPU step time and MFU. The model is the
    100m preset's (108 M parameters; latent grid 5 x 16 x 16 x 48, deep sequence 256 + 1280), fed
    with what needs no downloaded weights: synthetic clips of 5 x 64 x 64 pixels through the
    lossless space-to-depth codec (4 x 4 patches: the same 48 channels and grid as the preset's
    Wan VAE gives 17 x 256 x 256) and the small sentencepiece text encoder (width 256, so the
    text projections are 0.4 M instead of 3.1 M parameters). Batch 2 (``--train-batch``) so that
    the CPU run fits; both runs start from the same weights and draw the same noise (training
    noise comes from CPU generators), so the curves differ by precision only. If the CPU run
    cannot finish in its share of the budget, the steps it finished are compared.
``deep_block_7b``
    ``benchmarks/train_throughput.py --gpu-deep-7b`` (the 7B deep block's stack, 24 x 4096, S =
    256 + 21 x 1560 with full recompute): step time, MFU / HFU in bf16; the same with Transformer
    Engine FP8 (``--spec te --fp8 hybrid``) when transformer_engine is installed (else skipped
    with the reason); torchao float8 is reported as not applicable (it converts ``nn.Linear``,
    the stacks are megatron's parallel linears).
``sampling``
    ``tools/benchmark.py sampling`` on CUDA with the checkpoint of the ``train`` section: T2V
    sequential vs plain and video-aware Jacobi, wall seconds, speed-up and max |token| / |pixel|
    difference to sequential.
``jacobi_compile``
    ``torch.compile`` (inductor) of the deep block's cached step (``FlowBlock.predict``, the Jacobi
    step) with static shapes, one graph per chunk start / length / commit (dynamic shapes fail in
    dynamo on the RoPE table's symbolic slice; ``shrink=False`` keeps one shape per chunk): one
    prompt of 2 frames, one-frame chunks, video-aware Jacobi, eager vs compiled (first call: every
    graph compiled) vs compiled again; the number of graphs; max |token diff| compiled vs eager.
    Then, time permitting, CUDA graphs (inductor ``mode="reduce-overhead"``): the KV cache is
    preallocated and written in place, so each chunk shape's step can be captured and replayed.
``dali_gpu_decode``
    ``benchmarks/data_throughput.py``'s ``gpu_check()``: DALI's GPU decoder timed and compared
    with PyAV (``not measured`` without CUDA).

``--dry-run-cpu`` runs every section at tiny shapes on the CPU (the "GPU" training run is bf16
on the CPU, the deep block is shrunk, compile uses the ``eager`` backend, DALI reports "not
measured", FP8 is skipped without TE): a test runs it so the script stays runnable. Wall-clock
figures are reported, never judged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("train", "deep_block_7b", "sampling", "jacobi_compile", "dali_gpu_decode")
RESULT_MARK = "GPU_CHECK_RESULT "
H100_BF16_DENSE_TFLOPS = 989.0  # H200: the same tensor cores and peak

# The 100m preset's flow, fed without downloaded weights (see the module docstring).
TRAIN_100M = {
    "preset": "100m",
    "model": {"text_width": 256},
    "text": {"encoder": "sentencepiece", "path": "", "width": 256, "layers": 2, "heads": 4},
    "data": {"codec": "s2d", "codec_path": "", "s2d_patch": 4, "s2d_frames": 1, "frames": 5,
             "height": 64, "width": 64, "num_train_clips": 64, "num_heldout_clips": 2},
    "train": {"warmup_steps": 2, "lr": 3e-4, "log_every": 1, "eval_batches": 1,
              "wandb_mode": "disabled", "keep_checkpoints": 1},
}
# --dry-run-cpu: a model that trains in seconds.
TRAIN_TINY = {
    "preset": "tiny",
    "model": {"num_blocks": 2, "shallow_layers": 1, "deep_layers": 1, "denoiser_layers": 1,
              "shallow_width": 32, "deep_width": 32, "text_width": 32, "head_dim": 16,
              "text_length": 8, "latent_channels": 12},
    "text": {"width": 32, "layers": 1, "vocab_size": 64},
    "data": {"frames": 2, "height": 8, "width": 8, "num_train_clips": 16, "num_heldout_clips": 2},
    "train": {"warmup_steps": 1, "log_every": 1, "eval_batches": 1, "wandb_mode": "disabled",
              "keep_checkpoints": 1, "threads": 1},
}
DEEP_TINY = "width=64,layers=2,head_dim=32,frames=2,height=4,grid_width=4,text=8"


# ------------------------------------------------------------------------------ running children

def _env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; -> {rc, seconds, timed_out, stdout, stderr} (never raises on failure)."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=max(1.0, timeout))
        return {"rc": proc.returncode, "seconds": time.time() - t0, "timed_out": False,
                "stdout": proc.stdout, "stderr": proc.stderr}
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return {"rc": None, "seconds": time.time() - t0, "timed_out": True,
                "stdout": text(exc.stdout), "stderr": text(exc.stderr)}


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join([ln for ln in (text or "").strip().splitlines() if ln.strip()][-lines:])


def _failure(run: dict, what: str) -> dict:
    if run["timed_out"]:
        return {"status": "timeout", "error": f"{what} did not finish in {run['seconds']:.0f} s",
                "seconds": run["seconds"]}
    return {"status": "error", "error": f"{what} exited {run['rc']}: "
            + (_tail(run["stderr"]) or _tail(run["stdout"])), "seconds": run["seconds"]}


def _last_json(text: str) -> dict | None:
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _child(section: str, params: dict, timeout: float) -> dict:
    """Run one in-process section of this script in a fresh Python process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", section, "--params",
           json.dumps(params)]
    run = _run(cmd, timeout)
    result = _last_json(run["stdout"]) if run["rc"] == 0 else None
    if result is None:
        return _failure(run, f"section {section}")
    result.setdefault("seconds", run["seconds"])
    return result


# ------------------------------------------------------------------------------ budget

class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.time()

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def slot(self, cap: float, minimum: float) -> float | None:
        """Seconds a step may take: its cap, or what is left; None when less than ``minimum``."""
        left = self.left()
        return None if left < minimum else min(cap, left)


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _overall(statuses: list) -> str:
    """ok (skips allowed) | partial (something ran, something failed) | error | skipped."""
    ran = [s for s in statuses if s != "skipped"]
    if not ran:
        return "skipped"
    failed = [s for s in ran if s in ("error", "timeout")]
    if failed:
        return "partial" if len(failed) < len(ran) or "partial" in ran else "error"
    return "partial" if "partial" in ran else "ok"


# ------------------------------------------------------------------------------ train

def _write_yaml(path: str, data: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def _read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return [], []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in rows if "loss" in r]
    heldout = [r for r in rows if r.get("split") == "heldout"]
    return steps, heldout


def _step_seconds(row: dict) -> float | None:
    if row.get("tflops_per_s"):
        return row["model_flops_per_step"] / (row["tflops_per_s"] * 1e12)
    return None


def _curve(run_dir: str, warmup: int) -> dict:
    steps, heldout = _read_metrics(run_dir)
    out = {"steps_done": len(steps),
           "loss": [r["loss"] for r in steps],
           "bits_per_dim": [r["bits_per_dim"] for r in steps],
           "fsm_loss": [r["fsm_loss"] for r in steps],
           "grad_norm": [r["grad_norm"] for r in steps],
           "heldout_bits_per_dim": {str(r["step"]): r["bits_per_dim"] for r in heldout}}
    timed = [s for s in (_step_seconds(r) for r in steps[warmup:]) if s] or \
        [s for s in (_step_seconds(r) for r in steps) if s]
    if timed:
        out["step_time_s_median"] = statistics.median(timed)
    mfu = [r["mfu"] for r in steps[warmup:] if r.get("mfu") is not None]
    if mfu:
        out["mfu_median"] = statistics.median(mfu)
        out["tflops_per_s_median"] = statistics.median(r["tflops_per_s"] for r in steps[warmup:])
    if steps:
        out["model_flops_per_step"] = steps[-1]["model_flops_per_step"]
    return out


def section_train(args, budget: Budget, work: str) -> dict:
    dry = args.dry_run_cpu
    cfg = json.loads(json.dumps(TRAIN_TINY if dry else TRAIN_100M))
    steps = args.train_steps
    cfg["data"]["batch_size"] = args.train_batch
    cfg["train"].update(steps=steps, eval_every=steps, ckpt_every=steps)
    config = _write_yaml(os.path.join(work, "train_config.yaml"), cfg)
    launch = os.path.join(REPO, "launch.py")
    runs = {
        "accelerator_bf16": ("cpu" if dry else "cuda", "bfloat16",
                             [] if dry else [f"train.peak_tflops={args.peak_tflops}"]),
        "cpu_fp32": ("cpu", "float32", [f"train.threads={os.cpu_count() or 1}"] if not dry else []),
    }
    caps = {"accelerator_bf16": 60 if dry else 150, "cpu_fp32": 60 if dry else 180}
    out: dict = {"model": "100m preset flow, s2d 4x4 codec, sentencepiece text (width 256)"
                 if not dry else "tiny (dry run)",
                 "steps": steps, "batch": args.train_batch, "config": cfg, "runs": {}}
    for name, (device, dtype, extra) in runs.items():
        slot = budget.slot(caps[name], 20)
        if slot is None:
            out["runs"][name] = _skipped(f"time budget: {budget.left():.0f} s left")
            continue
        run_dir = os.path.join(work, f"train_{name}")
        cmd = [sys.executable, launch, "train", "--config", config, "--out", run_dir, "--device",
               device, f"train.dtype={dtype}", *extra]
        run = _run(cmd, slot)
        record = {"device": device, "dtype": dtype, "seconds": run["seconds"],
                  **_curve(run_dir, warmup=2)}
        if run["rc"] != 0:
            record.update(_failure(run, f"launch.py train ({name})"))
            if record["steps_done"]:
                record["status"] = "partial" if record["status"] == "timeout" else record["status"]
        else:
            record["status"] = "ok"
            record["checkpoint"] = run_dir
        out["runs"][name] = record
    acc, cpu = out["runs"].get("accelerator_bf16", {}), out["runs"].get("cpu_fp32", {})
    if acc.get("loss") and cpu.get("loss"):
        n = min(len(acc["loss"]), len(cpu["loss"]))
        diff = [abs(a - b) for a, b in zip(acc["bits_per_dim"][:n], cpu["bits_per_dim"][:n])]
        out["bf16_vs_fp32"] = {
            "steps_compared": n,
            "max_abs_bits_per_dim_diff": max(diff), "mean_abs_bits_per_dim_diff": sum(diff) / n,
            "per_step_bits_per_dim_diff": diff,
            "final_heldout_bits_per_dim": {"bf16": acc["heldout_bits_per_dim"].get(str(steps)),
                                           "fp32": cpu["heldout_bits_per_dim"].get(str(steps))}}
    out["status"] = _overall([r.get("status") for r in out["runs"].values()])
    return out


# ------------------------------------------------------------------------------ deep block

def section_deep_block(args, budget: Budget, work: str) -> dict:
    dry = args.dry_run_cpu
    script = os.path.join(REPO, "benchmarks", "train_throughput.py")
    base = [sys.executable, script, "--gpu-deep-7b", "--steps", str(2 if dry else 3),
            "--warmup", "1"]
    base += ["--shape-override", DEEP_TINY] if dry else ["--frames", str(args.deep_frames),
                                                        "--recompute"]
    out: dict = {}
    variants = {"bf16": [], "te_fp8_hybrid": ["--spec", "te", "--fp8", "hybrid"]}
    for name, extra in variants.items():
        if name.startswith("te_") and importlib.util.find_spec("transformer_engine") is None:
            out[name] = _skipped("transformer_engine is not installed (requirements-gpu.txt)")
            continue
        slot = budget.slot(30 if dry else 150, 15)
        if slot is None:
            out[name] = _skipped(f"time budget: {budget.left():.0f} s left")
            continue
        run = _run(base + extra, slot)
        result = _last_json(run["stdout"]) if run["rc"] == 0 else None
        if result is None:
            out[name] = _failure(run, f"train_throughput.py --gpu-deep-7b {' '.join(extra)}")
            continue
        result.pop("step_times_s", None)
        out[name] = {"status": "ok", "seconds": run["seconds"], **result}
    if importlib.util.find_spec("torchao") is None:
        out["torchao_float8"] = _skipped("torchao is not installed")
    else:
        out["torchao_float8"] = _skipped(
            "not applicable: torchao's convert_to_float8_training swaps torch.nn.Linear modules; "
            "the stacks are megatron ColumnParallel/RowParallel linears, which it leaves in bf16")
    out["status"] = _overall([v.get("status") for v in out.values()])
    return out


# ------------------------------------------------------------------------------ sampling (child)

def _load_tool(relative: str):
    path = os.path.join(REPO, relative)
    spec = importlib.util.spec_from_file_location("gpu_check_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_sampling(params: dict) -> dict:
    bench = _load_tool("tools/benchmark.py")
    result = bench.run_sampling_benchmark(params["checkpoint"], prompts=params["prompts"],
                                          seed=0, tau=params["tau"],
                                          block_size=tuple(params["block_size"]), warmup=1,
                                          device=params["device"])
    methods = result["methods"]
    return {"status": "ok", "device": result["device"], "dtype": result["dtype"],
            "prompts": result["prompts"], "token_grid": result["token_grid"], "tau": result["tau"],
            "block_size": result["block_size"],
            "seconds": {k: v["seconds"] for k, v in methods.items()},
            "deep_network_evals": {k: v["deep_network_evals"] for k, v in methods.items()},
            "speedup_vs_sequential": result["speedup_vs_sequential"],
            "max_abs_token_diff_vs_sequential": {k: v["max_abs_token_diff"]
                                                 for k, v in methods.items()},
            "max_abs_pixel_diff_vs_sequential": {k: v["max_abs_video_diff"]
                                                 for k, v in methods.items()}}


def child_jacobi_compile(params: dict) -> dict:
    import torch

    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.data.synthetic import all_captions
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    started = time.perf_counter()
    system, _, _ = load_system(params["checkpoint"], params["device"])
    captions = all_captions("heldout", params["prompts"])
    # shrink=False: every pass covers its whole chunk, so a chunk has one shape (one graph)
    opts = SolverOptions(solver="jacobi", first_block=params["block_size"][0],
                         later_block=params["block_size"][-1], tau=params["tau"], video_aware=True,
                         shrink=False)

    def timed(repeats=1):
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            # the video is copied to the CPU, which waits for the device
            out = generate(system, captions, frames=params["frames"], seed=0, opts=opts)
            best = min(best, time.perf_counter() - t0)
        return out, best

    generate(system, captions, frames=params["frames"], seed=0, opts=opts)  # warm-up
    eager, eager_s = timed(2)
    block = system.model.deep_block
    # Static shapes: one graph per (chunk start, chunk length, commit) of the schedule, all seen
    # in the first compiled call (dynamic shapes trip over the RoPE table's symbolic slice).
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    eager_predict = block.predict
    block.predict = torch.compile(eager_predict, dynamic=False, backend=params["backend"])
    first, first_s = timed()
    again, again_s = timed(2)
    diff = float((again.tokens.double() - eager.tokens.double()).abs().max())
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    # CUDA graphs (inductor's "reduce-overhead"): the KV cache is preallocated and written in
    # place, so each chunk shape's step can be captured and replayed; tried when the default
    # compile left at least 60 % of the section's time.
    cudagraphs: dict = {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
    if str(system.device).startswith("cuda") and params["backend"] == "inductor":
        used = time.perf_counter() - started
        if used > 0.4 * params.get("slot_s", math.inf):
            cudagraphs = {"status": "skipped", "reason": f"time: the default compile took {used:.0f} s"}
        else:
            try:
                torch._dynamo.reset()
                block.predict = torch.compile(eager_predict, dynamic=False, backend="inductor",
                                              mode="reduce-overhead")
                _, cg_first_s = timed()
                cg, cg_s = timed(2)
                cudagraphs = {"status": "ok", "mode": "reduce-overhead", "first_call_s": cg_first_s,
                              "s": cg_s, "speedup_vs_eager": eager_s / max(cg_s, 1e-12),
                              "max_abs_token_diff_vs_eager":
                                  float((cg.tokens.double() - eager.tokens.double()).abs().max())}
            except Exception as exc:  # noqa: BLE001 - recorded, the compile figures above stand
                cudagraphs = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
            finally:
                block.predict = eager_predict

    return {"status": "ok", "backend": params["backend"], "device": str(system.device),
            "what": "torch.compile(FlowBlock.predict) of the deep block (the Jacobi step), static "
                    "shapes: one graph per chunk start / length / commit",
            "graphs_compiled": graphs, "cudagraphs": cudagraphs,
            "prompts": len(captions), "frames": params["frames"],
            "block_size": params["block_size"],
            "eager_s": eager_s, "compiled_first_call_s": first_s, "compiled_s": again_s,
            "timing": "min of 2 calls after a warm-up (eager, compiled)",
            "speedup_compiled_vs_eager": eager_s / max(again_s, 1e-12),
            "max_abs_token_diff_vs_eager": diff,
            "deep_network_evals": {"eager": eager.deep.network_evals,
                                   "compiled": again.deep.network_evals}}


def child_dali(params: dict) -> dict:
    data = _load_tool("benchmarks/data_throughput.py")
    result = data.gpu_check(clips=params["clips"])
    result.pop("workdir", None)
    if result.get("status") == "not measured":
        return {"status": "not measured", **result}
    return {**result, "status": result.get("status", "ok")}


CHILDREN = {"sampling": child_sampling, "jacobi_compile": child_jacobi_compile,
            "dali_gpu_decode": child_dali}


# ------------------------------------------------------------------------------ driver

def _checkpoint_of(report: dict) -> str | None:
    run = report.get("train", {}).get("runs", {}).get("accelerator_bf16", {})
    return run.get("checkpoint") if run.get("status") == "ok" else None


def _environment(dry: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
           "transformer_engine_installed":
               importlib.util.find_spec("transformer_engine") is not None,
           "dry_run_cpu": dry}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return env


def run_check(args) -> dict:
    budget = Budget(args.budget_s)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(SECTIONS)}")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    report: dict = {"benchmark": "gpu_check", "environment": _environment(args.dry_run_cpu),
                    "budget_s": args.budget_s, "workdir": work}
    import torch

    if not args.dry_run_cpu and not torch.cuda.is_available():
        report["error"] = ("no CUDA device: run on a GPU machine, or pass --dry-run-cpu to check "
                           "the script at tiny shapes on the CPU")
        return report
    device = "cpu" if args.dry_run_cpu else "cuda"
    # Jacobi chunks: a quarter frame in frame 0, then a frame (16 tokens per frame in the dry
    # run, 256 on the GPU).
    sample = {"prompts": 2, "tau": 1e-3,
              "block_size": [4, 16] if args.dry_run_cpu else [64, 256], "device": device}
    for name in SECTIONS:
        if name not in only:
            continue
        t0 = time.time()
        try:
            if name == "train":
                report[name] = section_train(args, budget, work)
            elif name == "deep_block_7b":
                report[name] = section_deep_block(args, budget, work)
            elif name == "dali_gpu_decode":
                slot = budget.slot(20 if args.dry_run_cpu else 90, 10)
                if slot is None:
                    report[name] = _skipped(f"time budget: {budget.left():.0f} s left")
                else:
                    report[name] = _child(name, {"clips": 8}, slot)
            else:
                checkpoint = _checkpoint_of(report)
                slot = budget.slot(120, 15)
                if checkpoint is None:
                    report[name] = _skipped("no checkpoint: the train section's accelerator run "
                                            "did not finish")
                elif slot is None:
                    report[name] = _skipped(f"time budget: {budget.left():.0f} s left")
                else:
                    params = dict(sample, checkpoint=checkpoint)
                    if name == "jacobi_compile":  # one-frame chunks, 2 frames, 1 prompt: few graphs
                        frame = params["block_size"][-1]
                        params.update(block_size=[frame, frame], prompts=1, frames=2,
                                      backend="eager" if args.dry_run_cpu else "inductor",
                                      slot_s=slot)
                    report[name] = _child(name, params, slot)
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            report[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                            "traceback": _tail(traceback.format_exc(), 8)}
        report[name]["section_seconds"] = time.time() - t0
    report["elapsed_s"] = budget.seconds - budget.left()
    report["within_budget"] = report["elapsed_s"] <= args.budget_s
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
        report["workdir"] = None
    return report


def _finite(obj):
    """NaN / inf -> None, so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="overall wall-clock budget in seconds (default 450: under 8 minutes)")
    p.add_argument("--workdir", default="",
                   help="where runs go (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU (tests)")
    p.add_argument("--train-steps", type=int, default=0, help="default 20 (3 with --dry-run-cpu)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--deep-frames", type=int, default=21, help="latent frames of the 7B deep block")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            result = CHILDREN[args.child](json.loads(args.params))
        except Exception as exc:  # noqa: BLE001 - the driver records it
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": _tail(traceback.format_exc(), 8)}
        print(RESULT_MARK + json.dumps(_finite(result)), flush=True)
        return 0
    if args.budget_s <= 0 or args.train_batch < 1 or args.train_steps < 0 or args.deep_frames < 1:
        p.error("--budget-s, --train-batch and --deep-frames must be positive, --train-steps >= 0")
    args.train_steps = args.train_steps or (3 if args.dry_run_cpu else 20)
    print(json.dumps(_finite(run_check(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
