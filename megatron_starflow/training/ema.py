"""Exponential moving average of the flow and denoiser weights (``train.ema_decay``; 0 = off).

Kept like the fp32 master weights: each data x context parallel rank holds, in fp32, the rows of
every parameter it owns in the optimizer, updated from the master rows after each applied step.
Checkpoints store it under ``ema.<name>`` beside the weights, so one process reads it as it reads
the weights (``training/checkpoint.py: load_checkpoint``); eval and sample use it by default.
"""

from __future__ import annotations

import torch

PREFIX = "ema."


class RowEMA:
    def __init__(self, optimizer, decay: float):
        self.optimizer, self.decay = optimizer, float(decay)
        names = [fqn for g in optimizer.groups for fqn, _ in g["params"]]
        # The text encoder (trainable only for the small sentencepiece model) keeps its raw weights.
        self.rows = {fqn: optimizer.master_rows(fqn).detach().float().clone()
                     for fqn in names if fqn.startswith("model.")}

    @torch.no_grad()
    def update(self) -> None:
        for fqn, rows in self.rows.items():
            rows.lerp_(self.optimizer.master_rows(fqn).float(), 1.0 - self.decay)

    def sharded_state_dict(self) -> dict:
        return {PREFIX + fqn: self.optimizer.rows_dtensor(fqn, rows) for fqn, rows in self.rows.items()}

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict) -> bool:
        """Restore from a loaded template; False (and the EMA restarts from the weights) when the
        checkpoint was written without one."""
        keys = [PREFIX + fqn for fqn in self.rows]
        if not all(k in loaded for k in keys):
            for fqn, rows in self.rows.items():
                rows.copy_(self.optimizer.master_rows(fqn).float())
            return False
        for fqn, rows in self.rows.items():
            value = loaded[PREFIX + fqn]
            rows.copy_(value.to_local() if hasattr(value, "to_local") else value)
        return True
