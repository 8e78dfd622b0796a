"""Skip rule and divergence guard (METHOD.md's reference rule): a step whose loss or gradient norm
is not finite, or (after warm-up) whose flow gradient norm exceeds ``skip_factor * grad_clip``, is
skipped instead of clipped into the weights; ``max_consecutive_skips`` in a row stop the run."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_starflow.config import TrainConfig


class TrainingDiverged(ValueError):
    """Too many consecutive skipped steps (a ValueError so the CLI prints it as one line)."""


@dataclass
class SkipGuard:
    cfg: TrainConfig
    skipped: int = 0  # total skipped steps of the run
    streak: int = 0  # skipped steps in a row, ending at the current step
    streak_start: int = -1  # 0-based step where the current streak began

    def should_skip(self, step: int, loss: float | None, norms: dict[str, float]) -> bool:
        values = [v for v in norms.values()] + ([] if loss is None else [loss])
        if not all(math.isfinite(v) for v in values):
            return True
        flow = norms.get("flow", 0.0)
        return step >= self.cfg.warmup_steps and flow > self.cfg.skip_factor * self.cfg.grad_clip

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            self.streak += 1
            if self.streak == 1:
                self.streak_start = step
        else:
            self.streak = 0

    @property
    def diverged(self) -> bool:
        limit = self.cfg.max_consecutive_skips
        return bool(limit) and self.streak >= limit

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "streak": self.streak, "streak_start": self.streak_start}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        self.streak = int(state["streak"])
        self.streak_start = int(state["streak_start"])

    def diverged_error(self, step: int, checkpoint: str, run_dir: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {self.streak} consecutive skipped steps (non-finite or exploding "
            f"loss / gradient norm) from step {self.streak_start + 1} to {step + 1} >= "
            f"train.max_consecutive_skips={self.cfg.max_consecutive_skips}; stopped. The last "
            f"checkpoint from before the divergence is {checkpoint}; resume from it with a lower "
            f"train.lr, a smaller train.grad_clip or other data (see {run_dir}/metrics.jsonl)")
