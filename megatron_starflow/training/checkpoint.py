"""Single-process checkpoints: one folder per step, written atomically, with a ``latest`` pointer.

Layout: ``<run>/checkpoints/step_0000100/{state.pt, config.json, tokenizer/}`` and
``<run>/checkpoints/latest`` (a text file naming the folder). A folder is written under a temporary
name and renamed when complete, and ``latest`` is replaced atomically, so a kill at any moment
leaves the previous checkpoint loadable. (Sharded megatron dist_checkpointing for multi-rank runs
builds on this layout in the launching issue.)
"""

from __future__ import annotations

import os
import shutil

import torch

from megatron_starflow.config import Config, config_from_dict, save_config


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, step: int, cfg: Config, state: dict, keep: int = 2,
                    tokenizer_file: str | None = None) -> str:
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp_{name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    from megatron_starflow.launch import faults

    faults.save_sleep(step)  # tests: a kill now must leave the previous checkpoint loadable
    save_config(cfg, os.path.join(tmp, "config.json"))
    if tokenizer_file and os.path.isfile(tokenizer_file):
        os.makedirs(os.path.join(tmp, "tokenizer"))
        shutil.copy(tokenizer_file, os.path.join(tmp, "tokenizer", "spm.model"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text(os.path.join(root, "latest"), name)
    _prune(root, keep)
    _remove_stale_tmp(root)
    return final


def _remove_stale_tmp(root: str) -> None:
    """Temporary folders left by writers that were killed mid-save (their pid is gone)."""
    for entry in os.listdir(root):
        if not entry.startswith(".tmp_"):
            continue
        try:
            pid = int(entry.rsplit("_", 1)[1])
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (ValueError, ProcessLookupError, IndexError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def resolve_checkpoint(path: str) -> str:
    """A run folder, a checkpoints folder or a step folder -> the step folder to load."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    for root in (checkpoint_root(path), path):
        pointer = os.path.join(root, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                step_dir = os.path.join(root, f.read().strip())
            if os.path.isfile(os.path.join(step_dir, "state.pt")):
                return step_dir
        # `latest` missing or naming a folder that is gone: the newest complete step folder
        if os.path.isdir(root):
            done = sorted(d for d in os.listdir(root) if d.startswith("step_")
                          and os.path.isfile(os.path.join(root, d, "state.pt"))
                          and os.path.isfile(os.path.join(root, d, "config.json")))
            if done:
                return os.path.join(root, done[-1])
    raise FileNotFoundError(f"{path!r} is not a checkpoint: expected a folder with state.pt and "
                            f"config.json, or a run folder with checkpoints/latest (train one with "
                            f"`python launch.py train --config examples/configs/tiny_cpu.yaml`)")


def load_checkpoint(path: str, map_location="cpu") -> tuple[Config, dict, str]:
    """-> (config, state, step folder). The config is the one saved with the weights, with the
    tokenizer path pointed at the checkpoint's own copy."""
    step_dir = resolve_checkpoint(path)
    import json

    with open(os.path.join(step_dir, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    spm = os.path.join(step_dir, "tokenizer", "spm.model")
    if cfg.text.encoder == "sentencepiece" and os.path.isfile(spm):
        cfg.text.path = spm
    state = torch.load(os.path.join(step_dir, "state.pt"), map_location=map_location, weights_only=False)
    return cfg, state, step_dir
