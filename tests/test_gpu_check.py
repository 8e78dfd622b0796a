"""benchmarks/gpu_check.py stays runnable without a GPU: ``--dry-run-cpu`` runs every section at
tiny shapes on the CPU and must print one strict-JSON object whose figures are sane (finite
losses, positive times, sections that cannot run here skipped with a reason). Wall-clock values
are checked for being positive, never against a threshold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers_launch import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _run(*args: str, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def _finite_list(values) -> bool:
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    return _run("--dry-run-cpu", "--workdir", str(work)), work


def test_dry_run_reports_every_section(report):
    r, _ = report
    assert r["benchmark"] == "gpu_check" and r["environment"]["dry_run_cpu"] is True
    for name in ("train", "deep_block_7b", "sampling", "jacobi_compile", "dali_gpu_decode"):
        assert name in r and r[name]["section_seconds"] > 0, name
    assert 0 < r["elapsed_s"] <= r["budget_s"] and r["within_budget"] is True


def test_train_section_compares_bf16_with_fp32(report):
    r, work = report
    t = r["train"]
    assert t["status"] == "ok", t
    runs = t["runs"]
    assert runs["accelerator_bf16"]["dtype"] == "bfloat16"
    assert runs["cpu_fp32"]["dtype"] == "float32"
    for name, run in runs.items():
        assert run["status"] == "ok" and run["steps_done"] == t["steps"] == 3, name
        assert _finite_list(run["loss"]) and _finite_list(run["bits_per_dim"]), name
        assert run["step_time_s_median"] > 0 and run["model_flops_per_step"] > 0, name
        assert os.path.isdir(os.path.join(run["checkpoint"], "checkpoints")), name
        assert run["checkpoint"].startswith(str(work))
    cmp = t["bf16_vs_fp32"]
    assert cmp["steps_compared"] == 3 and len(cmp["per_step_bits_per_dim_diff"]) == 3
    # Same weights, same data, same noise: the first step's loss agrees to bf16 precision, and
    # the curves stay within a fraction of a bit (a broken bf16 path or different inputs would not).
    assert cmp["per_step_bits_per_dim_diff"][0] < 0.02
    assert 0 <= cmp["max_abs_bits_per_dim_diff"] < 0.25
    heldout = cmp["final_heldout_bits_per_dim"]
    assert abs(heldout["bf16"] - heldout["fp32"]) < 0.25


def test_deep_block_section(report):
    r, _ = report
    d = r["deep_block_7b"]
    bf16 = d["bf16"]
    assert bf16["status"] == "ok" and bf16["dtype"] == "bfloat16" and bf16["spec"] == "local"
    assert bf16["step_time_s"] > 0 and bf16["tflops_per_s"] > 0 and bf16["model_flops_per_step"] > 0
    assert bf16["seq_len"] == bf16["shapes"]["text"] + bf16["shapes"]["frames"] * \
        bf16["shapes"]["height"] * bf16["shapes"]["width_tokens"]
    if not r["environment"]["transformer_engine_installed"]:
        assert d["te_fp8_hybrid"]["status"] == "skipped"
        assert "transformer_engine" in d["te_fp8_hybrid"]["reason"]
    assert d["torchao_float8"]["status"] == "skipped" and d["torchao_float8"]["reason"]


def test_sampling_and_compile_sections(report):
    r, _ = report
    s = r["sampling"]
    assert s["status"] == "ok" and s["device"] == "cpu"
    assert set(s["seconds"]) == {"sequential", "jacobi", "jacobi_video_aware"}
    assert all(v > 0 for v in s["seconds"].values())
    assert s["max_abs_pixel_diff_vs_sequential"]["sequential"] == 0
    assert all(0 <= v <= 255 for v in s["max_abs_pixel_diff_vs_sequential"].values())
    evals = s["deep_network_evals"]
    assert evals["jacobi_video_aware"] < evals["sequential"] == s["token_grid"][0] * \
        s["token_grid"][1] * s["token_grid"][2]
    c = r["jacobi_compile"]
    assert c["status"] == "ok", c
    assert c["graphs_compiled"] >= 1 and c["eager_s"] > 0 and c["compiled_s"] > 0
    assert c["max_abs_token_diff_vs_eager"] < 1e-5  # the eager backend: the same computation
    assert c["deep_network_evals"]["eager"] == c["deep_network_evals"]["compiled"]
    assert r["dali_gpu_decode"]["status"] in ("not measured", "ok")


def test_without_cuda_or_dry_run_it_says_what_to_do():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the real check would run")
    r = _run(timeout=120)
    assert "no CUDA device" in r["error"] and "--dry-run-cpu" in r["error"]


def test_the_budget_skips_what_it_cannot_hold(tmp_path):
    r = _run("--dry-run-cpu", "--budget-s", "5", "--only", "train,deep_block_7b",
             "--workdir", str(tmp_path), timeout=120)
    for run in r["train"]["runs"].values():
        assert run["status"] == "skipped" and "time budget" in run["reason"]
    assert r["train"]["status"] == "skipped"
    assert r["deep_block_7b"]["bf16"]["status"] == "skipped"
    assert "sampling" not in r  # not asked for
