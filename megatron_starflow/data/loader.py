"""The training loop's side of ``data.source=shards`` and ``latent_shards``: build the resumable
train iterator and a deterministic held-out data set from the config."""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_starflow.data.bad_data import BadDataLog
from megatron_starflow.data.shards import read_shards
from megatron_starflow.data.video import HeldoutSamples, VideoClipIterator, clip_spec


def build_train_iterator(cfg, run_dir: str, dp_rank: int = 0, dp_size: int = 1,
                         state: dict | None = None, device=None) -> VideoClipIterator:
    """This DP rank's batches of ``data.shards``: decoded clips (``source=shards``) or stored
    latents + text embeddings + the null-caption embedding (``source=latent_shards``, checked
    against the config first). ``device``: the process's compute device (DALI's GPU decoder on
    CUDA)."""
    d = cfg.data
    latent = {}
    if d.source == "latent_shards":
        from megatron_starflow.data.latent_shards import latent_shard_info

        info = latent_shard_info(cfg, d.shards)
        latent = {"mode": "latents", "latent_shape": info.latent_shape, "text_shape": info.text_shape,
                  "constants": {"null_text": info.null_text}}
    records, sizes = read_shards(d.shards)
    log = BadDataLog(d.bad_data_log or os.path.join(run_dir, "bad_data.jsonl"), d.max_bad_fraction)
    it = VideoClipIterator(records, clip_spec(cfg), d.video_backend, seed=cfg.train.seed,
                           dp_rank=dp_rank, dp_size=dp_size, batch_size=d.batch_size, bad_log=log,
                           shard_sizes=sizes, num_workers=d.num_workers, device=device, **latent)
    if state:
        it.load_state_dict(state)
    return it


class ShardClipDataset(HeldoutSamples):
    """Clips of shards for evaluation (first frames, centre crop)."""

    def __init__(self, cfg, shards: str, limit: int):
        records, _ = read_shards(shards)
        super().__init__(VideoClipIterator(records, clip_spec(cfg, train=False), cfg.data.video_backend,
                                           shuffle=False, bad_log=BadDataLog(max_bad_fraction=1.0)),
                         limit)

    def item(self, clip, record, index: int) -> dict:
        return {"video": torch.from_numpy(np.ascontiguousarray(clip)), "caption": record.caption,
                "attrs": dict(record.meta.get("attributes", {})), "index": index}


def shard_captions(shards: str) -> list[str]:
    records, _ = read_shards(shards)
    return [r.caption for r in records if r.caption]
