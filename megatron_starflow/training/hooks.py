"""Extension points of the training loop. Production runs use the no-op base class; tests pass
subclasses that inject faults (NaN gradients, slow steps, a kill in the middle of a save), so
nothing on the production path reads test switches from the environment."""

from __future__ import annotations


class TrainHooks:
    """Every method is called on every rank; the defaults do nothing. Instances must pickle (a
    submitit executor ships them to its tasks)."""

    def after_backward(self, step: int, params: list) -> None:
        """Gradients of ``step`` (0-based) are accumulated (in each param's ``main_grad``)."""

    def after_step(self, step: int) -> None:
        """``step`` is finished (applied or skipped, logged, maybe checkpointed)."""

    def during_save(self, step: int, tmp_dir: str) -> None:
        """The checkpoint of ``step`` is written under its temporary name, not yet renamed."""

    def requeue(self, signum: int, rank: int, step: int, checkpoint: str) -> str | None:
        """After the preemption checkpoint: return how the job was requeued to replace the real
        requeue (``training.preemption.requeue``), or None to let it run."""
        return None
