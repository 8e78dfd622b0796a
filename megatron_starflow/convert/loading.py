"""One entry for every reader of a trained model: a training checkpoint or an inference folder
-> the system in eval mode. Sampling, evaluation, the tools and the tests load through
``load_system`` only, so the checkpoint format is read in one place."""

from __future__ import annotations


def load_system(checkpoint: str):
    """A training checkpoint (run / checkpoints / step folder) or an inference folder written by
    ``tools/convert_checkpoint.py export`` / ``tools/import_ml_starflow.py`` -> (system, step,
    folder), on one process, in eval mode."""
    from megatron_starflow.convert.inference import is_inference_folder, load_inference_system

    if is_inference_folder(checkpoint):
        _, system, meta = load_inference_system(checkpoint)
        return system, int(meta.get("step", 0) or 0), checkpoint
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.training.checkpoint import load_checkpoint

    cfg, state, step_dir = load_checkpoint(checkpoint)
    ensure_single_process()
    system = StarFlowSystem(cfg, step_dir)
    system.load_trainable_state_dict(state["model"])
    system.eval()
    return system, state.get("step", 0), step_dir
