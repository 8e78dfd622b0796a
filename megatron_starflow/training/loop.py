"""One-process training: noise-augmented NLL + FSM, AdamW, warm-up + cosine, clip + skip rule,
periodic held-out evaluation, atomic checkpoints, JSONL (+ wandb) metrics, tqdm progress."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_starflow.config import Config, save_config
from megatron_starflow.evaluation.likelihood import evaluate
from megatron_starflow.parallel.state import ensure_single_process
from megatron_starflow.training import checkpoint as ckpt
from megatron_starflow.training.builders import StarFlowSystem, collate, make_datasets, tokenizer_path
from megatron_starflow.training.flops import model_flops, step_metrics
from megatron_starflow.training.losses import add_noise, flow_and_fsm_backward
from megatron_starflow.training.metrics import MetricsLogger
from megatron_starflow.training.schedule import lr_at

DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    skipped: int
    eval_start: dict
    eval_end: dict
    seconds: float
    preempted: bool = False  # stopped by SIGTERM/SIGUSR1 after a checkpoint (and a requeue)
    stop_reason: str = ""


def _param_groups(system: StarFlowSystem) -> tuple[list, list]:
    """(flow + text encoder params, denoiser params): clipped and skip-tested separately, as the
    reference gives the denoiser its own optimizer."""
    den = system.model.learnable_self_denoiser
    den_ids = {id(p) for p in den.parameters()} if den is not None else set()
    flow = [p for p in system.parameters() if p.requires_grad and id(p) not in den_ids]
    return flow, [p for p in den.parameters()] if den is not None else []


def _batches(dataset, batch_size: int, seed: int, start_epoch: int = 0):
    """Endless shuffled batches; each epoch's order is a function of (seed, epoch)."""
    epoch = start_epoch
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield epoch, collate([dataset[j] for j in order[i:i + batch_size].tolist()])
        epoch += 1


def build_system(cfg: Config, run_dir: str) -> StarFlowSystem:
    ensure_single_process()
    system = StarFlowSystem(cfg, run_dir)
    return system.to(DTYPES[cfg.train.dtype])


def train(cfg: Config, run_dir: str | None = None, quiet: bool = False, preemption=None) -> TrainResult:
    """Train (one process, or every rank of a torchrun / submitit / SLURM launch): the loop of
    ``training/distributed_loop.py``, which resumes exactly (sampler position and every RNG state
    are checkpointed), guards against divergence and checkpoints on preemption. An uninterrupted
    one-process run takes the same steps as :func:`train_legacy`."""
    from megatron_starflow.training.distributed_loop import train as train_any

    return train_any(cfg, run_dir, quiet, preemption)


def train_legacy(cfg: Config, run_dir: str | None = None, quiet: bool = False) -> TrainResult:
    """The original one-process loop (kept for comparison: it resumed at the start of the saved
    epoch and re-seeded the noise generator, so a resumed run was not exact)."""
    tr = cfg.train
    run_dir = run_dir or tr.out_dir
    os.makedirs(run_dir, exist_ok=True)
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    save_config(cfg, os.path.join(run_dir, "config.json"))
    system = build_system(cfg, run_dir)
    data = make_datasets(cfg)
    flow_params, den_params = _param_groups(system)
    groups = [{"params": flow_params, "name": "flow"}]
    if den_params:
        groups.append({"params": den_params, "name": "denoiser"})
    optimizer = torch.optim.AdamW(groups, lr=tr.lr, betas=(tr.beta1, tr.beta2),
                                  weight_decay=tr.weight_decay)
    start_step, skipped, epoch, data_state = 0, 0, 0, None
    try:
        _, state, step_dir = ckpt.load_checkpoint(run_dir)
        system.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, skipped, epoch = state["step"], state["skipped"], state["epoch"]
        torch.set_rng_state(state["rng"])
        data_state = state.get("data")
        if not quiet:
            print(f"resumed from {step_dir} at step {start_step}")
    except FileNotFoundError:
        pass

    logger = MetricsLogger(run_dir, cfg.to_dict(), tr.wandb_mode, tr.wandb_project)
    eval_kwargs = dict(batches=tr.eval_batches, batch_size=cfg.data.batch_size)
    eval_start = evaluate(system, data.heldout, **eval_kwargs)
    logger.log({"step": start_step, "split": "heldout", **eval_start})
    gen = torch.Generator().manual_seed(tr.seed + 1)
    loader = None
    if cfg.data.source == "shards":  # video files / latents from tar shards, resumable position
        from megatron_starflow.data.loader import build_train_iterator

        loader = build_train_iterator(cfg, run_dir, state=data_state)
        batches = loader.batches()
    else:
        batches = _batches(data.train, cfg.data.batch_size, tr.seed, epoch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.dtype == "bfloat16")
    sigma = cfg.model.noise_std
    t_start = time.time()
    last_eval = eval_start
    progress = tqdm(range(start_step, tr.steps), initial=start_step, total=tr.steps,
                    desc="train", disable=quiet, dynamic_ncols=True)
    system.train()
    for step in progress:
        t0 = time.time()
        lr = lr_at(step, tr.lr, tr.min_lr, tr.warmup_steps, tr.steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        epoch, batch = next(batches)
        captions = batch["caption"]
        from megatron_starflow.models.text import drop_captions
        captions = drop_captions(captions, cfg.text.caption_dropout, gen)
        tokens = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
        noisy = add_noise(tokens, sigma, gen)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            text = system.encode_text(captions)
            losses = flow_and_fsm_backward(system.model, noisy, text, cfg.model.fsm_weight)
        flow_norm = torch.nn.utils.clip_grad_norm_(flow_params, tr.grad_clip).item()
        den_norm = torch.nn.utils.clip_grad_norm_(den_params, tr.grad_clip).item() if den_params else 0.0
        # The reference's rule: after warm-up, an update whose gradient norm is not finite or far
        # above the clip is skipped rather than clipped into the weights.
        skip = not math.isfinite(flow_norm) or (step >= tr.warmup_steps and flow_norm > tr.skip_factor * tr.grad_clip)
        if skip:
            skipped += 1
        else:
            optimizer.step()
        dt = time.time() - t0
        record = {"step": step + 1, "loss": losses.flow.item(), "bits_per_dim": losses.bits_per_dim.item(),
                  "fsm_loss": None if losses.fsm is None else losses.fsm.item(),
                  "grad_norm": flow_norm, "denoiser_grad_norm": den_norm, "lr": lr,
                  "skipped": skipped, "tokens_per_s": tokens.shape[0] * tokens[0, ..., 0].numel() / dt,
                  "epoch": epoch}
        # model_flops_per_step, tflops_per_s, and mfu/hfu when train.peak_tflops > 0
        record.update(step_metrics(model_flops(cfg, tokens.shape[0], tuple(tokens.shape[1:4])), dt, tr.peak_tflops))
        if (step + 1) % tr.log_every == 0 or step + 1 == tr.steps:
            logger.log(record)
            progress.set_postfix(bpd=f"{record['bits_per_dim']:.3f}", fsm=f"{record['fsm_loss'] or 0:.3f}",
                                 gn=f"{flow_norm:.2f}")
        if (step + 1) % tr.eval_every == 0 or step + 1 == tr.steps:
            last_eval = evaluate(system, data.heldout, **eval_kwargs)
            logger.log({"step": step + 1, "split": "heldout", **last_eval})
            system.train()
        if (step + 1) % tr.ckpt_every == 0 or step + 1 == tr.steps:
            state = {"model": system.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step + 1, "skipped": skipped, "epoch": epoch, "rng": torch.get_rng_state()}
            if loader is not None:
                state["data"] = loader.state_dict()
            ckpt.save_checkpoint(run_dir, step + 1, cfg, state, tr.keep_checkpoints,
                                 tokenizer_file=tokenizer_path(cfg, run_dir)
                                 if cfg.text.encoder == "sentencepiece" else None)
    logger.close()
    return TrainResult(run_dir, tr.steps, skipped, eval_start, last_eval, time.time() - t_start)
