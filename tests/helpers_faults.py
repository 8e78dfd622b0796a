"""Fault injection for tests, through the loop's hooks (``training/hooks.py``).

``tests/fault_launch.py`` builds a ``FaultHooks`` from its ``--fault-*`` flags and runs
``launch.py`` with it; in-process tests pass one to ``training.trainer.train`` directly."""

from __future__ import annotations

import json
import os
import signal
import time


from megatron_starflow.training.hooks import TrainHooks


def parse_steps(text: str) -> set[int]:
    """``"5,6,9-20"`` -> {5, 6, 9, ..., 20}."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


class FaultHooks(TrainHooks):
    def __init__(self, nan_steps: set[int] = frozenset(), step_sleep: float = 0.0,
                 save_sleep: tuple[int, float] | None = None, requeue_marker: str = ""):
        self.nan_steps, self.step_sleep, self.save_sleep = set(nan_steps), step_sleep, save_sleep
        self.requeue_marker = requeue_marker

    def requeue(self, signum, rank: int, step: int, checkpoint: str) -> str | None:
        """Record the request in a JSON marker (rank 0) instead of requeueing."""
        if not self.requeue_marker:
            return None
        if rank == 0:
            tmp = f"{self.requeue_marker}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"signal": signal.Signals(signum or signal.SIGUSR1).name, "step": step,
                           "checkpoint": checkpoint}, f)
            os.replace(tmp, self.requeue_marker)
        return f"fake requeue: marker {self.requeue_marker}"

    def after_backward(self, step: int, params: list) -> None:
        if step in self.nan_steps:  # one NaN gradient, as a diverging step would produce
            grad = params[0].main_grad
            grad.view(-1)[0] = float("nan")

    def after_step(self, step: int) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def during_save(self, step: int, tmp_dir: str) -> None:
        if self.save_sleep and self.save_sleep[0] == step:
            time.sleep(self.save_sleep[1])


