"""Shared by tests/test_resume*.py and tests/test_launch*.py: a model small enough that a step takes
a few milliseconds, so each run is dominated by start-up (megatron import, tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
TESTS = os.path.join(ROOT, "tests")
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

TINY = ["train.warmup_steps=1", "train.log_every=1", "train.eval_batches=1",
        "train.wandb_mode=disabled", "train.threads=1", "data.batch_size=2", "data.frames=2",
        "data.height=8", "data.width=8", "data.num_train_clips=16", "data.num_heldout_clips=2",
        "model.num_blocks=2", "model.shallow_layers=1", "model.deep_layers=1",
        "model.denoiser_layers=1", "text.layers=1", "model.shallow_width=32", "model.deep_width=32",
        "model.text_width=32", "text.width=32", "model.head_dim=16", "model.text_length=8",
        "text.vocab_size=64"]


def overrides(steps: int, ckpt_every: int, *extra: str) -> list[str]:
    return [f"train.steps={steps}", f"train.ckpt_every={ckpt_every}", f"train.eval_every={steps}",
            *TINY, *extra]


def env() -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in RENDEZVOUS:  # set in this process by an in-process test's one-rank group
        out.pop(key, None)
    # tests/ on the path of every process of the launch: submitit tasks unpickle FaultHooks
    out["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, out.get("PYTHONPATH", "")) if p)
    return out


def train_cmd(run_dir: str, args: list[str], launcher: list[str] = (), **faults) -> list[str]:
    """``launch.py train`` with ``faults`` (``step_sleep=0.4``, ``save_sleep="6:120"``,
    ``nan_steps="3-9"``, ``requeue_marker=PATH``) given to tests/fault_launch.py's hooks."""
    flags = [f"--fault-{key.replace('_', '-')}={value}" for key, value in faults.items()]
    return [sys.executable, os.path.join(TESTS, "fault_launch.py"), *flags, "train", "--config",
            CONFIG, "--out", run_dir, *launcher, *args]


def run_train(run_dir: str, args: list[str], launcher: list[str] = (), timeout: int = 300,
              **faults) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(run_dir, args, launcher, **faults), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def start_train(run_dir: str, args: list[str], launcher: list[str] = (), **faults) -> subprocess.Popen:
    """In its own session, so ``kill_group`` reaches every process of a multi-task launch."""
    return subprocess.Popen(train_cmd(run_dir, args, launcher, **faults), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def latest_step(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return int(f.read().strip().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240.0,
             what: str = "condition") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def step_losses(run_dir: str) -> dict[int, list[float]]:
    """step -> the losses of every row logged for that step (a killed run may have logged steps
    past its last checkpoint, which the resumed run computes again)."""
    out: dict[int, list[float]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def last_losses(run_dir: str) -> dict[int, float]:
    """step -> the last loss logged for it."""
    return {step: values[-1] for step, values in step_losses(run_dir).items()}


def rewind(src: str, dst: str, step: int, keep_metrics: bool = True) -> None:
    """A copy of a finished run whose latest checkpoint is ``step`` (later ones removed)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("submitit"))
    root = os.path.join(dst, "checkpoints")
    for d in os.listdir(root):
        if d.startswith("step_") and int(d.split("_")[1]) > step:
            shutil.rmtree(os.path.join(root, d))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{step:07d}")
    if not keep_metrics:
        os.remove(os.path.join(dst, "metrics.jsonl"))


def final_eval(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("split") == "heldout"][-1]
