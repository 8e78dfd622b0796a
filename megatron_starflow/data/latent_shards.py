"""``data.source=latent_shards``: train and evaluate from precomputed codec latents and text
embeddings (``tools/prepare_data.py --latents``), never building the VAE or the text encoder.

A latent shard set states in its ``shards.json`` (key ``"latents"``) what its latents and
embeddings were made with: the codec, the latent and embedding shapes, and the empty caption as
the text encoder saw it (template, noise level, fps filled in). ``null_text.npy`` beside it is the
encoder output of that empty caption: caption dropout trains on it, exactly as on the encoder's
output for ``""`` when the text is encoded in the loop. :func:`latent_shard_info` checks all of it
against the run's config before any step, with one error naming the key and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron_starflow.config import Config, ConfigError
from megatron_starflow.data.bad_data import BadDataLog
from megatron_starflow.data.shards import read_manifests, read_shards
from megatron_starflow.data.video import HeldoutSamples, VideoClipIterator, clip_spec

NULL_TEXT = "null_text.npy"


def null_caption(cfg: Config) -> str:
    """The empty caption as the text encoder reads it (template, noise level, fps filled in)."""
    from megatron_starflow.models.system import format_captions

    return format_captions(cfg, [""])[0]


def latent_facts(cfg: Config, latent_shape, text_shape, frames_stored: bool) -> dict:
    """What ``prepare_data.py --latents`` records about a latent shard set (``shards.json``)."""
    return {"codec": cfg.data.codec, "codec_path": cfg.data.codec_path,
            "later_frames_scale": "not applied (the loop applies data.later_frames_scale)",
            "latent_shape": None if latent_shape is None else [int(x) for x in latent_shape],
            "text_encoder": cfg.text.encoder, "text_path": cfg.text.path,
            "text_shape": None if text_shape is None else [int(x) for x in text_shape],
            "null_caption": null_caption(cfg), "null_text": NULL_TEXT,
            "frames_stored": bool(frames_stored)}


@dataclass
class LatentShardInfo:
    latent_shape: tuple
    text_shape: tuple
    null_text: torch.Tensor  # [L, width] float32: the encoder output of the empty caption


def _remake(cfg: Config, spec: str) -> str:
    return (f"make them for this config with `python tools/prepare_data.py --input VIDEOS --out "
            f"{spec} --latents --config CONFIG` (the run's config and overrides)")


def latent_shard_info(cfg: Config, spec: str, key: str = "data.shards") -> LatentShardInfo:
    """Check the latent shards ``spec`` against ``cfg`` and load their null-caption embedding."""
    d, m = cfg.data, cfg.model
    info: LatentShardInfo | None = None
    for folder, manifest in read_manifests(spec):
        facts = manifest.get("latents")
        if (manifest.get("kind") != "latent" or not facts or facts.get("latent_shape") is None
                or facts.get("text_shape") is None):
            raise ConfigError(f"{key}={spec!r}: {folder} holds {manifest.get('kind', 'unknown')} shards "
                              f"without stored latents and text embeddings; data.source=latent_shards "
                              f"reads shards of tools/prepare_data.py --latents: {_remake(cfg, spec)}")
        clip = [d.frames, d.height, d.width]
        checks = [
            ("data.codec", facts["codec"], d.codec),
            ("data.frames/height/width", manifest.get("clip"), clip),
            ("model.latent_channels", facts["latent_shape"][-1], m.latent_channels),
            ("model.text_length", facts["text_shape"][0], m.text_length),
            ("model.text_width", facts["text_shape"][1], m.text_width),
            ("text.template / model.noise_std / data.fps (the formatted empty caption)",
             facts["null_caption"], null_caption(cfg)),
        ]
        for name, stored, wanted in checks:
            if stored != wanted:
                raise ConfigError(f"{key}={spec!r}: the latent shards in {folder} were made with "
                                  f"{name} = {stored!r}, this run has {wanted!r}; set {name} to "
                                  f"match or {_remake(cfg, spec)}")
        path = os.path.join(folder, facts.get("null_text", NULL_TEXT))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: latent shards store the empty caption's "
                                    f"embedding once per shard set; {_remake(cfg, spec)}")
        null = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if tuple(null.shape) != tuple(facts["text_shape"]):
            raise ValueError(f"{path} has shape {tuple(null.shape)}, shards.json says "
                             f"{facts['text_shape']}; {_remake(cfg, spec)}")
        here = LatentShardInfo(tuple(facts["latent_shape"]), tuple(facts["text_shape"]), null)
        if info is None:
            info = here
        elif (info.latent_shape != here.latent_shape
              or not torch.equal(info.null_text, here.null_text)):
            raise ConfigError(f"{key}={spec!r}: the shard folders were made with different codecs "
                              f"or text encoders ({folder} differs from the first); train from one "
                              f"shard set, or remake them with the same --config")
    return info


class LatentShardDataset(HeldoutSamples):
    """Samples of latent shards for evaluation (shard order): ``latent`` ``[T', H', W', C]``,
    ``text`` ``[L, width]``, ``caption``."""

    def __init__(self, cfg: Config, shards: str, limit: int):
        self.info = latent_shard_info(cfg, shards, key="data.heldout_shards")
        records, _ = read_shards(shards)
        super().__init__(VideoClipIterator(records, clip_spec(cfg, train=False), shuffle=False,
                                           bad_log=BadDataLog(max_bad_fraction=1.0), mode="latents",
                                           latent_shape=self.info.latent_shape,
                                           text_shape=self.info.text_shape), limit)

    def item(self, result, record, index: int) -> dict:
        return {"latent": torch.from_numpy(result["latent"]).float(),
                "text": torch.from_numpy(result["text"]).float(), "caption": record.caption,
                "attrs": dict(record.meta.get("attributes", {})), "index": index}
