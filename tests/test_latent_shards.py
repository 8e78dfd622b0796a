"""``data.source=latent_shards``: training from stored Wan latents and T5 embeddings equals training
from the decoded clips through the same VAE and T5, and builds neither.

A tiny random-weight diffusers ``AutoencoderKLWan`` and a tiny random ``T5EncoderModel`` are built
from configs into local folders (no hub). Real VP9 files are packed twice by tools/prepare_data.py:
as video shards (the loop decodes them and runs the VAE and T5, ``data.source=shards``) and as
latent shards (``--latents``: latents, embeddings and the empty caption's embedding stored). Both
runs see the same samples in the same order with the same per-position noise and caption
dropout, so their losses agree to float32 round-off.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from helpers_codecs import make_tiny_wan_vae
from helpers_launch import TINY
from helpers_scripts import load_script
from helpers_text import build_tiny_t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
BATCH, DROPOUT = 4, 0.5


def _seed_with_mixed_dropout() -> int:
    """A run seed whose first step drops some captions and keeps others (both paths are used)."""
    from megatron_starflow.training.sample_noise import sample_generator

    for seed in range(100):
        dropped = [torch.rand(1, generator=sample_generator(seed, p)).item() < DROPOUT
                   for p in range(BATCH)]
        if any(dropped) and not all(dropped):
            return seed
    raise AssertionError("no seed with mixed caption dropout")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_shards")
    vae = make_tiny_wan_vae(root / "vae")
    t5 = str(build_tiny_t5(root / "t5"))
    make = load_script("tools/make_synthetic_data.py")
    prep = load_script("tools/prepare_data.py")
    common = ["--frames", "5", "--height", "16", "--width", "16", "--fps", "8", "--format", "webm"]
    make.main(["--out", str(root / "videos"), "--num", "8", *common])
    make.main(["--out", str(root / "videos_heldout"), "--split", "heldout", "--num", "4", *common])
    overrides = [*TINY, "data.codec=wan", f"data.codec_path={vae}", "text.encoder=t5",
                 f"text.path={t5}", "model.latent_channels=4", "model.patch_size=1",
                 "data.frames=5", "data.height=16", "data.width=16", "model.text_width=32",
                 "model.text_length=8", f"text.caption_dropout={DROPOUT}",
                 f"data.batch_size={BATCH}", "data.clip_start=first", "data.crop=center",
                 "data.video_backend=pyav", "data.later_frames_scale=0.6",
                 "data.num_heldout_clips=4", "train.eval_batches=1", "train.steps=2",
                 "train.eval_every=2", "train.ckpt_every=2", f"train.seed={_seed_with_mixed_dropout()}"]
    paths = {name: str(root / name) for name in ("video", "video_heldout", "latent", "latent_heldout")}
    prep.main(["--input", str(root / "videos"), "--out", paths["video"], "--shard-size", "4"])
    prep.main(["--input", str(root / "videos_heldout"), "--out", paths["video_heldout"]])
    prep.main(["--input", str(root / "videos"), "--out", paths["latent"], "--shard-size", "4",
               "--latents", "--config", CONFIG, *overrides])
    prep.main(["--input", str(root / "videos_heldout"), "--out", paths["latent_heldout"], "--latents",
               "--no-frames", "--config", CONFIG, *overrides])
    return {"root": root, "overrides": overrides, **paths}


def _config(prepared, source: str, *extra: str):
    from megatron_starflow.config import load_config

    train, heldout = ("latent", "latent_heldout") if source == "latent_shards" else ("video", "video_heldout")
    return load_config(CONFIG, [*prepared["overrides"], f"data.source={source}",
                                f"data.shards={prepared[train]}",
                                f"data.heldout_shards={prepared[heldout]}", *extra])


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_prepare_data_stores_latents_embeddings_and_the_null_caption(prepared, megatron_ready):
    from megatron_starflow.data.latent_shards import latent_shard_info
    from megatron_starflow.data.shards import read_shards
    from megatron_starflow.models.system import StarFlowSystem, format_captions

    cfg = _config(prepared, "latent_shards")
    system = StarFlowSystem(cfg, str(prepared["root"]))  # the full system: VAE and T5
    info = latent_shard_info(cfg, prepared["latent"])
    assert torch.equal(info.null_text, system.encode_text([""])[0])
    assert info.latent_shape == (2, 4, 4, 4) and info.text_shape == (8, 32)
    records, sizes = read_shards(prepared["latent"])
    assert sizes == [4, 4] and all(r.kind == "frames" for r in records)
    for r in records[:2]:  # the stored tensors are the VAE's and T5's outputs for the stored clip
        clip = torch.from_numpy(np.load(io.BytesIO(r.read_bytes())))
        latent = np.load(io.BytesIO(r.read_member("latent")))
        text = np.load(io.BytesIO(r.read_member("text")))
        assert np.allclose(latent, system.codec.encode(clip[None])[0].numpy(), atol=1e-6)
        assert np.allclose(text, system.text_encoder(format_captions(cfg, [r.caption]))[0][0].numpy(),
                           atol=1e-6)
    heldout, _ = read_shards(prepared["latent_heldout"])  # --no-frames: latents only
    assert len(heldout) == 4 and all(r.kind == "latent" for r in heldout)
    manifest = json.loads(open(os.path.join(prepared["latent"], "shards.json")).read())
    assert manifest["latents"]["null_caption"] == format_captions(cfg, [""])[0]
    assert not [p for p in os.listdir(prepared["latent"]) if "partial" in p]


def test_latent_shards_train_like_decoded_clips_and_never_build_the_vae_or_t5(prepared, tmp_path,
                                                                              monkeypatch):
    from megatron_starflow.training.trainer import train

    clips_dir = str(tmp_path / "clips")
    clips = train(_config(prepared, "shards"), clips_dir, quiet=True)

    import diffusers
    import transformers

    from megatron_starflow.models import codecs, text

    def refuse(*args, **kwargs):
        raise AssertionError("data.source=latent_shards built a VAE or a text encoder")

    monkeypatch.setattr(codecs.WanVAECodec, "__init__", refuse)
    monkeypatch.setattr(text.T5TextEncoder, "__init__", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKLWan, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    latents_dir = str(tmp_path / "latents")
    latents = train(_config(prepared, "latent_shards"), latents_dir, quiet=True)

    a, b = _losses(clips_dir), _losses(latents_dir)
    assert sorted(a) == sorted(b) == [1, 2]
    print("first-step loss: decoded clips", a[1], "latent shards", b[1], "step 2:", a[2], b[2])
    assert abs(a[1] - b[1]) <= 1e-5 * max(1.0, abs(a[1])), (a, b)  # same inputs, same weights
    assert abs(a[2] - b[2]) <= 1e-4 * max(1.0, abs(a[2])), (a, b)  # after one AdamW step
    for key in ("eval_start", "eval_end"):  # held-out bits/dim from stored latents = through the VAE
        ea, eb = getattr(clips, key), getattr(latents, key)
        assert abs(ea["bits_per_dim"] - eb["bits_per_dim"]) <= 1e-5, (ea, eb)
    assert "denoiser_psnr_gain_db" in clips.eval_end and "denoiser_psnr_gain_db" not in latents.eval_end
    assert "codec" in latents.eval_end["skipped"]


def test_latent_shards_made_for_another_config_are_one_clear_error(prepared):
    from megatron_starflow.config import ConfigError
    from megatron_starflow.data.latent_shards import latent_shard_info

    # the caption template states the noise level: the stored embeddings are for another one
    with pytest.raises(ConfigError, match="text.template / model.noise_std / data.fps"):
        latent_shard_info(_config(prepared, "latent_shards", "text.template=N{noise} {caption}"),
                          prepared["latent"])
    with pytest.raises(ConfigError, match="data.frames/height/width"):
        latent_shard_info(_config(prepared, "latent_shards", "data.height=32"), prepared["latent"])
    with pytest.raises(ConfigError, match="without stored latents"):
        latent_shard_info(_config(prepared, "latent_shards"), prepared["video"])
    from megatron_starflow.config import load_config

    with pytest.raises(ConfigError, match="data.codec=wan and text.encoder=t5"):
        load_config(CONFIG, ["data.source=latent_shards", f"data.shards={prepared['latent']}",
                             f"data.heldout_shards={prepared['latent']}"])
