"""End to end through launch.py: train a very small model, evaluate, sample, and the bad-input
errors a user meets first. One training run is shared by the tests of this module."""

from __future__ import annotations

import json
import math
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
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    for r in train_rows:
        # bits/dim is the logged NLL per dimension (nats) + log(2 pi) / 2, in bits
        assert r["bits_per_dim"] == pytest.approx((r["loss"] + 0.5 * math.log(2 * math.pi)) / math.log(2),
                                                  rel=1e-6, abs=1e-6)
        assert r["grad_norm"] > 0 and r["fsm_loss"] > 0
    # the learning-rate schedule: linear warm-up over 2 steps, cosine from lr to min_lr over 12
    lr, min_lr = 2e-3, 1e-5
    for r in train_rows:
        s = r["step"] - 1  # the lr of the update that produced step s + 1
        want = lr * (s + 1) / 2 if s < 2 else min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (s - 2) / 10))
        assert r["lr"] == pytest.approx(want, rel=1e-6), (r["step"], r["lr"], want)
    heldout = [r for r in records if r.get("split") == "heldout"]
    assert [r["step"] for r in heldout] == [0, 6, 12]
    assert summary["heldout_bits_per_dim_start"] == heldout[0]["bits_per_dim"]
    assert summary["heldout_bits_per_dim_end"] == heldout[-1]["bits_per_dim"]
    # 12 steps from the identity flow: held-out bits/dim (fixed clips and noise) fall at each
    # evaluation and by more than a bit in all (observed 1.87 -> 0.38 -> 0.09)
    assert heldout[-1]["bits_per_dim"] < heldout[1]["bits_per_dim"] < heldout[0]["bits_per_dim"]
    assert heldout[0]["bits_per_dim"] - heldout[-1]["bits_per_dim"] > 1.0
    assert summary["heldout_pixel_bits_per_dim_end"] < summary["heldout_pixel_bits_per_dim_start"]
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
    # the checkpoint reproduces the loop's own final held-out evaluation (same clips, same noise)
    assert ev["bits_per_dim"] == pytest.approx(summary["heldout_bits_per_dim_end"], abs=1e-5)
    assert ev["pixel_bits_per_dim"] == pytest.approx(summary["heldout_pixel_bits_per_dim_end"], abs=1e-5)
    out = str(tmp_path / "t2v.mp4")
    rec = json.loads(run("sample", "--checkpoint", run_dir, "--prompt", "a red circle moves left on a black background",
                         "--prompt", "a blue square moves up on a gray background", "--cfg", "1.5",
                         "--out", out, "--grid", str(tmp_path / "grid.png")).stdout)
    assert rec["outputs"] == [str(tmp_path / "t2v_0.mp4"), str(tmp_path / "t2v_1.mp4")]
    import imageio.v2 as imageio
    from PIL import Image

    # the grid (lossless PNG): a row per prompt, a column per frame, 16 px frames x 4, 2 px gaps
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(np.float64)
    assert grid.shape == (2 * 66 - 2, 4 * 66 - 2, 3)
    for i, path in enumerate(rec["outputs"]):
        frames = np.stack([f for f in imageio.get_reader(path, format="FFMPEG")]).astype(np.float64)
        assert frames.shape == (4, 128, 128, 3)  # 16 px upscaled x 8 for players
        for j in range(4):  # each mp4 frame is its grid tile (H.264 4:2:0 loses a little)
            tile = grid[i * 66:i * 66 + 64, j * 66:j * 66 + 64]
            small = frames[j].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
            mse = ((small - tile) ** 2).mean()
            assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 25, (i, j, mse)
    assert not np.array_equal(grid[:64], grid[66:130])  # two prompts, two different videos


@pytest.mark.slow
def test_bad_inputs_give_one_clear_error(trained, tmp_path):
    run_dir, _ = trained
    proc = run("train", "--config", "no/such.yaml", check=False)
    assert proc.returncode == 2 and "argument --config: 'no/such.yaml' does not exist" in proc.stderr
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
