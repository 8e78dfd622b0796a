"""``train.dtype=bfloat16``: bf16 parameters and compute, fp32 main weights, gradients and Adam
state (training/sharded_optimizer.py), fp32 flow transforms and losses. Trained for 50 steps on
the CPU, the held-out bits/dim lands within 0.05 of the fp32 run (same data, noise and seed)."""

from __future__ import annotations

import pytest
import torch

from helpers_launch import CONFIG, overrides

STEPS = 50


def _train(tmp_path, dtype: str):
    from megatron_starflow.config import load_config
    from megatron_starflow.training.trainer import train

    cfg = load_config(CONFIG, overrides(STEPS, STEPS, f"train.dtype={dtype}", "data.batch_size=4",
                                        "data.num_heldout_clips=8", "train.eval_batches=2"))
    run_dir = str(tmp_path / dtype)
    return train(cfg, run_dir, quiet=True), run_dir


@pytest.mark.slow
def test_bf16_training_tracks_fp32(tmp_path):
    fp32, _ = _train(tmp_path, "float32")
    bf16, run_dir = _train(tmp_path, "bfloat16")
    start, end32, end16 = (fp32.eval_start["bits_per_dim"], fp32.eval_end["bits_per_dim"],
                           bf16.eval_end["bits_per_dim"])
    assert start - end32 > 0.5  # the run learns, so the comparison means something
    assert abs(end16 - end32) < 0.05, (start, end32, end16)
    from megatron_starflow.training.checkpoint import load_checkpoint

    _, weights, _, _ = load_checkpoint(run_dir)
    assert all(w.dtype == torch.bfloat16 for k, w in weights.items() if k.startswith("model."))
    from megatron_starflow.training import sharded_checkpoint as store

    path, _ = store.find_resumable(run_dir)
    master = store.load_full_tensors(path, "optim", prefix="optim.flow.model.", strip=False)
    masters = [v for k, v in master.items() if k.endswith(".master")]
    assert masters and all(v.dtype == torch.float32 for v in masters)
