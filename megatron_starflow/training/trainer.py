"""The training loop: one process or every rank of a torchrun / submitit / SLURM launch, with any
layout of data, tensor (+sequence), pipeline and context parallelism.

A step: learning rate from the step (``schedule.lr_at``), the replica's batch (``data``), tokens +
noise + caption dropout drawn per sample from its data position (``training/sample_noise.py``),
``forward_backward`` of the layout's step
(``training/step.py``) accumulating fp32 main gradients, the sequence-parallel and data-parallel
reductions, per-group gradient norms, the skip rule (``training/guards.py``), the sharded AdamW
update (``training/sharded_optimizer.py``), logging, held-out evaluation, sharded checkpoints
(``training/checkpointing.py``) and preemption. Everything lives on the one device chosen by
``parallel/device.py``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_starflow.config import Config, save_config
from megatron_starflow.training.guards import SkipGuard
from megatron_starflow.training.hooks import TrainHooks
from megatron_starflow.training.layout import ProcessLayout
from megatron_starflow.training.metrics import MetricsLogger
from megatron_starflow.training.optimizer import reduce_sequence_parallel_grads
from megatron_starflow.training.schedule import lr_at

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


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


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | None = None, hooks: TrainHooks | None = None,
                 quiet: bool = False, preemption=None, device: torch.device | None = None):
        self.cfg = cfg
        # None: ``train.device``; a torch.device is used as it is (tests: torch's lazy device).
        self._device = device
        self.run_dir = run_dir or cfg.train.out_dir
        self.hooks = hooks or TrainHooks()
        self.quiet = quiet
        self._preemption = preemption

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from megatron_starflow.parallel.device import check_layers_on, select_device
        from megatron_starflow.training import build

        cfg, tr = self.cfg, self.cfg.train
        if tr.threads:
            torch.set_num_threads(tr.threads)
        self.device = select_device(tr.device if self._device is None else self._device)
        check_layers_on(cfg.parallel, self.device)  # before anything is written or built
        os.makedirs(self.run_dir, exist_ok=True)
        self.layout = lay = ProcessLayout.initialize(cfg, self.device)
        self.quiet = self.quiet or lay.rank != 0
        torch.manual_seed(tr.seed)
        if lay.rank == 0:
            save_config(cfg, os.path.join(self.run_dir, "config.json"))
        self.tokenizer = build.prepare_tokenizer(cfg, self.run_dir, lay)
        self.system = build.system_on_device(cfg, self.run_dir, self.device, DTYPES[tr.dtype])
        self.model = build.stage_model(self.system, cfg, lay)
        self.step_runner = build.step_runner(self.model, cfg, lay)
        self.named_groups = build.named_param_groups(self.system, lay)
        self.optimizer = build.optimizer(cfg, self.named_groups, lay)
        self.data = build.datasets(cfg)
        self.loader = build.train_loader(cfg, self.run_dir, self.data, lay)
        self.guard = SkipGuard(tr)
        from megatron_starflow.training.checkpointing import CheckpointManager
        from megatron_starflow.training.train_state import TrainState

        self.state = TrainState(lay, self.loader, self.guard)
        self.ema = None
        if tr.ema_decay:
            from megatron_starflow.training.ema import RowEMA

            self.ema = RowEMA(self.optimizer, tr.ema_decay)
        self.checkpoints = CheckpointManager(cfg, self.run_dir, lay, self.system, self.named_groups,
                                             self.optimizer, self.state, self.tokenizer, self.hooks,
                                             self.ema)
        self.resumed_from = self.checkpoints.resume()
        if self.resumed_from and not self.quiet:
            print(f"resumed from {self.resumed_from} at step {self.state.step}")
        self.logger = MetricsLogger(self.run_dir, cfg.to_dict(), tr.wandb_mode, tr.wandb_project,
                                    rank=lay.rank)

    # ------------------------------------------------------------------------------ one step
    def _replica_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        from megatron_starflow.training.sample_noise import replica_inputs

        epoch, batch = next(self._batches)
        cfg = self.cfg
        noisy, text = replica_inputs(self.system, batch, cfg.text.caption_dropout,
                                     cfg.model.noise_std, cfg.train.seed, self.device)
        return noisy, text, epoch

    def train_step(self, step: int) -> dict:
        cfg, tr, lay = self.cfg, self.cfg.train, self.layout
        t0 = time.time()
        lr = lr_at(step, tr.lr, tr.min_lr, tr.warmup_steps, tr.steps)
        self.optimizer.zero_grad()
        noisy, text, epoch = self._replica_batch()
        losses = self.step_runner.forward_backward(noisy, text)
        self.hooks.after_backward(step, [p for g in self.named_groups for _, p in g["params"]])
        if lay.sp:
            reduce_sequence_parallel_grads(self.named_groups, lay.tp_group)
        self.optimizer.reduce_grads()
        norms = self.optimizer.grad_norms()
        losses = lay.replica_values(losses)
        skip = self.guard.should_skip(step, losses["flow"], norms)
        if not skip:
            self.optimizer.step({g["name"]: lr for g in self.named_groups},
                                {g["name"]: tr.grad_clip for g in self.named_groups})
            if self.ema is not None:
                self.ema.update()
        self.guard.record(step, skip)
        self.state.step = step + 1
        dt = time.time() - t0
        self.state.train_seconds += dt
        from megatron_starflow.training.flops import model_flops, step_metrics

        replica_batch = noisy.shape[0]
        record = {"step": step + 1, "loss": losses["flow"], "bits_per_dim": losses["bits_per_dim"],
                  "fsm_loss": losses["fsm"], "grad_norm": norms.get("flow", 0.0),
                  "denoiser_grad_norm": norms.get("denoiser", 0.0), "lr": lr,
                  "skipped": self.guard.skipped, "consecutive_skips": self.guard.streak,
                  "tokens_per_s": replica_batch * noisy[0, ..., 0].numel() * lay.dp_size / dt,
                  "epoch": epoch, "train_seconds": round(self.state.train_seconds, 3), "skip": skip}
        record.update(step_metrics(model_flops(cfg, replica_batch * lay.dp_size,
                                               tuple(noisy.shape[1:4])), dt, tr.peak_tflops, lay.world))
        return record

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        from megatron_starflow.training.evaluation import evaluate_heldout

        return evaluate_heldout(self.system, self.step_runner, self.data.heldout, self.cfg, self.layout)

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        from megatron_starflow.training.preemption import PreemptionHandler, requeue

        self.setup()
        tr, lay = self.cfg.train, self.layout
        handler = self._preemption or PreemptionHandler().install()
        start = self.state.step
        t_start = time.time()
        try:
            eval_start = last_eval = self.evaluate()
            self.logger.log({"step": start, "split": "heldout", **eval_start})
            self._batches = self.loader.batches()
            self.system.train()
            save_pending, preempted, stop_reason = False, False, ""
            step = start - 1
            progress = tqdm(range(start, tr.steps), initial=start, total=tr.steps, desc="train",
                            disable=self.quiet, dynamic_ncols=True)
            for step in progress:
                record = self.train_step(step)
                skip = record.pop("skip")
                if (step + 1) % tr.log_every == 0 or step + 1 == tr.steps or skip:
                    self.logger.log(record)
                    progress.set_postfix(bpd=f"{record['bits_per_dim'] or 0:.3f}",
                                         fsm=f"{record['fsm_loss'] or 0:.3f}",
                                         gn=f"{record['grad_norm']:.2f}")
                if (step + 1) % tr.eval_every == 0 or step + 1 == tr.steps:
                    last_eval = self.evaluate()
                    self.logger.log({"step": step + 1, "split": "heldout", **last_eval})
                    self.system.train()
                if (step + 1) % tr.ckpt_every == 0 or step + 1 == tr.steps:
                    save_pending = True
                # Not during a streak of skipped steps (so `latest` predates it), except at the
                # end of the run (skipped steps change no weights).
                if save_pending and (self.guard.streak == 0 or step + 1 == tr.steps):
                    self.checkpoints.save(step + 1)
                    save_pending = False
                if self.guard.diverged:
                    raise self._diverged(step)
                if lay.any(handler.requested):
                    where = self.checkpoints.save(step + 1)
                    how = (self.hooks.requeue(handler.received, lay.rank, step + 1, where)
                           or requeue(handler, lay.rank, step + 1, where))
                    self.logger.log({"step": step + 1, "event": "preempted", "checkpoint": where,
                                     "requeue": how})
                    if not self.quiet:
                        print(f"preempted at step {step + 1}: checkpoint {where}; {how}")
                    preempted, stop_reason = True, f"preempted ({how})"
                    break
                self.hooks.after_step(step)
        finally:
            if hasattr(self, "logger"):
                self.logger.close()
            if hasattr(getattr(self, "loader", None), "close"):
                self.loader.close()  # decode worker processes (data.num_workers)
            if self._preemption is None:
                handler.uninstall()
        return TrainResult(self.run_dir, step + 1 if preempted else tr.steps, self.guard.skipped,
                           eval_start, last_eval, time.time() - t_start, preempted=preempted,
                           stop_reason=stop_reason)

    def _diverged(self, step: int):
        """Name the checkpoint from before the streak (none is written during one), or write one
        now if the run has none (skipped steps change no weights)."""
        before = self.checkpoints.latest() or self.checkpoints.save(step + 1)
        self.checkpoints.write_diverged_note(self.guard, step, before)
        return self.guard.diverged_error(step, before, self.run_dir)


def train(cfg: Config, run_dir: str | None = None, quiet: bool = False, preemption=None,
          hooks: TrainHooks | None = None, device: torch.device | None = None) -> TrainResult:
    """Train (one process, or every rank of a launch); resumes from ``<run>/checkpoints``.
    ``device``: overrides ``train.device`` with a device object (tests)."""
    return Trainer(cfg, run_dir, hooks, quiet, preemption, device).fit()
