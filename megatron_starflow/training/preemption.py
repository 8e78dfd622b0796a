"""Preemption: a signal asks for a checkpoint at the next step boundary, then the job requeues.

SLURM warns a job before it is preempted or hits its time limit with a signal (``--signal``;
submitit's sbatch uses ``USR2@<delay>``), and sends SIGTERM when it stops it. A signal handler
must not checkpoint by itself (the signal lands in the middle of a step, on each rank at a
different moment), so :class:`PreemptionHandler` only records it; the training loop polls
``requested`` at every step boundary (all-reduced over ranks, so every rank stops at the same
step), saves a checkpoint and calls :func:`requeue`.

How the job is requeued (``requeue``; the loop asks ``TrainHooks.requeue`` first, which tests
override to record the request instead), in this order:
* under submitit (``SUBMITIT_EXECUTOR`` set) and the signal is submitit's: submitit's own handler
  is called now, at the step boundary: it calls the job's ``checkpoint()`` (which resubmits the
  same ``TrainJob``; it resumes from ``latest``), requeues (``scontrol requeue`` on SLURM, a
  restart of every task with the local executor) and exits;
* SLURM without submitit (``SLURM_JOB_ID``, e.g. an ``srun`` launch): ``scontrol requeue``;
* otherwise nothing: the run stops after its checkpoint and resumes when started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def submitit_signal() -> int | None:
    """The preemption signal submitit listens to (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
    otherwise), when running under submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name, None)


class PreemptionHandler:
    """Records SIGTERM / SIGUSR1 (and submitit's signal) instead of dying. ``install()`` is a
    no-op outside the main thread (signal handlers can only be set there)."""

    def __init__(self, signals: tuple[int, ...] | None = None):
        sigs = list(signals or (signal.SIGTERM, signal.SIGUSR1))
        extra = submitit_signal()
        if extra is not None and extra not in sigs:
            sigs.append(extra)
        self.signals = sigs
        self.received: int | None = None
        self.received_at: float | None = None
        self.previous: dict[int, object] = {}
        self.installed = False

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is None:
            self.received, self.received_at = signum, time.time()
            print(f"[preemption] got {signal.Signals(signum).name}: checkpoint at the next step "
                  f"boundary", file=sys.stderr, flush=True)

    def install(self) -> "PreemptionHandler":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return self

    def uninstall(self) -> None:
        if not self.installed:
            return
        for sig, old in self.previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self.installed = False

    @property
    def requested(self) -> bool:
        return self.received is not None

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a checkpoint + requeue as if ``signum`` had arrived (tests, tools)."""
        self._handle(signum, None)


def requeue(handler: PreemptionHandler, rank: int, step: int, checkpoint: str) -> str:
    """Requeue the job after the preemption checkpoint; returns how (for the log). Called on every
    rank; only rank 0 acts (submitit's handler itself also acts on global rank 0 only)."""
    signum = handler.received if handler.received is not None else signal.SIGUSR1
    previous = handler.previous.get(signum)
    sub_sig = submitit_signal()
    if sub_sig is not None and callable(previous):
        if signum != sub_sig:
            previous = handler.previous.get(sub_sig)
        if callable(previous):
            handler.uninstall()
            previous(sub_sig, None)  # rank 0: checkpoint() -> requeue -> sys.exit; others return
            return "submitit requeue"
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        if rank == 0:
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        return f"scontrol requeue {job_id}"
    return "no requeue (not under SLURM/submitit): start the same command again to resume"
