"""The training and held-out data sets of a config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_starflow.config import Config


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    heldout: torch.utils.data.Dataset


def make_datasets(cfg: Config) -> Datasets:
    """Synthetic captioned clips for both splits; with ``data.source=shards`` and
    ``data.heldout_shards`` the held-out set is read from the shards, with ``source=latent_shards``
    it is the stored latents and text embeddings of ``data.heldout_shards``. Both shard sources
    train from ``megatron_starflow.data.loader.build_train_iterator``, not from ``train``."""
    from megatron_starflow.data.synthetic import SyntheticCaptionedVideos

    d = cfg.data
    heldout = SyntheticCaptionedVideos("heldout", d.num_heldout_clips, d.frames, d.height, d.width,
                                       object_scale=d.object_scale)
    if d.source == "shards" and d.heldout_shards:
        from megatron_starflow.data.loader import ShardClipDataset

        heldout = ShardClipDataset(cfg, d.heldout_shards, d.num_heldout_clips)
    if d.source == "latent_shards":
        from megatron_starflow.data.latent_shards import LatentShardDataset

        heldout = LatentShardDataset(cfg, d.heldout_shards, d.num_heldout_clips)
    return Datasets(
        SyntheticCaptionedVideos("train", d.num_train_clips, d.frames, d.height, d.width,
                                 object_scale=d.object_scale),
        heldout,
    )
