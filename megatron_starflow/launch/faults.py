"""Fault injection for tests, read from environment variables (all unset in normal runs).

``MEGATRON_STARFLOW_FAULT_STEP_SLEEP=0.2``       sleep this long after every training step, so a
                                                  test can kill a run in the middle
``MEGATRON_STARFLOW_FAULT_NAN_STEPS=5,6,9-20``   (0-based) steps whose gradients become NaN
``MEGATRON_STARFLOW_FAULT_SAVE_SLEEP=4:30``       the save of the checkpoint of step 4 sleeps 30 s
                                                  after writing its temporary folder (kill it then)
"""

from __future__ import annotations

import os
import time

PREFIX = "MEGATRON_STARFLOW_FAULT_"


def _steps(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out


def nan_steps() -> set[int]:
    return _steps(os.environ.get(PREFIX + "NAN_STEPS", ""))


def step_sleep() -> None:
    seconds = float(os.environ.get(PREFIX + "STEP_SLEEP", "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def save_sleep(step: int) -> None:
    spec = os.environ.get(PREFIX + "SAVE_SLEEP", "")
    if spec:
        at, seconds = spec.split(":", 1)
        if int(at) == int(step):
            time.sleep(float(seconds))
