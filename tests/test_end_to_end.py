"""End to end through launch.py: train a very small model, evaluate, sample, and the bad-input
errors a user meets first. One training run is shared by the tests of this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["train.steps=12", "train.warmup_steps=2", "train.log_every=3", "train.eval_every=6",
         "train.ckpt_every=6", "train.eval_batches=1", "train.wandb_mode=disabled",
         "data.num_train_clips=64", "data.num_heldout_clips=8", "data.batch_size=4",
         "data.frames=4", "model.deep_layers=2"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("e2e") / "run")
    proc = run("train", "--config", "examples/configs/tiny_cpu.yaml", "--out", run_dir, *SMALL)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    return run_dir, summary


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_summary(trained):
    run_dir, summary = trained
    assert summary["steps"] == 12
    for key in ("heldout_bits_per_dim_start", "heldout_bits_per_dim_end", "heldout_pixel_bits_per_dim_end"):
        assert np.isfinite(summary[key])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    for key in ("loss", "bits_per_dim", "fsm_loss", "grad_norm", "lr", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert len([r for r in records if r.get("split") == "heldout"]) == 3  # step 0, 6, 12
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["latest", "step_0000006", "step_0000012"]
    with open(os.path.join(run_dir, "checkpoints", "step_0000012", "config.json")) as f:
        saved = json.load(f)
    assert saved["train"]["steps"] == 12 and saved["data"]["frames"] == 4


@pytest.mark.slow
def test_eval_and_sample(trained, tmp_path):
    run_dir, summary = trained
    ev = json.loads(run("eval", "--checkpoint", run_dir, "--batches", "1").stdout)
    assert ev["step"] == 12 and "pixel" in ev["pixel_bits_per_dim_kind"]
    assert np.isfinite(ev["bits_per_dim"]) and np.isfinite(ev["denoiser_psnr_gain_db"])
    out = str(tmp_path / "t2v.mp4")
    rec = json.loads(run("sample", "--checkpoint", run_dir, "--prompt", "a red circle moves left on a black background",
                         "--prompt", "a blue square moves up on a gray background", "--cfg", "1.5",
                         "--out", out, "--grid", str(tmp_path / "grid.png")).stdout)
    assert len(rec["outputs"]) == 2 and all(os.path.getsize(p) > 0 for p in rec["outputs"])
    assert os.path.getsize(tmp_path / "grid.png") > 0
    import imageio.v2 as imageio
    frames = [f for f in imageio.get_reader(rec["outputs"][0], format="FFMPEG")]
    assert len(frames) == 4


@pytest.mark.slow
def test_bad_inputs_give_one_clear_error(trained, tmp_path):
    run_dir, _ = trained
    proc = run("train", "--config", "no/such.yaml", check=False)
    assert proc.returncode == 2 and "config file 'no/such.yaml' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("train", "--config", "examples/configs/tiny_cpu.yaml", "model.bogus=1", check=False)
    assert proc.returncode == 2 and "unknown config key model.bogus" in proc.stderr
    proc = run("train", "--config", "examples/configs/tiny_cpu.yaml", "model.deep_width=-8", check=False)
    assert proc.returncode == 2 and "model.deep_width must be > 0" in proc.stderr
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 20, 20, 3), dtype=np.uint8))
    proc = run("sample", "--checkpoint", run_dir, "--task", "i2v", "--image", str(wrong),
               "--prompt", "a red circle moves left on a black background", check=False)
    assert proc.returncode == 2 and "conditioning frames are 20x20" in proc.stderr
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    proc = run("sample", "--checkpoint", run_dir, "--prompts", str(empty), check=False)
    assert proc.returncode == 2 and "holds no prompts" in proc.stderr
    proc = run("eval", "--checkpoint", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is not a checkpoint" in proc.stderr
