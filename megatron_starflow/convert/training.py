"""Training checkpoint <-> inference folder.

A training checkpoint is sharded (``training/sharded_checkpoint.py``: every rank wrote its own
pieces); ``read_training_weights`` assembles the full weights of ``StarFlowSystem.
trainable_state_dict`` in one process, whatever layout wrote them. Import writes a checkpoint in
the loop's own format (``training/checkpoint.py: save_system_checkpoint``), which a run of any
layout resumes from (loading reshards).
"""

from __future__ import annotations

import os

import torch


from megatron_starflow.training.checkpoint import NoEMAError  # noqa: F401 - re-exported: --only-ema raises it


def read_training_weights(path: str, only_ema: bool = False):
    """A run folder / checkpoints folder / step folder -> (config, {name: tensor} with our model
    names plus ``text_encoder.*``, step, step folder)."""
    from megatron_starflow.training.checkpoint import load_checkpoint

    cfg, weights, step, step_dir = load_checkpoint(path, "ema" if only_ema else "raw")
    out = {}
    for key, value in weights.items():
        if key.startswith("model."):
            out[key[len("model."):]] = value
        elif key.startswith("text_encoder."):
            out[key] = value
        else:
            raise ValueError(f"{step_dir}: unexpected weight name {key!r} (expected model.* or "
                             f"text_encoder.*)")
    return cfg, out, step, step_dir


def export_checkpoint(checkpoint: str, out_dir: str, dtype: str = "fp32",
                      max_shard_size: str | int | None = None, only_ema: bool = False) -> dict:
    from megatron_starflow.convert.inference import save_inference_folder

    cfg, weights, step, step_dir = read_training_weights(checkpoint, only_ema)
    tokenizer = None
    if cfg.text.encoder == "sentencepiece":
        tokenizer = os.path.join(step_dir, "tokenizer", "spm.model")
        if not os.path.isfile(tokenizer):
            tokenizer = cfg.text.path if cfg.text.path and os.path.isfile(cfg.text.path) else None
        if tokenizer is None:
            raise FileNotFoundError(f"{step_dir}: no tokenizer/spm.model next to the weights; the "
                                    f"sentencepiece text encoder cannot be exported without it")
        cfg.text.path = ""  # the folder carries its own copy (tokenizer/spm.model)
    files = save_inference_folder(out_dir, cfg, weights, dtype, max_shard_size, tokenizer,
                                  metadata={"step": step, "source": os.path.abspath(step_dir),
                                            "ema": int(only_ema)})
    return {"source": step_dir, "step": step, "out": os.path.abspath(out_dir), "files": files,
            "tensors": len(weights), "dtype": dtype}


def import_inference(folder: str, run_dir: str, tp: int = 1, pp: int = 1, step: int = 0) -> str:
    """Inference folder -> a training checkpoint (``RUN_DIR/checkpoints/step_0000000``) that
    ``launch.py train --out RUN_DIR`` resumes from: the weights, a fresh AdamW state, step 0.
    Returns the step folder."""
    from megatron_starflow.config import save_config
    from megatron_starflow.convert.inference import load_inference_system
    from megatron_starflow.parallel.state import validate_parallel

    cfg, system, _ = load_inference_system(folder)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    validate_parallel(cfg, tp * pp * cfg.parallel.cp)
    tokenizer = cfg.text.path if cfg.text.encoder == "sentencepiece" else None
    if tokenizer:
        cfg.text.path = ""  # the checkpoint carries its copy; load_checkpoint points at it
    cfg.train.out_dir = run_dir
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.json"))
    if tokenizer:
        # the training loop looks for the run's tokenizer at RUN_DIR/tokenizer/spm.model
        import shutil

        os.makedirs(os.path.join(run_dir, "tokenizer"), exist_ok=True)
        shutil.copy(tokenizer, os.path.join(run_dir, "tokenizer", "spm.model"))
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    return save_system_checkpoint(run_dir, step, cfg, system, tokenizer_file=tokenizer)


@torch.no_grad()
def compare_models(reference, other, frames: int = 2, height: int = 4, width: int = 4,
                   batch: int = 2, seed: int = 0) -> dict:
    """max |diff| of z, the summed log-det and the denoiser output of two StarFlowV models on one
    fixed random input (a small token grid: RoPE is resolution-independent), in float64."""
    cfg = reference.cfg
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, frames, height, width, cfg.token_channels, generator=gen,
                         dtype=torch.float64)
    text = torch.randn(batch, cfg.text_length, cfg.text_width, generator=gen, dtype=torch.float64)
    out = {}
    results = []
    for model in (reference, other):
        dtype = model.blocks[0].proj_in.weight.dtype
        flow = model(tokens.to(dtype), text.to(dtype))
        entry = {"z": flow.z.double(), "logdet": torch.stack(flow.logdets).sum(0).double()}
        if model.learnable_self_denoiser is not None:
            entry["denoiser"] = model.denoise_score(tokens.to(dtype), text.to(dtype)).double()
        results.append(entry)
    for key in results[0]:
        out[f"{key}_max_abs_diff"] = (results[0][key] - results[1][key]).abs().max().item()
        out[f"{key}_max_abs"] = results[0][key].abs().max().item()
    return out


def verify_export(checkpoint: str, out_dir: str, only_ema: bool = False) -> dict:
    """Reload the exported folder and compare it with the training checkpoint it came from."""
    from megatron_starflow.convert.checks import load_checked
    from megatron_starflow.convert.inference import load_inference_model, read_tensors, split_state
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel.state import ensure_single_process

    cfg, weights, _, step_dir = read_training_weights(checkpoint, only_ema)
    ensure_single_process()
    model_state, text_state = split_state(weights)
    reference = StarFlowV(cfg.model, parallel=cfg.parallel).to(torch.float32)
    load_checked(reference, {k: v.float() for k, v in model_state.items()}, step_dir)
    reference.eval()
    _, exported, _ = load_inference_model(out_dir, torch.float32)
    report = compare_models(reference, exported)
    if text_state:
        stored, _ = read_tensors(out_dir)
        _, stored_text = split_state(stored)
        report["text_encoder_weights_max_abs_diff"] = max(
            (v.float() - stored_text[k].float()).abs().max().item() for k, v in text_state.items())
    return report
