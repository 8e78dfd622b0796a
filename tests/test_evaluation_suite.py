"""The CPU quality suite on a tiny random-weight system: report structure, value ranges,
determinism, consistency with likelihood.evaluate, and the ``launch.py eval --suite cpu`` command
(plain ``eval`` keeps its output)."""

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers_system import TINY_SYSTEM

from megatron_starflow.evaluation.analyser import ATTRIBUTES, CHANCE

SYSTEM = TINY_SYSTEM + ["model.noise_std=0.1", "data.num_heldout_clips=8", "data.batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite_env(tmp_path_factory, megatron_ready):
    """(system, run folder, step folder): random flow and denoiser heads, saved as step 0."""
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    run_dir = str(tmp_path_factory.mktemp("eval_run"))
    cfg = load_config(None, SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in list(system.model.blocks) + [system.model.learnable_self_denoiser]:
            for p in (module.proj_out.weight, module.proj_out.bias, module.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    system.eval()
    step_dir = save_system_checkpoint(run_dir, 0, cfg, system,
                               tokenizer_file=tokenizer_path(cfg, run_dir))
    return system, run_dir, step_dir


def _in01(v):
    return v is not None and 0.0 <= v <= 1.0


def test_t2v_adherence_structure_and_determinism(suite_env):
    from megatron_starflow.evaluation.adherence import t2v_adherence

    system = suite_env[0]
    rep, videos, rows = t2v_adherence(system, 3, guidance=1.0, seed=5, batch_size=2)
    assert videos.shape == (3, 4, 8, 8, 3) and videos.dtype == np.uint8
    assert len(rows) == 3 and all(set(r["right"]) == set(ATTRIBUTES) | {"overall"} for r in rows)
    for k in list(ATTRIBUTES) + ["overall"]:
        assert _in01(rep["accuracy"][k]) and rep["chance"][k] == round(CHANCE[k], 5)
        assert rep["analyser_accuracy_on_ground_truth"][k] >= 0.0
    assert rep["temporal_ground_truth"]["object_present_frame_fraction"] == 1.0
    t = rep["temporal"]
    assert _in01(t["object_present_frame_fraction"]) and _in01(t["object_in_every_frame_fraction"])
    again, videos2, _ = t2v_adherence(system, 3, guidance=1.0, seed=5, batch_size=2)
    assert np.array_equal(videos, videos2)
    again.pop("generation_seconds"), rep.pop("generation_seconds")
    assert again == rep
    _, other, _ = t2v_adherence(system, 3, guidance=1.0, seed=6, batch_size=2)
    assert not np.array_equal(other, videos)


@pytest.mark.parametrize("given", [1, 2])
def test_continuation_report(suite_env, given):
    from megatron_starflow.evaluation.adherence import continuation

    system = suite_env[0]
    rep, gen, truth = continuation(system, 2, given, guidance=0.0, seed=1)
    assert gen.shape == truth.shape == (2, 4, 8, 8, 3)
    assert np.array_equal(gen[:, :given], truth[:, :given])  # the given frames come back unchanged
    assert rep["given_frames"] == given
    assert 0 < rep["next_frame_psnr_db"] < 60 and 0 < rep["repeat_last_given_frame_psnr_db"] < 60
    assert _in01(rep["continued_direction_accuracy"]) and _in01(rep["object_present_in_generated_frames"])
    with pytest.raises(ValueError, match="given frames"):
        continuation(system, 1, 4, guidance=0.0)


def test_long_video_report(suite_env):
    from megatron_starflow.evaluation.adherence import long_video_drift

    rep, videos = long_video_drift(suite_env[0], 1, 2.0, guidance=0.0, seed=3)
    assert videos.shape == (1, 8, 8, 8, 3) and rep["frames"] == 8 and rep["training_frames"] == 4
    for part in ("within_training_length", "beyond_training_length"):
        assert rep[part]["frames"] == 4 and _in01(rep[part]["object_present_frame_fraction"])
        assert all(_in01(v) for v in rep[part]["caption_agreement"].values())


def test_denoiser_quality(suite_env):
    from megatron_starflow.evaluation.denoiser_quality import denoiser_quality

    system = suite_env[0]
    heldout = _heldout(system)
    rep = denoiser_quality(system, heldout, 4, 2, score_step=True)
    # sigma 0.1 on [-1, 1]: ~26 dB before clamping, a little more after
    assert 25.0 < rep["psnr_noisy_db"] < 30.0
    for k in ("psnr_fsm_db", "psnr_score_step_db"):
        assert 5.0 < rep[k] < 80.0
    for k in ("ssim_noisy", "ssim_fsm", "ssim_score_step"):
        assert -1.0 <= rep[k] <= 1.0
    assert math.isclose(rep["fsm_psnr_gain_db"], rep["psnr_fsm_db"] - rep["psnr_noisy_db"], abs_tol=1e-3)
    assert denoiser_quality(system, heldout, 4, 2, score_step=True) == rep  # fixed noise


def _heldout(system):
    from megatron_starflow.data.datasets import make_datasets

    return make_datasets(system.cfg).heldout


def test_per_frame_matches_evaluate(suite_env):
    from megatron_starflow.evaluation.likelihood import evaluate, per_frame_bits_per_dim

    system = suite_env[0]
    heldout = _heldout(system)
    full = evaluate(system, heldout, batches=2, batch_size=2)
    per = per_frame_bits_per_dim(system, heldout, batches=2, batch_size=2)
    assert len(per["per_frame_bits_per_dim"]) == 4 and per["clips"] == full["clips"] == 4
    assert abs(np.mean(per["per_frame_bits_per_dim"]) - full["bits_per_dim"]) < 1e-4
    assert abs(np.mean(per["per_frame_pixel_bits_per_dim"]) - full["pixel_bits_per_dim"]) < 1e-4


def test_cli_suite_writes_report_and_page(suite_env, tmp_path, capsys):
    from PIL import Image

    from megatron_starflow.cli import main

    _, run_dir, step_dir = suite_env
    out = str(tmp_path / "report.json")
    assert main(["eval", "--checkpoint", run_dir, "--suite", "cpu", "--samples", "2", "--cfg", "0.5",
                 "--batches", "1", "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == out and os.path.isfile(printed["page"])
    with open(out) as f:
        report = json.load(f)
    for key in ("likelihood", "denoiser", "t2v", "i2v", "v2v", "long_video", "seconds", "summary"):
        assert key in report, key
    assert report["t2v"]["guidance"] == 0.5 and report["t2v"]["samples"] == 2
    assert report["step"] == 0 and report["suite"] == "cpu"
    assert len(report["likelihood"]["per_frame_bits_per_dim"]) == 4
    assert _in01(report["summary"]["t2v_overall_adherence"])
    page = Image.open(printed["page"])
    assert page.width > 200 and page.height > 200
    # plain eval: the same JSON keys as before the suite existed
    assert main(["eval", "--checkpoint", run_dir, "--batches", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert set(plain) == {"checkpoint", "step", "bits_per_dim", "bits_per_dim_kind", "clips",
                          "pixel_bits_per_dim", "pixel_bits_per_dim_kind", "psnr_noisy_db",
                          "psnr_denoised_db", "denoiser_psnr_gain_db"}
