"""One entry for every reader of a trained model: a training checkpoint or an inference folder
-> the system in eval mode. Sampling, evaluation, the tools and the tests load through
``load_system`` only, so the checkpoint format is read in one place."""

from __future__ import annotations


def load_system(checkpoint: str, device: str | None = None, weights: str = "auto"):
    """A training checkpoint (run / checkpoints / step folder) or an inference folder written by
    ``tools/convert_checkpoint.py export`` / ``tools/import_ml_starflow.py`` -> (system, step,
    folder), on one process, in eval mode, on ``device`` (``parallel.device.select_device``:
    auto | cpu | cuda; None = the config's ``train.device``). ``weights`` of a training
    checkpoint: ``auto`` (its EMA when it holds one), ``ema`` or ``raw``."""
    from megatron_starflow.convert.inference import (is_inference_folder, load_inference_system,
                                                     read_config)
    from megatron_starflow.parallel.device import check_layers_on, select_device

    inference = is_inference_folder(checkpoint)
    if inference:
        cfg = read_config(checkpoint)
    else:
        from megatron_starflow.training.checkpoint import load_checkpoint

        cfg, state, step, folder = load_checkpoint(checkpoint, weights)
    where = select_device(device or cfg.train.device)
    check_layers_on(cfg.parallel, where)  # TE layers off CUDA: one ConfigError, nothing built
    if inference:
        cfg, system, meta = load_inference_system(checkpoint)
        step, folder = int(meta.get("step", 0) or 0), checkpoint
    else:
        from megatron_starflow.models.system import StarFlowSystem
        from megatron_starflow.parallel.state import ensure_single_process

        ensure_single_process()
        system = StarFlowSystem(cfg, folder)
        system.load_trainable_state_dict(state)
    system.to(where)
    system.eval()
    return system, step, folder
