"""``train.ema_decay``: an EMA of the flow and denoiser weights, kept in fp32 rows like the master
weights, saved in every checkpoint, used by eval / sample by default and exported by
``convert_checkpoint.py export --only-ema``."""

from __future__ import annotations

import pytest
import torch

from helpers_launch import CONFIG, overrides, rewind

DECAY, STEPS = 0.7, 5


def _cfg(steps=STEPS, *extra):
    from megatron_starflow.config import load_config

    return load_config(CONFIG, overrides(steps, 1, f"train.ema_decay={DECAY}",
                                         f"train.keep_checkpoints={steps + 1}", *extra))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, megatron_ready):
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path_factory.mktemp("ema") / "run")
    train(_cfg(), run_dir, quiet=True)
    return run_dir


def _weights(run_dir, step, which):
    from megatron_starflow.training.checkpoint import load_checkpoint

    return load_checkpoint(f"{run_dir}/checkpoints/step_{step:07d}", which)[1]


def test_ema_is_the_recursion_over_the_applied_weights(ema_run):
    """e_0 = w_0 (the initial weights), e_k = d e_{k-1} + (1 - d) w_k after every step."""
    raw = {k: _weights(ema_run, k, "raw") for k in range(1, STEPS + 1)}
    ema = _weights(ema_run, STEPS, "ema")
    first_ema = _weights(ema_run, 1, "ema")
    names = [k for k in ema if k.startswith("model.")]
    assert names and all(k in raw[1] for k in names)
    moved = 0
    for name in names:
        # step 1: e_1 = d w_0 + (1 - d) w_1, so w_0 = (e_1 - (1 - d) w_1) / d
        w0 = (first_ema[name].double() - (1 - DECAY) * raw[1][name].double()) / DECAY
        expect = w0
        for k in range(1, STEPS + 1):
            expect = DECAY * expect + (1 - DECAY) * raw[k][name].double()
        torch.testing.assert_close(ema[name].double(), expect, atol=2e-6, rtol=1e-5)
        moved += int(not torch.equal(ema[name], raw[STEPS][name]))
    assert moved > len(names) // 2  # the EMA is not the raw weights


def test_eval_and_sample_use_the_ema_by_default(ema_run):
    from megatron_starflow.convert.loading import load_system

    default, _, _ = load_system(ema_run)
    raw, _, _ = load_system(ema_run, weights="raw")
    ema = _weights(ema_run, STEPS, "ema")
    name = next(k for k in ema if k.startswith("model.blocks.0.proj_out.weight"))
    got = dict(default.named_parameters())[name]
    assert torch.equal(got.detach(), ema[name].to(got.dtype))
    assert not torch.equal(dict(raw.named_parameters())[name].detach(), got.detach())


def test_export_only_ema(ema_run, tmp_path):
    from megatron_starflow.convert.inference import read_tensors
    from megatron_starflow.convert.training import export_checkpoint

    export_checkpoint(ema_run, str(tmp_path / "ema"), only_ema=True)
    stored, _ = read_tensors(str(tmp_path / "ema"))
    ema = _weights(ema_run, STEPS, "ema")
    name = "model.blocks.0.proj_out.weight"
    key = name if name in stored else name[len("model."):]
    assert torch.equal(stored[key].float(), ema[name].float())


def test_resume_restores_the_ema_exactly(ema_run, tmp_path):
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path / "resumed")
    rewind(ema_run, run_dir, 2)
    train(_cfg(), run_dir, quiet=True)
    a, b = _weights(ema_run, STEPS, "ema"), _weights(run_dir, STEPS, "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_ema_is_one_clear_error(tmp_path):
    from megatron_starflow.config import load_config
    from megatron_starflow.training.checkpoint import NoEMAError
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path / "plain")
    train(load_config(CONFIG, overrides(1, 1)), run_dir, quiet=True)
    with pytest.raises(NoEMAError, match="train.ema_decay"):
        _weights(run_dir, 1, "ema")
