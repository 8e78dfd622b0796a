"""The loop's checkpoints: what goes in, and resuming from the newest intact one.

Every rank writes its own shards (``training/sharded_checkpoint.py``: torch.distributed.checkpoint
files, per-rank extras, a manifest of sizes and hashes): the model weights in their training
dtype and layout (TP-sharded as DTensors, each pipeline stage its own blocks), the fp32 master
weights and AdamW moments in rows split over the data x context parallel ranks, each rank's random
streams, and in meta.json the step, the skip guard, the data position and the layout. No rank
gathers the full model or optimizer state. Loading into the current layout's DTensors reshards
(TP, PP, DP and CP sizes may all change); the random streams are restored exactly when the layout
is the same (the noise of every sample follows from its data position, for any layout).
"""

from __future__ import annotations

import json
import os
import warnings

from megatron_starflow.config import Config
from megatron_starflow.training import sharded_checkpoint as store
from megatron_starflow.training.layout import ProcessLayout

FORMAT = "megatron_starflow/dcp-v1"


class CheckpointManager:
    def __init__(self, cfg: Config, run_dir: str, layout: ProcessLayout, system, named_groups,
                 optimizer, state, tokenizer: str | None, hooks, ema=None):
        self.cfg, self.run_dir, self.layout = cfg, run_dir, layout
        self.system, self.named_groups, self.optimizer = system, named_groups, optimizer
        self.ema = ema
        self.state, self.tokenizer, self.hooks = state, tokenizer, hooks
        self.last_saved: tuple[int, str] | None = None

    # ------------------------------------------------------------------------------ contents
    def _tensors(self) -> dict:
        named = [(fqn, p) for g in self.named_groups for fqn, p in g["params"]]
        tensors = self.optimizer.model_sharded_state_dict(named, prefix="model.")
        tensors.update(self.optimizer.sharded_state_dict())
        if self.ema is not None:
            tensors.update(self.ema.sharded_state_dict())
        return tensors

    # ------------------------------------------------------------------------------ save
    def save(self, step: int) -> str:
        if self.last_saved and self.last_saved[0] == step:
            return self.last_saved[1]
        meta = {"format": FORMAT, **self.state.global_state()}
        files = {"tokenizer/spm.model": self.tokenizer} if self.tokenizer else {}
        path = store.save(self.run_dir, step, self._tensors(), self.state.rank_state(), meta,
                          self.cfg.to_dict(), keep=self.cfg.train.keep_checkpoints, files=files,
                          before_rename=lambda tmp: self.hooks.during_save(step, tmp))
        self.last_saved = (step, path)
        return path

    def latest(self) -> str | None:
        path, _ = store.find_resumable(self.run_dir)
        return path

    # ------------------------------------------------------------------------------ resume
    def resume(self) -> str | None:
        path, notes = store.find_resumable(self.run_dir)
        if self.layout.rank == 0:
            for note in notes:
                warnings.warn(note, stacklevel=2)
        if path is None:
            return None
        meta = store.read_meta(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads "
                             f"{FORMAT!r}")
        template = self._tensors()
        ema_keys = {k for k in template if k.startswith("ema.")}
        loaded = store.load(path, {k: v for k, v in template.items() if k not in ema_keys})
        self.optimizer.load_sharded_state_dict(loaded)
        self.optimizer.load_model_sharded_state_dict(loaded, prefix="model.")
        if self.ema is not None:  # a run may switch the EMA on later: it then starts from here
            ema = store.load(path, {k: template[k] for k in ema_keys}, strict=False)
            self.ema.load_sharded_state_dict(ema)
        same = meta.get("parallel") == self.layout.describe()
        self.state.load(meta, store.load_extras(path, self.layout.rank) if same else None)
        self.last_saved = (self.state.step, path)
        return path

    def write_diverged_note(self, guard, step: int, before: str) -> None:
        if self.layout.rank != 0:
            return
        note = {"consecutive_skips": guard.streak, "first_skipped_step": guard.streak_start + 1,
                "last_skipped_step": step + 1, "checkpoint_before": before}
        root = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".DIVERGED.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(note, f, indent=2)
        os.replace(tmp, os.path.join(root, "DIVERGED.json"))
