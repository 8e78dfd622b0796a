"""Exact resume, atomic checkpoints, guards and preemption of the training loop (one process).

* A run SIGKILLed in the middle (after a checkpoint) and started again computes bit-for-bit the
  same loss at every later step, and the same final held-out bits/dim, as an uninterrupted run
  (float32; `==` on the logged floats).
* A kill while a checkpoint is being written leaves the previous one loadable (`latest` still
  names it); the run then resumes exactly; the last `keep_checkpoints` folders are kept.
* SIGUSR1 -> a checkpoint at the next step boundary + the requeue callback (a marker file).
* NaN gradients -> the step is skipped and counted; too many in a row -> TrainingDiverged naming
  the checkpoint from before the streak.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from helpers_launch import (final_eval, kill_group, latest_step, overrides, run_train,
                            start_train, step_losses, wait_for)

STEPS, EVERY = 9, 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("resume") / "reference")
    run_train(run_dir, overrides(STEPS, EVERY))
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {s: v[0] for s, v in losses.items()}, final_eval(run_dir)


def _assert_same_as_reference(run_dir: str, reference) -> None:
    ref_losses, ref_eval = reference
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, values in losses.items():
        assert all(v == ref_losses[step] for v in values), (step, values, ref_losses[step])
    got = final_eval(run_dir)
    assert got["step"] == STEPS and got["bits_per_dim"] == ref_eval["bits_per_dim"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bitwise_exact(reference, tmp_path):
    run_dir = str(tmp_path / "killed")
    proc = start_train(run_dir, overrides(STEPS, EVERY), step_sleep=0.4)
    wait_for(lambda: latest_step(run_dir) >= 3, proc, what="the step-3 checkpoint")
    kill_group(proc)  # SIGKILL, mid-run (each step sleeps 0.4 s)
    assert proc.returncode == -signal.SIGKILL
    k = latest_step(run_dir)
    assert 3 <= k < STEPS
    resumed = run_train(run_dir, overrides(STEPS, EVERY))
    assert f"resumed from" in resumed.stdout + resumed.stderr
    _assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous_checkpoint(reference, tmp_path):
    from megatron_starflow.training.checkpoint import load_checkpoint

    run_dir = str(tmp_path / "save_killed")
    root = os.path.join(run_dir, "checkpoints")
    proc = start_train(run_dir, overrides(STEPS, EVERY), save_sleep="6:120")

    def saving_step_6():  # every file written under the temporary name, not yet renamed
        return os.path.isdir(root) and any(
            d.startswith("step_0000006.tmp-") and os.path.isfile(os.path.join(root, d, "integrity.json"))
            for d in os.listdir(root))

    wait_for(saving_step_6, proc, what="the save of step 6")
    kill_group(proc)
    assert latest_step(run_dir) == 3
    _, _, step, step_dir = load_checkpoint(run_dir)  # the previous checkpoint loads
    assert step == 3 and step_dir.endswith("step_0000003")
    assert not os.path.exists(os.path.join(root, "step_0000006"))
    run_train(run_dir, overrides(STEPS, EVERY))
    _assert_same_as_reference(run_dir, reference)
    # retention (keep_checkpoints=2), `latest`, and the dead writer's temporary folder is gone
    assert sorted(os.listdir(root)) == ["latest", "step_0000006", "step_0000009"]
    assert latest_step(run_dir) == STEPS


@pytest.mark.slow
def test_sigusr1_checkpoints_and_calls_requeue(tmp_path):
    run_dir = str(tmp_path / "preempted")
    marker = str(tmp_path / "requeued.json")
    proc = start_train(run_dir, overrides(40, 100), step_sleep=0.3, requeue_marker=marker)
    wait_for(lambda: max(step_losses(run_dir) or {0: 0}) >= 2 if os.path.isfile(
        os.path.join(run_dir, "metrics.jsonl")) else False, proc, what="step 2")
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    with open(marker) as f:
        info = json.load(f)
    assert info["signal"] == "SIGUSR1" and 2 <= info["step"] < 40
    assert latest_step(run_dir) == info["step"]
    assert info["checkpoint"].endswith(f"step_{info['step']:07d}")
    summary = json.loads(out[out.index("{"):])
    assert summary["preempted"] is True and summary["steps"] == info["step"]


# ------------------------------------------------------------------------------ in-process

def _cfg(steps, every, *extra):
    from helpers_launch import CONFIG

    from megatron_starflow.config import load_config

    return load_config(CONFIG, overrides(steps, every, *extra))


def test_nan_step_is_skipped_and_counted(tmp_path):
    from helpers_faults import FaultHooks

    from megatron_starflow.training.metrics import read_metrics
    from megatron_starflow.training.trainer import train

    result = train(_cfg(4, 4), str(tmp_path / "run"), quiet=True, hooks=FaultHooks(nan_steps={2}))
    assert result.skipped == 1 and result.steps == 4
    rows = {r["step"]: r for r in read_metrics(str(tmp_path / "run")) if "loss" in r}
    assert rows[3]["skipped"] == 1 and rows[3]["consecutive_skips"] == 1
    assert rows[4]["consecutive_skips"] == 0


def test_consecutive_nan_steps_stop_with_checkpoint_from_before(tmp_path):
    from helpers_faults import FaultHooks

    from megatron_starflow.training.checkpoint import load_checkpoint
    from megatron_starflow.training.guards import TrainingDiverged
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path / "run")
    hooks = FaultHooks(nan_steps=set(range(3, 101)))  # steps 4.. diverge
    with pytest.raises(TrainingDiverged, match=r"3 consecutive skipped steps .* step 4 to 6.*step_0000002"):
        train(_cfg(20, 2, "train.max_consecutive_skips=3"), run_dir, quiet=True, hooks=hooks)
    # the checkpoint due at step 4 and 6 were not written during the streak
    _, _, step, step_dir = load_checkpoint(run_dir)
    assert step == 2 and step_dir.endswith("step_0000002")
    with open(os.path.join(run_dir, "checkpoints", "DIVERGED.json")) as f:
        assert json.load(f)["first_skipped_step"] == 4


def test_preemption_request_saves_and_requeues_in_process(tmp_path):
    from helpers_faults import FaultHooks

    from megatron_starflow.training.preemption import PreemptionHandler
    from megatron_starflow.training.trainer import train

    marker = tmp_path / "marker.json"
    handler = PreemptionHandler()
    handler.request(signal.SIGTERM)
    result = train(_cfg(10, 100), str(tmp_path / "run"), quiet=True, preemption=handler,
                   hooks=FaultHooks(requeue_marker=str(marker)))
    assert result.preempted and result.steps == 1
    assert json.loads(marker.read_text())["signal"] == "SIGTERM"
    assert latest_step(str(tmp_path / "run")) == 1


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    """A truncated file in the newest checkpoint: one warning naming it, and the run resumes from
    the previous intact one (and recomputes the lost steps)."""
    from megatron_starflow.training.metrics import read_metrics
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path / "run")
    train(_cfg(4, 2), run_dir, quiet=True)
    step4 = os.path.join(run_dir, "checkpoints", "step_0000004", "optim")
    victim = [f for f in os.listdir(step4) if f.endswith(".distcp")][0]
    with open(os.path.join(step4, victim), "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match=rf"step_0000004.*optim/{victim}.*truncated"):
        result = train(_cfg(6, 2), run_dir, quiet=True)
    assert result.steps == 6
    resumed = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert resumed == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 again, from step 2's checkpoint


def test_no_intact_checkpoint_is_one_clear_error(tmp_path, capsys):
    from megatron_starflow.cli.app import main
    from megatron_starflow.training.trainer import train

    run_dir = str(tmp_path / "run")
    train(_cfg(2, 1), run_dir, quiet=True)
    root = os.path.join(run_dir, "checkpoints")
    for step in ("step_0000001", "step_0000002"):
        os.remove(os.path.join(root, step, "integrity.json"))
    from helpers_launch import CONFIG

    code = main(["train", "--config", CONFIG, "--out", run_dir, *overrides(4, 1)])
    err = capsys.readouterr().err
    assert code == 2 and "no intact checkpoint" in err
    assert "step_0000001: integrity.json" in err and "step_0000002: integrity.json" in err


def test_a_layout_that_does_not_fit_the_world_is_an_error(tmp_path, capsys):
    """parallel.tp=3 on one process: one line naming the key and the world size, never a silent
    TP=1 run."""
    from helpers_launch import CONFIG

    from megatron_starflow.cli.app import main

    code = main(["train", "--config", CONFIG, "--out", str(tmp_path / "run"),
                 *overrides(2, 2, "parallel.tp=3")])
    err = capsys.readouterr().err
    assert code == 2 and "world size 1" in err and "parallel.tp" in err
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))
