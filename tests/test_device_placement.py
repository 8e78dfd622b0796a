"""Device placement without a GPU: the training loop, Jacobi and sequential sampling and held-out
evaluation run on torch's ``lazy`` device (tests/helpers_device.py), a device that is not the CPU
but computes on it, so every tensor created without ``device=`` and mixed into the computation
raises, as it would on CUDA. A generator-device check adds what the lazy backend lets through (a
draw from a CPU generator straight into a device tensor, which CUDA refuses).

Each path is also compared with the same call on the CPU: placement must not change a number.

The loop runs in float64 here: torch 2.13's lazy backend gives a 0-dim float32 tensor times a
Python float a float64 result in its TorchScript graph while recording float32, which breaks the
float32 backward (``expected m1 and m2 to have the same dtype``) for reasons that have nothing to
do with placement. Sampling and evaluation (no backward) run in float32.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers_device import GeneratorDeviceCheck, use_lazy_device
from helpers_launch import CONFIG, overrides

STEPS = 2
DEVICE_RUN = overrides(STEPS, STEPS, "train.dtype=float64", "train.eval_batches=1")


@pytest.fixture(scope="module")
def lazy():
    return use_lazy_device()


def _mark_step_hooks():
    from megatron_starflow.training.hooks import TrainHooks

    class MarkStep(TrainHooks):
        """Materialise the lazy graph once per step, as an XLA-style device wants (otherwise
        every step's graph would carry all earlier updates)."""

        def after_backward(self, step, params):
            torch._lazy.mark_step()

        def after_step(self, step):
            torch._lazy.mark_step()

    return MarkStep()


def _train(run_dir: str, device: torch.device):
    """The real loop (Trainer.fit) for STEPS steps on ``device``; -> (trainer, result)."""
    from megatron_starflow.config import load_config
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW
    from megatron_starflow.training.trainer import Trainer

    cfg = load_config(CONFIG, DEVICE_RUN)
    trainer = Trainer(cfg, run_dir, hooks=_mark_step_hooks(), quiet=True, device=device)
    with pytest.MonkeyPatch.context() as mp:
        if device.type == "lazy":  # the updated weights, before held-out evaluation and the save
            step = ShardedAdamW.step

            def step_and_mark(self, *args, **kwargs):
                out = step(self, *args, **kwargs)
                torch._lazy.mark_step()
                return out

            mp.setattr(ShardedAdamW, "step", step_and_mark)
        with GeneratorDeviceCheck():
            result = trainer.fit()
    return trainer, result


def _losses(run_dir: str) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["fsm_loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory, lazy):
    run_dir = str(tmp_path_factory.mktemp("device") / "lazy")
    trainer, result = _train(run_dir, lazy)
    return run_dir, trainer, result


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("device") / "cpu")
    _, result = _train(run_dir, torch.device("cpu"))
    return run_dir, result


def test_training_loop_runs_on_the_device_and_matches_the_cpu(lazy_run, cpu_run):
    run_dir, trainer, result = lazy_run
    assert trainer.device.type == "lazy" and trainer.layout.device.type == "lazy"
    assert result.steps == STEPS and result.skipped == 0
    # Model, text encoder and the optimizer's main grads / moments live on the device.
    assert {p.device.type for p in trainer.system.parameters()} == {"lazy"}
    opt = trainer.optimizer
    for buf in (opt._grad_buffer, opt._exp_avg, opt._exp_avg_sq):
        assert buf.device.type == "lazy"
    # One code path: the same losses as on the CPU (the same noise: drawn on the CPU, moved).
    cpu_dir, cpu_result = cpu_run
    lazy_losses, cpu_losses = _losses(run_dir), _losses(cpu_dir)
    assert [s for s, _, _ in lazy_losses] == list(range(1, STEPS + 1))
    for (_, loss, fsm), (_, cpu_loss, cpu_fsm) in zip(lazy_losses, cpu_losses, strict=True):
        assert math.isfinite(loss) and math.isfinite(fsm)
        assert loss == pytest.approx(cpu_loss, rel=1e-9, abs=1e-12)
        assert fsm == pytest.approx(cpu_fsm, rel=1e-9, abs=1e-12)
    for key in ("bits_per_dim", "pixel_bits_per_dim", "denoiser_psnr_gain_db"):
        assert result.eval_end[key] == pytest.approx(cpu_result.eval_end[key], rel=1e-9, abs=1e-9)
    assert result.eval_end["bits_per_dim"] != result.eval_start["bits_per_dim"]  # it trained
    assert os.path.isdir(os.path.join(run_dir, "checkpoints"))


def _sample(system, solver: str, prefix=None, guidance: float = 0.0):
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions

    opts = SolverOptions(solver=solver, first_block=4, later_block=8, video_aware=True,
                         guidance=guidance)
    return generate(system, ["a red circle moves right", "a blue square moves up"], seed=3,
                    opts=opts, prefix_video=prefix)


def test_jacobi_and_sequential_sampling_on_the_device(lazy_run, lazy):
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.data.synthetic import make_clip

    run_dir = lazy_run[0]
    on_device, _, _ = load_system(run_dir, lazy)
    on_cpu, _, _ = load_system(run_dir, "cpu")
    assert on_device.device.type == "lazy" and on_cpu.device.type == "cpu"
    cfg = on_cpu.cfg
    first_frame = torch.from_numpy(make_clip(0, "heldout", cfg.data.frames, cfg.data.height,
                                             cfg.data.width)[0][:1].copy())
    cases = {"jacobi_t2v_guided": ("jacobi", None, 1.5),
             "sequential_t2v": ("sequential", None, 0.0),
             "jacobi_i2v": ("jacobi", first_frame, 0.0)}
    for name, (solver, prefix, guidance) in cases.items():
        with GeneratorDeviceCheck():
            out = _sample(on_device, solver, prefix, guidance)
        ref = _sample(on_cpu, solver, prefix, guidance)
        assert out.tokens.device.type == "lazy", name
        assert out.video.device.type == "cpu" and out.video.dtype == torch.uint8, name
        tokens = out.tokens.cpu()
        assert torch.isfinite(tokens).all(), name
        torch.testing.assert_close(tokens, ref.tokens, rtol=1e-4, atol=1e-4, msg=name)
        assert (out.video.int() - ref.video.int()).abs().max() <= 1, name
        assert out.deep.network_evals == ref.deep.network_evals, name
        if prefix is not None:  # the given frame is repeated unchanged
            assert torch.equal(out.video[:, :1], prefix[None].expand(2, -1, -1, -1, -1))


def test_heldout_evaluation_on_the_device(lazy_run, lazy):
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.data.synthetic import SyntheticCaptionedVideos
    from megatron_starflow.evaluation.adherence import t2v_adherence
    from megatron_starflow.evaluation.denoiser_quality import denoiser_quality
    from megatron_starflow.evaluation.likelihood import evaluate, per_frame_bits_per_dim

    run_dir = lazy_run[0]
    on_device, _, _ = load_system(run_dir, lazy)
    on_cpu, _, _ = load_system(run_dir, "cpu")
    d = on_cpu.cfg.data
    heldout = SyntheticCaptionedVideos("heldout", 4, d.frames, d.height, d.width)
    with GeneratorDeviceCheck():
        got = evaluate(on_device, heldout, batches=2, batch_size=2)
        frames = per_frame_bits_per_dim(on_device, heldout, batches=2, batch_size=2)
        quality = denoiser_quality(on_device, heldout, clips=2, batch_size=2)
        report, videos, _ = t2v_adherence(on_device, samples=2, guidance=0.0, batch_size=2)
    want = evaluate(on_cpu, heldout, batches=2, batch_size=2)
    for key in ("bits_per_dim", "pixel_bits_per_dim", "psnr_noisy_db", "psnr_denoised_db"):
        assert math.isfinite(got[key]) and got[key] == pytest.approx(want[key], rel=1e-5), key
    assert sum(frames["per_frame_bits_per_dim"]) / len(frames["per_frame_bits_per_dim"]) \
        == pytest.approx(got["bits_per_dim"], abs=1e-4)
    want_quality = denoiser_quality(on_cpu, heldout, clips=2, batch_size=2)
    for key in ("psnr_noisy_db", "ssim_noisy", "ssim_fsm", "ssim_score_step"):
        assert quality[key] == pytest.approx(want_quality[key], abs=1e-3), key
    assert videos.shape == (2, d.frames, d.height, d.width, 3)
    assert report["samples"] == 2


# ------------------------------------------------------------------------------ the mechanism

def test_a_planted_cpu_tensor_fails_on_the_device_and_passes_on_the_cpu(monkeypatch, lazy):
    """``+ torch.zeros(shape)`` (no device) in every flow head: the CPU does not notice, the
    lazy device raises at once, as CUDA would."""
    from conftest import TINY_MODEL

    from megatron_starflow.config import ModelConfig
    from megatron_starflow.models.flow_block import FlowBlock
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel.state import ensure_single_process

    ensure_single_process()
    torch.manual_seed(0)
    model = StarFlowV(ModelConfig(**TINY_MODEL)).eval()
    x, text = torch.randn(2, 2, 2, 2, 3), torch.randn(2, 3, 8)
    with torch.no_grad():
        clean = model(x, text).nll_per_dim()
    head = FlowBlock.head

    def planted(self, h):
        shift, log_sigma = head(self, h)
        return shift + torch.zeros(shift.shape, dtype=shift.dtype), log_sigma

    monkeypatch.setattr(FlowBlock, "head", planted)
    with torch.no_grad():
        torch.testing.assert_close(model(x, text).nll_per_dim(), clean)  # CPU: unnoticed
        model.to(lazy)
        with pytest.raises(RuntimeError, match="not a lazy tensor"):
            model(x.to(lazy), text.to(lazy)).nll_per_dim().cpu()
    monkeypatch.setattr(FlowBlock, "head", head)
    with torch.no_grad():  # and without the planted tensor the device runs
        torch.testing.assert_close(model(x.to(lazy), text.to(lazy)).nll_per_dim().cpu(), clean)


def test_a_draw_from_a_cpu_generator_into_a_device_tensor_is_caught(lazy):
    """What the lazy backend alone lets through (it draws on the CPU silently), CUDA refuses; the
    check raises for it and passes the correct form (draw on generator.device, then move)."""
    from megatron_starflow.models.noise import add_noise

    gen = torch.Generator().manual_seed(0)
    tokens = torch.zeros(2, 3).to(lazy)
    torch.randn(2, 3, generator=gen, device=lazy)  # the backend alone: no error
    with GeneratorDeviceCheck():
        with pytest.raises(RuntimeError, match="cpu generator into a lazy tensor"):
            torch.randn(tokens.shape, generator=gen, device=tokens.device)
        noisy = add_noise(tokens, 0.5, torch.Generator().manual_seed(1))
    expected = 0.5 * torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy.cpu(), expected)


def test_masks_are_built_on_the_device(lazy):
    """Mask labels are cached per device, so a mask is built where attention runs (no CPU build
    and copy per step) and equals the CPU one."""
    from megatron_starflow.models.layout import SlotLayout

    layout = SlotLayout(3, 4, 2, 2, with_time=True, pt_seq_len=4.0, window=2)
    for build in (lambda d: layout.causal_mask(5, 6, device=d),
                  lambda d: layout.attention_mask(5, 6, device=d),
                  lambda d: layout.lookahead_mask(ahead=1, device=d)):
        on_device = build(lazy)
        assert on_device.device.type == "lazy"
        assert torch.equal(on_device.cpu(), build("cpu"))


def test_select_device_takes_a_device_object(lazy):
    from megatron_starflow.parallel.device import backend_for, select_device

    assert select_device(lazy) is lazy  # a device object is used as it is (tests only)
    assert select_device("cpu") == torch.device("cpu")
    assert backend_for(lazy) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"


# ------------------------------------------------------------------------------ TE / FP8 off CUDA

@pytest.mark.parametrize("keys, named", [(["parallel.spec=te"], "parallel.spec=te"),
                                         (["parallel.spec=te", "parallel.fp8=hybrid"],
                                          "parallel.spec=te / parallel.fp8=hybrid")])
def test_te_layers_off_cuda_are_one_clear_error(tmp_path, capsys, keys, named):
    from megatron_starflow.cli.app import main

    out = tmp_path / "run"
    code = main(["train", "--config", CONFIG, "--out", str(out), *keys])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert named in err and "parallel.spec=local parallel.fp8=none" in err and "cuda" in err
    assert not out.exists()  # refused before anything was written


def test_a_te_checkpoint_read_off_cuda_is_one_clear_error(lazy_run, tmp_path, capsys):
    """Sampling / evaluating a run trained with parallel.spec=te on a machine without CUDA: one
    line, exit 2, before anything is built or written."""
    import hashlib
    import shutil

    from megatron_starflow.cli.app import main
    from megatron_starflow.config import ConfigError
    from megatron_starflow.convert.loading import load_system

    step_dir = os.path.join(lazy_run[0], "checkpoints", "step_0000002")
    copy = str(tmp_path / "step_0000002")
    shutil.copytree(step_dir, copy)
    config_path = os.path.join(copy, "config.json")
    cfg = json.load(open(config_path))
    cfg["parallel"].update(spec="te", fp8="hybrid")
    with open(config_path, "w") as f:
        json.dump(cfg, f)
    integrity = json.load(open(os.path.join(copy, "integrity.json")))
    data = open(config_path, "rb").read()
    integrity["files"]["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                         "size": len(data)}
    with open(os.path.join(copy, "integrity.json"), "w") as f:
        json.dump(integrity, f)
    with pytest.raises(ConfigError, match="parallel.spec=te / parallel.fp8=hybrid"):
        load_system(copy, "cpu")
    out = tmp_path / "t2v.mp4"
    code = main(["sample", "--checkpoint", copy, "--task", "t2v", "--prompt", "a red circle",
                 "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "parallel.spec=local" in err
    assert not out.exists()
