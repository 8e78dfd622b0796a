"""Metric logging: JSONL always (one object per line, flushed), wandb when configured (offline by
default, so a run never needs the network)."""

from __future__ import annotations

import json
import math
import os


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, run_dir: str, config: dict | None = None, wandb_mode: str = "disabled",
                 project: str = "megatron_starflow", rank: int = 0):
        self.rank = rank
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if rank == 0 else None
        self._wandb = None
        if rank == 0 and wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:  # wandb is optional; JSONL is the record of truth
                wandb = None
            if wandb is not None:
                self._wandb = wandb.init(project=project, dir=run_dir, mode=wandb_mode,
                                         config=config, reinit=True)

    def log(self, record: dict) -> None:
        if self._file is None:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=record.get("step"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
