"""The training loop on one or many processes (DP x TP on gloo/NCCL), with exact resume, guards for
long runs and preemption.

What a checkpoint holds (``training/checkpoint.py`` layout, one ``state.pt`` written by rank 0):
``model`` (the full, TP-gathered weights: any TP size loads them, and eval / sample / the
converters read them as they read one-process checkpoints), ``optimizer`` (AdamW state, TP-gathered
to full shapes in the one-process parameter order), ``step``, ``skipped``, ``epoch``, ``data`` (the
loader position: globally consumed samples, ``data/sampler.py``), ``rng`` and ``gen`` (rank 0's
torch and noise/caption-dropout generators, the keys older checkpoints have), ``rng_ranks`` (those
of every rank, plus megatron's RNG-tracker states) and ``parallel`` (the layout it was saved with).
The learning rate is a pure function of the step (``schedule.lr_at``), so it needs no state.

Exact resume: the batch order comes from the sampler position, every random draw of a step comes
from the per-rank generator whose state is saved, so a run resumed with the same layout computes
bit-for-bit the same steps as an uninterrupted one (tests/test_resume.py). With another layout
(TP 2 -> 1, DP 2 -> 1) the weights, optimizer and data position carry over; each rank's generator
then starts from rank 0's saved state (dp rank 0) or a fresh seed (others).

Guards: a step whose loss or gradient norm is not finite (or, after warm-up, whose gradient norm
exceeds ``skip_factor * grad_clip``) is skipped and counted; periodic checkpoints wait until a step
is applied again, so ``latest`` always predates the current streak; ``max_consecutive_skips`` skips
in a row stop the run with :class:`TrainingDiverged` naming that checkpoint.

Preemption: SIGTERM / SIGUSR1 (and submitit's USR2) are recorded by
``launch.preemption.PreemptionHandler``; at the next step boundary (agreed over all ranks) the run
saves a checkpoint and requeues (``launch.preemption.requeue``). A run always resumes from
``<run>/checkpoints/latest`` when one exists.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_starflow.config import Config, ConfigError, save_config
from megatron_starflow.data.datasets import make_datasets
from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
from megatron_starflow.evaluation.likelihood import evaluate
from megatron_starflow.launch import faults
from megatron_starflow.launch.preemption import PreemptionHandler, requeue
from megatron_starflow.models.noise import add_noise
from megatron_starflow.models.system import StarFlowSystem, param_groups
from megatron_starflow.training import checkpoint as ckpt
from megatron_starflow.training.losses import flow_and_fsm_backward
from megatron_starflow.training.metrics import MetricsLogger
from megatron_starflow.training.schedule import lr_at

CHECKPOINT_FORMAT = "megatron_starflow/full-v2"


class TrainingDiverged(ValueError):
    """Too many consecutive skipped steps (a ValueError so the CLI prints it as one line)."""


# ------------------------------------------------------------------------------ process layout

class Layout:
    """This process's place in the run: global rank/world, TP and DP rank/size."""

    def __init__(self, cfg: Config):
        from megatron.core import parallel_state

        from megatron_starflow.parallel import state as pstate

        world = dist.get_world_size() if dist.is_initialized() else pstate.rank_and_world()[1]
        if world == 1:
            pstate.ensure_single_process()  # as the one-process loop always did
        else:
            if cfg.parallel.pp > 1:
                raise ConfigError("parallel.pp > 1: the training loop runs DP x TP (+SP); the "
                                  "pipeline schedule (parallel/pipeline.py) is not wired into it "
                                  "yet; set parallel.pp=1")
            pstate.initialize_from_config(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.sp = bool(cfg.parallel.sp and self.tp_size > 1)

    def describe(self) -> dict:
        return {"world": self.world, "tp": self.tp_size, "dp": self.dp_size, "sp": self.sp}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def dp_mean(self, values: list[float]) -> list[float]:
        if self.dp_size == 1:
            return values
        from megatron.core import parallel_state

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return (t / self.dp_size).tolist()


def _is_tp(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def clip_grad_norm(params: list, max_norm: float, layout: Layout) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (exactly that call on one TP rank); under TP the squared
    norms of sharded grads are summed over the TP group, replicated ones counted once."""
    if not params:
        return 0.0
    if layout.tp_size == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    grads = [(p, p.grad) for p in params if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p, g in grads:
        sq = g.detach().double().pow(2).sum()
        if _is_tp(p):
            sharded += sq
        else:
            replicated += sq
    dist.all_reduce(sharded, group=layout.tp_group)
    norm = float((sharded + replicated).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for _, g in grads:
            g.detach().mul_(coef)
    return norm


# ------------------------------------------------------------------------------ full <-> local state

def _optimizer_params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_model_state(system: StarFlowSystem, layout: Layout) -> dict:
    """``system.trainable_state_dict()`` with TP-sharded parameters gathered to full shapes
    (collective over the TP group)."""
    from megatron_starflow.parallel.sharding import gather_tp_tensor

    state = system.trainable_state_dict()
    if layout.tp_size == 1:
        return state
    params = {f"model.{n}": p for n, p in system.model.named_parameters()}
    return {k: gather_tp_tensor(v, params[k]) if k in params and torch.is_tensor(v) else v
            for k, v in state.items()}


def load_full_model_state(system: StarFlowSystem, full: dict, layout: Layout) -> None:
    if layout.tp_size == 1:
        system.load_trainable_state_dict(full)
        return
    from megatron_starflow.parallel.sharding import shard_full_state_dict

    model_full = {k[6:]: v for k, v in full.items() if k.startswith("model.")}
    system.model.load_state_dict(shard_full_state_dict(model_full, system.model, layout.tp_rank,
                                                       layout.tp_size))
    if system.text_encoder.trainable:
        system.text_encoder.load_state_dict(
            {k[13:]: v for k, v in full.items() if k.startswith("text_encoder.")})


def full_optimizer_state(optimizer, layout: Layout) -> dict:
    state = optimizer.state_dict()
    if layout.tp_size == 1:
        return state
    from megatron_starflow.parallel.sharding import gather_tp_tensor

    params = _optimizer_params(optimizer)
    for index in sorted(state["state"]):
        # state_dict() shares the per-parameter dicts with the live optimizer: copy before editing
        per = state["state"][index] = dict(state["state"][index])
        for key, value in list(per.items()):
            if torch.is_tensor(value) and value.dim() > 0:
                per[key] = gather_tp_tensor(value, params[index])
    return state


def load_full_optimizer_state(optimizer, full: dict, layout: Layout) -> None:
    if layout.tp_size > 1:
        from megatron_starflow.parallel.sharding import partition_dim

        params = _optimizer_params(optimizer)
        for index, per in full["state"].items():
            dim = partition_dim(params[index])
            for key, value in list(per.items()):
                if dim is not None and torch.is_tensor(value) and value.dim() > 0:
                    per[key] = value.chunk(layout.tp_size, dim=dim)[layout.tp_rank].clone()
    optimizer.load_state_dict(full)


def _tracker_states() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    try:
        return dict(mrandom.get_cuda_rng_tracker().get_states())
    except Exception:  # noqa: BLE001 - no tracker (tp=1 on CPU): nothing to save
        return {}


def _set_tracker_states(states: dict) -> None:
    if not states:
        return
    from megatron.core.tensor_parallel import random as mrandom

    try:
        mrandom.get_cuda_rng_tracker().set_states(states)
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------------------ the loop

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


def train(cfg: Config, run_dir: str | None = None, quiet: bool = False,
          preemption: PreemptionHandler | None = None):
    from megatron_starflow.data.synthetic_loader import SyntheticBatchIterator
    from megatron_starflow.models.text import drop_captions
    from megatron_starflow.parallel.grads import (allreduce_data_parallel_grads,
                                                   allreduce_sequence_parallel_grads)

    tr = cfg.train
    run_dir = run_dir or tr.out_dir
    os.makedirs(run_dir, exist_ok=True)
    if tr.threads:
        torch.set_num_threads(tr.threads)
    layout = Layout(cfg)
    quiet = quiet or layout.rank != 0
    torch.manual_seed(tr.seed)
    if layout.rank == 0:
        save_config(cfg, os.path.join(run_dir, "config.json"))
        if cfg.text.encoder == "sentencepiece":
            ensure_tokenizer(cfg, run_dir)  # once, before the other ranks read it
    layout.barrier()
    system = StarFlowSystem(cfg, run_dir).to(DTYPES[tr.dtype])
    data = make_datasets(cfg)
    flow_params, den_params = param_groups(system)
    groups = [{"params": flow_params, "name": "flow"}]
    if den_params:
        groups.append({"params": den_params, "name": "denoiser"})
    optimizer = torch.optim.AdamW(groups, lr=tr.lr, betas=(tr.beta1, tr.beta2),
                                  weight_decay=tr.weight_decay)
    # Noise, dequantisation and caption dropout: one generator per DP rank (TP ranks of a DP
    # group draw the same numbers for the same batch); DP rank 0 keeps the one-process seed.
    gen = torch.Generator().manual_seed(tr.seed + 1 + 1000003 * layout.dp_rank)
    start_step, skipped, state, resumed_from = 0, 0, None, None
    try:
        _, state, resumed_from = ckpt.load_checkpoint(run_dir)
    except FileNotFoundError:
        pass
    if state is not None:
        load_full_model_state(system, state["model"], layout)
        load_full_optimizer_state(optimizer, state["optimizer"], layout)
        start_step, skipped = int(state["step"]), int(state.get("skipped", 0))
        ranks = state.get("rng_ranks")
        saved_layout = state.get("parallel", {})
        if ranks and len(ranks) == layout.world and saved_layout.get("tp", 1) == layout.tp_size:
            mine = ranks[layout.rank]
            torch.set_rng_state(mine["torch"])
            gen.set_state(mine["gen"])
            _set_tracker_states(mine.get("tracker", {}))
        else:  # older checkpoint or another layout: rank 0's streams where they apply
            torch.set_rng_state(state["rng"])
            if "gen" in state and layout.dp_rank == 0:
                gen.set_state(state["gen"])
            elif layout.dp_rank:
                gen.manual_seed(tr.seed + 1 + 1000003 * layout.dp_rank + start_step)
        if not quiet:
            print(f"resumed from {resumed_from} at step {start_step}")
    data_state = state.get("data") if state is not None else None

    logger = MetricsLogger(run_dir, cfg.to_dict(), tr.wandb_mode, tr.wandb_project, rank=layout.rank)
    eval_kwargs = dict(batches=tr.eval_batches, batch_size=cfg.data.batch_size)
    eval_start = evaluate(system, data.heldout, **eval_kwargs)
    logger.log({"step": start_step, "split": "heldout", **eval_start})
    if cfg.data.source == "shards":
        from megatron_starflow.data.loader import build_train_iterator

        loader = build_train_iterator(cfg, run_dir, layout.dp_rank, layout.dp_size, state=data_state)
    else:
        loader = SyntheticBatchIterator(data.train, cfg.data.batch_size, tr.seed, layout.dp_rank,
                                        layout.dp_size)
        if data_state and "sampler" in data_state:
            loader.load_state_dict(data_state)
        elif state is not None:  # older checkpoint: it restarted its epoch
            loader.sampler.consumed = int(state.get("epoch", 0)) * len(data.train)
    batches = loader.batches()

    handler = preemption or PreemptionHandler().install()
    nan_steps = faults.nan_steps()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.dtype == "bfloat16")
    sigma = cfg.model.noise_std
    t_start = time.time()
    last_eval = eval_start
    streak, streak_start, save_pending, last_saved = 0, None, False, None
    preempted, stop_reason = False, ""
    progress = tqdm(range(start_step, tr.steps), initial=start_step, total=tr.steps,
                    desc="train", disable=quiet, dynamic_ncols=True)
    epoch = loader.sampler.epoch

    def save(step: int) -> str:
        nonlocal last_saved
        rng = {"torch": torch.get_rng_state(), "gen": gen.get_state(), "tracker": _tracker_states(),
               "rank": layout.rank, "tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank}
        rng_ranks = [rng]
        if layout.world > 1:
            rng_ranks = [None] * layout.world
            dist.all_gather_object(rng_ranks, rng)
        model_state = full_model_state(system, layout)
        optim_state = full_optimizer_state(optimizer, layout)
        path = ""
        if layout.rank == 0:
            payload = {"model": model_state, "optimizer": optim_state, "step": step,
                       "skipped": skipped, "epoch": epoch, "rng": rng["torch"], "gen": rng["gen"],
                       "rng_ranks": rng_ranks, "data": loader.state_dict(),
                       "parallel": layout.describe(), "format": CHECKPOINT_FORMAT,
                       "consecutive_skips": streak}
            path = ckpt.save_checkpoint(run_dir, step, cfg, payload, tr.keep_checkpoints,
                                        tokenizer_file=tokenizer_path(cfg, run_dir)
                                        if cfg.text.encoder == "sentencepiece" else None)
        layout.barrier()
        last_saved = step
        return path or os.path.join(ckpt.checkpoint_root(run_dir), f"step_{step:07d}")

    system.train()
    try:
        for step in progress:
            t0 = time.time()
            lr = lr_at(step, tr.lr, tr.min_lr, tr.warmup_steps, tr.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            epoch, batch = next(batches)
            captions = drop_captions(batch["caption"], cfg.text.caption_dropout, gen)
            tokens = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
            noisy = add_noise(tokens, sigma, gen)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                text = system.encode_text(captions)
                losses = flow_and_fsm_backward(system.model, noisy, text, cfg.model.fsm_weight)
            if step in nan_steps:  # test hook: a diverging step
                for p in flow_params:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
                        break
            if layout.sp:
                allreduce_sequence_parallel_grads(system.model)
            if layout.dp_size > 1:
                allreduce_data_parallel_grads([p for g in groups for p in g["params"]])
            flow_norm = clip_grad_norm(flow_params, tr.grad_clip, layout)
            den_norm = clip_grad_norm(den_params, tr.grad_clip, layout) if den_params else 0.0
            fsm_value = None if losses.fsm is None else losses.fsm.item()
            loss_value, bpd_value, fsm_mean = layout.dp_mean(
                [losses.flow.item(), losses.bits_per_dim.item(), fsm_value or 0.0])
            if fsm_value is not None:
                fsm_value = fsm_mean
            # The reference's rule: after warm-up, an update whose gradient norm is not finite
            # or far above the clip is skipped rather than clipped into the weights; a
            # non-finite loss (or denoiser gradient) is skipped too.
            skip = (not math.isfinite(flow_norm) or not math.isfinite(den_norm)
                    or not math.isfinite(loss_value)
                    or (step >= tr.warmup_steps and flow_norm > tr.skip_factor * tr.grad_clip))
            if skip:
                skipped += 1
                streak += 1
                streak_start = step if streak == 1 else streak_start
            else:
                optimizer.step()
                streak = 0
            dt = time.time() - t0
            record = {"step": step + 1, "loss": loss_value, "bits_per_dim": bpd_value,
                      "fsm_loss": fsm_value, "grad_norm": flow_norm, "denoiser_grad_norm": den_norm,
                      "lr": lr, "skipped": skipped, "consecutive_skips": streak,
                      "tokens_per_s": tokens.shape[0] * tokens[0, ..., 0].numel() * layout.dp_size / dt,
                      "epoch": epoch}
            from megatron_starflow.training.flops import model_flops, step_metrics  # FLOPs / MFU
            record.update(step_metrics(model_flops(cfg, tokens.shape[0] * layout.dp_size, tuple(tokens.shape[1:4])),
                                       dt, tr.peak_tflops, layout.world))
            if (step + 1) % tr.log_every == 0 or step + 1 == tr.steps or skip:
                logger.log(record)
                progress.set_postfix(bpd=f"{bpd_value:.3f}", fsm=f"{fsm_value or 0:.3f}",
                                     gn=f"{flow_norm:.2f}")
            if (step + 1) % tr.eval_every == 0 or step + 1 == tr.steps:
                last_eval = evaluate(system, data.heldout, **eval_kwargs)
                logger.log({"step": step + 1, "split": "heldout", **last_eval})
                system.train()
            if (step + 1) % tr.ckpt_every == 0 or step + 1 == tr.steps:
                save_pending = True
            # Not during a streak of skipped steps (so `latest` predates it), except at the end
            # of the run (skipped steps change no weights: it still holds the pre-streak ones).
            if save_pending and (streak == 0 or step + 1 == tr.steps):
                save(step + 1)
                save_pending = False
            if tr.max_consecutive_skips and streak >= tr.max_consecutive_skips:
                raise _diverged(cfg, run_dir, streak, streak_start, step, layout, save)
            if layout.any(handler.requested):
                where = save(step + 1) if last_saved != step + 1 else os.path.join(
                    ckpt.checkpoint_root(run_dir), f"step_{step + 1:07d}")
                how = requeue(handler, layout.rank, step + 1, where)
                logger.log({"step": step + 1, "event": "preempted", "checkpoint": where,
                            "requeue": how})
                if not quiet:
                    print(f"preempted at step {step + 1}: checkpoint {where}; {how}")
                preempted, stop_reason = True, f"preempted ({how})"
                break
            faults.step_sleep()
    finally:
        logger.close()
        if preemption is None:
            handler.uninstall()
    return TrainResult(run_dir, step + 1 if preempted else tr.steps, skipped, eval_start, last_eval,
                       time.time() - t_start, preempted=preempted, stop_reason=stop_reason)


def _diverged(cfg: Config, run_dir: str, streak: int, streak_start: int, step: int,
              layout: Layout, save) -> TrainingDiverged:
    """Stop: name the checkpoint from before the streak (none was written during it), or write one
    now if the run has none (skipped steps change no weights, so it holds the weights and
    optimizer state from before the streak)."""
    try:
        before = ckpt.resolve_checkpoint(run_dir)
    except FileNotFoundError:
        before = save(step + 1)
    if layout.rank == 0:
        import json

        with open(os.path.join(ckpt.checkpoint_root(run_dir), "DIVERGED.json"), "w") as f:
            json.dump({"consecutive_skips": streak, "first_skipped_step": streak_start + 1,
                       "last_skipped_step": step + 1, "checkpoint_before": before}, f, indent=2)
    return TrainingDiverged(
        f"training diverged: {streak} consecutive skipped steps (non-finite or exploding loss / "
        f"gradient norm) from step {streak_start + 1} to {step + 1} >= "
        f"train.max_consecutive_skips={cfg.train.max_consecutive_skips}; stopped. The last "
        f"checkpoint from before the divergence is {before}; resume from it with a lower train.lr, "
        f"a smaller train.grad_clip or other data (see {run_dir}/metrics.jsonl)")
