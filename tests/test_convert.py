"""Training checkpoint <-> inference folder round trips (tools/convert_checkpoint.py).

* export (fp32) -> `load_system` on the folder samples exactly what the training checkpoint samples;
* export -> import -> the same loss on a fixed batch, and the training loop resumes from it;
* a sharded export (tiny --max-shard-size) reloads to the same tensors;
* a bf16 export stays within BF16_TOL of the fp32 model's z (relative to max |z|);
* clear errors: --only-ema without EMA, missing / unexpected / misshapen tensors, a config field
  that disagrees with the weights.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers_dist import run_torchrun
from helpers_system import TINY_SYSTEM
import torch

from megatron_starflow.sampling.jacobi import SolverOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_TOL = 0.05  # bf16 weights: max |dz| <= 5 % of max |z| on the tiny randomised model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, megatron_ready):
    """A tiny system with randomised heads (and a perturbed text encoder) saved as a step-7
    training checkpoint, and its fp32 export."""
    from megatron_starflow.config import load_config
    from megatron_starflow.convert.training import export_checkpoint
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    root = tmp_path_factory.mktemp("convert")
    run_dir = str(root / "run")
    cfg = load_config(None, TINY_SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in system.named_parameters():
            if "proj_out" in name or "final_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ckpt = save_system_checkpoint(run_dir, 7, cfg, system,
                           tokenizer_file=tokenizer_path(cfg, run_dir))
    export = str(root / "export")
    report = export_checkpoint(run_dir, export, "fp32", max_shard_size=None)
    return run_dir, ckpt, export, report


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_export_layout(trained):
    run_dir, ckpt, export, report = trained
    assert report["step"] == 7 and report["files"] == ["model.safetensors"]
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "tokenizer"]
    from megatron_starflow.convert.inference import read_tensors

    tensors, meta = read_tensors(export)
    assert meta["step"] == "7" and meta["dtype"] == "fp32"
    assert any(k.startswith("text_encoder.") for k in tensors)
    assert "blocks.0.proj_in.weight" in tensors and "learnable_self_denoiser.proj_out.bias" in tensors
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["text"]["path"] == ""  # the folder carries its tokenizer


def test_sampling_from_export_is_identical(trained):
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.generate import generate

    run_dir, ckpt, export, _ = trained
    a, step_a, _ = load_system(ckpt)
    b, step_b, _ = load_system(export)
    assert step_a == step_b == 7
    captions = ["a red circle moves right on a black background"]
    for opts in (SolverOptions("jacobi", 5, 8, tau=0.0), SolverOptions("sequential", guidance=1.0)):
        out_a = generate(a, captions, seed=3, opts=opts)
        out_b = generate(b, captions, seed=3, opts=opts)
        assert torch.equal(out_a.tokens, out_b.tokens)
        assert torch.equal(out_a.video, out_b.video)


def test_cli_sample_on_export(trained, tmp_path):
    from megatron_starflow.cli import main

    _, _, export, _ = trained
    out = tmp_path / "s.mp4"
    rc = main(["sample", "--checkpoint", export, "--prompt", "a blue square moves up",
               "--out", str(out), "--block-size", "8", "16"])
    assert rc == 0 and out.is_file()


def test_verify_and_bf16(trained, tmp_path):
    from megatron_starflow.convert.training import export_checkpoint, verify_export

    run_dir, _, export, _ = trained
    exact = verify_export(run_dir, export)
    assert exact["z_max_abs_diff"] == 0 and exact["logdet_max_abs_diff"] == 0
    assert exact["denoiser_max_abs_diff"] == 0 and exact["text_encoder_weights_max_abs_diff"] == 0
    half = str(tmp_path / "bf16")
    export_checkpoint(run_dir, half, "bf16", max_shard_size=None)
    assert os.path.getsize(os.path.join(half, "model.safetensors")) < \
        0.6 * os.path.getsize(os.path.join(export, "model.safetensors"))
    rep = verify_export(run_dir, half)
    assert 0 < rep["z_max_abs_diff"] < BF16_TOL * rep["z_max_abs"]


def test_sharded_export(trained, tmp_path):
    from megatron_starflow.convert.inference import INDEX, read_tensors
    from megatron_starflow.convert.training import export_checkpoint

    run_dir, _, export, _ = trained
    out = str(tmp_path / "sharded")
    report = export_checkpoint(run_dir, out, "fp32", max_shard_size="40KB")
    assert len(report["files"]) > 3 and os.path.isfile(os.path.join(out, INDEX))
    assert all(os.path.getsize(os.path.join(out, f)) < 40 * 1024 + 70 * 1024 for f in report["files"])
    sharded, _ = read_tensors(out)
    single, _ = read_tensors(export)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    from megatron_starflow.convert.loading import load_system

    system, _, _ = load_system(out)  # loads like the single file


def _fixed_loss(system):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(2, 4, 4, 4, 12, generator=g)
    with torch.no_grad():
        text = system.encode_text(["a red circle moves right", ""])
        return system.model(tokens, text).nll_per_dim().mean().item()


def test_import_gives_same_loss_and_resumes(trained, tmp_path):
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.config import load_config
    from megatron_starflow.convert.training import import_inference
    from megatron_starflow.training.checkpoint import load_checkpoint
    from megatron_starflow.training.trainer import train

    _, ckpt, export, _ = trained
    run2 = str(tmp_path / "finetune")
    step_dir = import_inference(export, run2, tp=2)
    cfg, _, step, _ = load_checkpoint(run2)
    assert step == 0 and cfg.parallel.tp == 2
    src, _, _ = load_system(ckpt)
    dst, _, _ = load_system(step_dir)
    assert _fixed_loss(src) == _fixed_loss(dst)
    # The training loop resumes from it (one step, tp=1 in this one-process test).
    cfg = load_config(os.path.join(run2, "config.json"), ["parallel.tp=1", "train.steps=1",
                                                         "train.warmup_steps=0", "train.eval_batches=1",
                                                         "train.log_every=1", "train.wandb_mode=disabled"])
    result = train(cfg, run2, quiet=True)
    assert result.steps == 1
    assert load_checkpoint(run2)[2] == 1


@pytest.mark.slow
def test_import_tp2_same_loss(trained, tmp_path):
    """export -> import --tp 2 -> two gloo ranks shard the full weights (parallel.sharding) and
    compute the same loss as the one-process model."""
    _, ckpt, export, _ = trained
    from megatron_starflow.convert.training import import_inference

    run2 = str(tmp_path / "tp2")
    import_inference(export, run2, tp=2)
    out = tmp_path / "tp2.json"
    run_torchrun(os.path.join(REPO, "tests", "dist_scripts", "convert_tp_loss.py"), [run2, out],
                 world=2, timeout=400)
    result = json.loads(out.read_text())
    from megatron_starflow.convert.loading import load_system

    src, _, _ = load_system(ckpt)
    reference = _fixed_loss(src)
    assert abs(result["loss"] - reference) < 1e-5 * max(1.0, abs(reference))


def test_only_ema_error(trained, tmp_path):
    from megatron_starflow.convert.training import NoEMAError, export_checkpoint

    run_dir, _, _, _ = trained
    with pytest.raises(NoEMAError, match="holds no EMA weights"):
        export_checkpoint(run_dir, str(tmp_path / "ema"), only_ema=True)
    rc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "export",
                         "--checkpoint", run_dir, "--out", str(tmp_path / "ema"), "--only-ema"],
                        capture_output=True, text=True, cwd=REPO)
    assert rc.returncode == 2 and "no EMA weights" in rc.stderr


def test_folder_errors(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_starflow.convert.checks import ConfigWeightsMismatch, StateDictMismatch
    from megatron_starflow.convert.inference import load_inference_system

    _, _, export, _ = trained
    bad = str(tmp_path / "bad")
    shutil.copytree(export, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    del tensors["blocks.1.proj_in.bias"]
    tensors["blocks.0.not_a_weight"] = torch.zeros(2)
    tensors["blocks.2.proj_out.weight"] = torch.zeros(7, 32)
    save_file(tensors, os.path.join(bad, "model.safetensors"))
    with pytest.raises(StateDictMismatch) as info:
        load_inference_system(bad)
    assert info.value.missing == ["blocks.1.proj_in.bias"]
    assert info.value.unexpected == ["blocks.0.not_a_weight"]
    assert info.value.shapes == [("blocks.2.proj_out.weight", (7, 32), (24, 32))]

    wrong = str(tmp_path / "wrong")
    shutil.copytree(export, wrong)
    with open(os.path.join(wrong, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["deep_width"] = 64
    cfg["model"]["shallow_layers"] = 2
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigWeightsMismatch) as info:
        load_inference_system(wrong)
    msg = str(info.value)
    assert "model.deep_width=64 but blocks.2.proj_in.weight has shape [32, 12]" in msg
    assert "model.shallow_layers=2 but blocks.0 has 1 transformer layer(s)" in msg
