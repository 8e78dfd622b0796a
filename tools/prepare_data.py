#!/usr/bin/env python
"""Pack captioned videos into webdataset-style tar shards (and optionally pre-decoded / latent shards).

    # a folder of videos (captions from metadata.jsonl or <stem>.txt) -> video shards
    python tools/prepare_data.py --input data/synth --out data/shards --shard-size 64
    # a CSV or JSONL manifest with columns path (or file) and caption
    python tools/prepare_data.py --manifest videos.csv --out data/shards
    # latent shards for a run config: decoded + resized clips (+ codec latents for a lossy codec,
    # + text embeddings and the empty caption's embedding for a frozen text encoder), so training
    # skips decoding (data.source=shards) or the VAE and T5 as well (data.source=latent_shards)
    python tools/prepare_data.py --input data/synth --out data/latents --latents \
        --config examples/configs/tiny_cpu.yaml [--no-frames] [section.key=value ...]

Every file is checked on the way in (PyAV opens it and decodes every frame; with ``--latents`` it is
also clipped): zero-byte, truncated, undecodable, too short and caption-less files are skipped and
listed in ``<out>/bad_data.jsonl`` (too short: fewer than ``--min-frames``). ``--codecs vp9,vp8``
keeps only those codecs.
Shards are written under a temporary name and renamed when complete; ``<out>/shards.json`` lists
them. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    from megatron_starflow.cli import checks

    p = checks.ArgumentParser(prog="tools/prepare_data.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=checks.input_folder,
                     help="folder of videos (+ metadata.jsonl or <stem>.txt captions)")
    src.add_argument("--manifest", type=checks.input_file,
                     help="CSV or JSONL with path/file and caption columns")
    p.add_argument("--out", required=True,
                   help="output folder of shards (one that holds shards.json needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run")
    p.add_argument("--shard-size", type=checks.integer(1), default=256, help="samples per shard (>= 1)")
    p.add_argument("--shard-bytes", type=checks.integer(1), default=1 << 30,
                   help="max bytes per shard (>= 1)")
    p.add_argument("--codecs", default="", help="keep only these codecs, e.g. vp9,vp8 (default: all)")
    p.add_argument("--min-frames", type=checks.integer(0), default=0,
                   help="video shards: skip files with fewer frames (too short for the run's clips)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="video shards: skip the full decode check of every file (faster)")
    p.add_argument("--latents", action="store_true", help="write pre-decoded clips (+ latents) instead")
    p.add_argument("--config", type=checks.input_file,
                   help="--latents: run config (YAML) giving frames, size, codec, text encoder")
    p.add_argument("--backend", default="pyav", choices=("auto", "dali", "pyav"),
                   help="--latents: decoder")
    p.add_argument("--no-frames", dest="frames", action="store_false",
                   help="--latents with a lossy codec: do not store the decoded clips (latent shards "
                        "for data.source=latent_shards only; a 480p 81-frame clip is ~97 MB)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="--latents: where the VAE and the text encoder run (auto = cuda:LOCAL_RANK when "
                        "CUDA is present, else cpu); the stored tensors are float32 either way")
    p.add_argument("overrides", nargs="*", help="--latents: section.key=value config overrides")
    args = p.parse_args(argv)
    if args.latents and not args.config:
        p.error("--latents needs --config (the run's frames, size and codec)")
    checks.or_usage_error(p, checks.check_output_folder, "--out", args.out, args.overwrite,
                          marker="shards.json")
    return args


def _records(args):
    from megatron_starflow.data.video import records_from_folder, records_from_manifest

    if args.input:
        if not os.path.isdir(args.input):
            raise SystemExit(f"error: --input {args.input!r} is not a folder")
        return records_from_folder(args.input)
    if not os.path.isfile(args.manifest):
        raise SystemExit(f"error: --manifest {args.manifest!r} does not exist")
    return records_from_manifest(args.manifest)


def _unique_keys(records) -> list[str]:
    keys, seen = [], set()
    for r in records:
        key = r.key.replace(".", "_")
        if key in seen:
            key = f"{key}_{os.path.splitext(r.path)[1].lstrip('.').lower()}"
        n = 1
        base = key
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def pack_videos(records, out: str, shard_size: int, shard_bytes: int, check: bool, codecs: set,
                log, min_frames: int = 0) -> dict:
    """Copy the encoded files into shards, with caption and stream facts; skip bad files."""
    from megatron_starflow.data.bad_data import (MISSING, NO_CAPTION, TOO_SHORT, UNDECODABLE, ZERO_BYTE,
                                                 BadSample)
    from megatron_starflow.data.shards import ShardWriter
    from megatron_starflow.data.video import probe

    with ShardWriter(out, shard_size, shard_bytes) as writer:
        for record, key in zip(records, _unique_keys(records)):
            try:
                if not record.caption or not record.caption.strip():
                    raise BadSample(NO_CAPTION, "no caption")
                if record.kind == "missing":
                    raise BadSample(MISSING, "file does not exist")
                data = record.read_bytes()
                if not data:
                    raise BadSample(ZERO_BYTE, "zero-byte file")
                info = probe(data, count_frames=check)
                if min_frames and info.frames and info.frames < min_frames:
                    raise BadSample(TOO_SHORT, f"{info.frames} frames, --min-frames {min_frames}")
                if codecs and info.codec not in codecs:
                    raise BadSample(UNDECODABLE, f"codec {info.codec} not in --codecs")
            except BadSample as bad:
                log.skip(record.path, bad.kind, str(bad))
                continue
            log.ok()
            ext = os.path.splitext(record.path)[1].lstrip(".").lower() or "video"
            meta = {**info.to_dict(), "source": record.path, "frames_counted": check}
            writer.write(key, {ext: data, "txt": record.caption.strip().encode("utf-8"),
                               "json": json.dumps(meta).encode("utf-8")})
        shards = writer.close({"kind": "video"})
    return {"shards": len(shards), "samples": sum(s["samples"] for s in shards)}


def pack_latents(records, out: str, shard_size: int, shard_bytes: int, cfg, backend: str, log,
                 frames: bool = True, device: str = "cpu") -> dict:
    """Decode each clip once (deterministic: first frames, centre crop) at the config's size and
    store it (unless ``frames`` is False) + the codec's normalised latent for a lossy codec + the
    text embedding of the formatted caption for a frozen text encoder; once per shard set, the
    embedding of the empty caption (``null_text.npy``: what caption dropout trains on) and, in
    shards.json, what they were made with (checked by data.source=latent_shards)."""
    import torch

    from megatron_starflow.data.latent_shards import NULL_TEXT, latent_facts
    from megatron_starflow.data.shards import ShardWriter, npy_bytes, write_npy
    from megatron_starflow.data.video import BadSample, VideoClipIterator, clip_spec
    from megatron_starflow.models.system import format_captions

    from megatron_starflow.parallel.device import select_device

    if not frames and cfg.data.codec == "s2d":
        raise SystemExit("error: --no-frames needs a lossy codec (data.codec=wan): the s2d codec "
                         "trains from the stored frames")
    dev = select_device(device)  # the encoders run there; DALI (--backend dali/auto) follows it
    spec = clip_spec(cfg, train=False)
    it = VideoClipIterator(records, spec, backend, shuffle=False, bad_log=log, batch_size=8, device=dev)
    codec = text_encoder = null_text = None
    if cfg.data.codec != "s2d":
        from megatron_starflow.models.system import make_codec

        codec = make_codec(cfg).eval().to(dev)
    if cfg.text.encoder != "sentencepiece":
        from megatron_starflow.models.system import make_text_encoder

        text_encoder = make_text_encoder(cfg, out).eval().to(dev)
        with torch.no_grad():
            null_text = text_encoder(format_captions(cfg, [""]))[0][0].float().cpu().numpy()
        write_npy(os.path.join(out, NULL_TEXT), null_text)
    keys = _unique_keys(records)
    latent_shape = None
    with ShardWriter(out, shard_size, shard_bytes) as writer:
        for lo in range(0, len(records), 8):
            for position, record, clip in it.decode([(i, i) for i in range(lo, min(lo + 8, len(records)))]):
                if isinstance(clip, BadSample):
                    log.skip(record.where, clip.kind, str(clip))
                    continue
                log.ok()
                members = {"txt": record.caption.strip().encode("utf-8"),
                           "json": json.dumps({**record.meta, "source": record.path,
                                               "clip": [spec.frames, spec.height, spec.width]}).encode()}
                if frames:
                    members["frames.npy"] = npy_bytes(clip)
                with torch.no_grad():
                    if codec is not None:
                        latent = codec.encode(torch.from_numpy(clip)[None])[0].float().cpu().numpy()
                        latent_shape = latent.shape
                        members["latent.npy"] = npy_bytes(latent)
                    if text_encoder is not None:
                        text = format_captions(cfg, [record.caption])
                        members["text.npy"] = npy_bytes(text_encoder(text)[0][0].float().cpu().numpy())
                writer.write(keys[position], members)
        extra = {"kind": "latent", "codec": cfg.data.codec, "clip": [spec.frames, spec.height, spec.width]}
        if codec is not None or text_encoder is not None:
            extra["latents"] = latent_facts(cfg, latent_shape,
                                            None if null_text is None else null_text.shape, frames)
        shards = writer.close(extra)
    return {"shards": len(shards), "samples": sum(s["samples"] for s in shards)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_starflow.data.bad_data import BadDataLog

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "bad_data.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    log = BadDataLog(log_path, max_bad_fraction=1.0)
    records = _records(args)
    if not records:
        raise SystemExit("error: no videos found")
    if args.latents:
        if not args.config:
            raise SystemExit("error: --latents needs --config (the run's frames, size and codec)")
        from megatron_starflow.config import load_config

        cfg = load_config(args.config, args.overrides)
        result = pack_latents(records, args.out, args.shard_size, args.shard_bytes, cfg, args.backend, log,
                              args.frames, args.device)
    else:
        codecs = {c.strip() for c in args.codecs.split(",") if c.strip()}
        result = pack_videos(records, args.out, args.shard_size, args.shard_bytes, args.check, codecs, log,
                             args.min_frames)
    print(json.dumps({"out": args.out, **result, "bad": log.summary(),
                      "bad_log": log_path if log.bad else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
