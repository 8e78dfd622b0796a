"""Training checkpoints seen from one process: find one, read its full weights, or write one from a
system (a fine-tuning start, a test fixture) in exactly the format the loop writes.

The loop's own saving and resharding resume is ``training/checkpointing.py`` over
``training/sharded_checkpoint.py``; this module never holds optimizer state of a real run.
"""

from __future__ import annotations

import os

import torch

from megatron_starflow.config import Config, config_from_dict
from megatron_starflow.training import sharded_checkpoint as store


def resolve_checkpoint(path: str) -> str:
    """A run folder, a checkpoints folder or a step folder -> the step folder to read: the newest
    intact checkpoint of a run (damaged ones are skipped with a warning)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        # a step folder named directly: its manifest, and every file's size (hashing a large
        # checkpoint on every sample/eval call would cost minutes; a run folder is hashed)
        problems = store.verify(path, hashes=False)
        if problems:
            raise store.NoIntactCheckpointError(f"checkpoint {path} is not intact: "
                                                f"{'; '.join(problems)}")
        return path
    for run_dir in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isdir(store.checkpoints_dir(run_dir)):
            found, notes = store.find_resumable(run_dir)
            for note in notes:
                import warnings

                warnings.warn(note, stacklevel=2)
            if found:
                return found
    raise FileNotFoundError(f"{path!r} is not a checkpoint: expected a step folder with meta.json, or "
                            f"a run folder with checkpoints/ (train one with `python launch.py train "
                            f"--config examples/configs/tiny_cpu.yaml`)")


class NoEMAError(ValueError):
    pass


def load_checkpoint(path: str, weights: str = "auto") -> tuple[Config, dict, int, str]:
    """-> (config, full weights named as ``StarFlowSystem.trainable_state_dict``, step, step
    folder). ``weights``: ``auto`` (the EMA of the flow and denoiser when the checkpoint holds
    one, else the raw weights), ``ema`` (an error without one) or ``raw``. The config is the one
    saved with the weights, its tokenizer pointed at the checkpoint's own copy."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights={weights!r}; valid: auto, ema, raw")
    step_dir = resolve_checkpoint(path)
    cfg = config_from_dict(store.read_config(step_dir))
    spm = os.path.join(step_dir, "tokenizer", "spm.model")
    if cfg.text.encoder == "sentencepiece" and os.path.isfile(spm):
        cfg.text.path = spm
    state = store.load_full_model(step_dir)
    if weights != "raw":
        from megatron_starflow.training.ema import PREFIX

        ema = store.load_full_tensors(step_dir, "model", prefix=PREFIX)
        if ema:
            state.update(ema)
        elif weights == "ema":
            raise NoEMAError(f"{step_dir} holds no EMA weights (train with train.ema_decay > 0, "
                             f"e.g. 0.999); use the raw weights instead")
    return cfg, state, int(store.read_meta(step_dir)["step"]), step_dir


def save_system_checkpoint(run_dir: str, step: int, cfg: Config, system,
                           tokenizer_file: str | None = None) -> str:
    """Write ``system``'s weights as step ``step`` of ``run_dir`` with a fresh optimizer state
    (fp32 master = the weights, zero moments) and no data position, in one process: the loop
    resumes from it with any layout."""
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.training.build import named_param_groups
    from megatron_starflow.training.checkpointing import FORMAT
    from megatron_starflow.training.guards import SkipGuard
    from megatron_starflow.training.layout import ProcessLayout
    from megatron_starflow.training.optimizer import build_optimizer

    ensure_single_process()
    layout = ProcessLayout.current(cfg, next(system.parameters()).device)
    groups = named_param_groups(system, layout)
    optimizer = build_optimizer(cfg, groups, layout)
    try:
        tensors = optimizer.model_sharded_state_dict(prefix="model.")
        tensors.update(optimizer.sharded_state_dict())
        meta = {"format": FORMAT, "step": step, "guard": SkipGuard(cfg.train).state_dict(),
                "data": None, "parallel": layout.describe()}
        files = {"tokenizer/spm.model": tokenizer_file} if tokenizer_file else {}
        return store.save(run_dir, step, tensors, {"torch": torch.get_rng_state()}, meta,
                          cfg.to_dict(), keep=cfg.train.keep_checkpoints, files=files)
    finally:
        optimizer.close()
