#!/usr/bin/env python
"""Write synthetic captioned clips to disk, plus a metadata.jsonl index.

    python tools/make_synthetic_data.py --out data/synth --split train --num 1000 \
        --frames 8 --height 32 --width 32 --format npy

``--format`` takes one format or a comma-separated list: ``npy``, ``webm`` (VP9: lossless 4:4:4 by
default, ``--vp9-lossy`` for ordinary 4:2:0), ``mp4`` (H.264, 4:2:0, ``--crf``). Video formats also
get a ``<name>.txt`` caption next to each file (``--no-captions`` turns that off); metadata.jsonl
has one line per written file.

Each clip is written under a temporary name and renamed when complete, so an
interrupted run never leaves a half-written clip (or metadata) behind.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_starflow.data.synthetic import make_clip


def write_npy(path: Path, video: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    # Write through a file object so numpy does not append another ".npy".
    with open(tmp, "wb") as f:
        np.save(f, video)
    os.replace(tmp, path)


def write_webm(path: Path, video: np.ndarray, fps: int) -> None:
    import imageio_ffmpeg

    # ffmpeg picks the container from the extension, so the temp name keeps ".webm".
    tmp = path.with_name(f".partial-{path.name}")
    _, height, width, _ = video.shape
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        size=(width, height),
        fps=fps,
        codec="libvpx-vp9",
        quality=None,
        # Lossless VP9 in 4:4:4 so tiny clips keep their sharp single-pixel edges.
        pix_fmt_out="yuv444p",
        output_params=["-lossless", "1"],
        macro_block_size=1,
    )
    writer.send(None)  # prime the generator
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)


def write_mp4(path: Path, video: np.ndarray, fps: int, crf: int = 18) -> None:
    """H.264 (libx264, yuv420p) in an mp4 container; height and width must be even."""
    import imageio_ffmpeg

    _, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise SystemExit(f"mp4 (H.264 4:2:0) needs an even height and width, got {height}x{width}")
    tmp = path.with_name(f".partial-{path.name}")
    writer = imageio_ffmpeg.write_frames(
        str(tmp), size=(width, height), fps=fps, codec="libx264", quality=None,
        pix_fmt_out="yuv420p", output_params=["-crf", str(crf), "-preset", "medium"],
        macro_block_size=1)
    writer.send(None)
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)


def write_webm_lossy(path: Path, video: np.ndarray, fps: int, crf: int = 18) -> None:
    """Ordinary (4:2:0, constant-quality) VP9, as most real data sets store it."""
    import imageio_ffmpeg

    _, height, width, _ = video.shape
    tmp = path.with_name(f".partial-{path.name}")
    writer = imageio_ffmpeg.write_frames(
        str(tmp), size=(width, height), fps=fps, codec="libvpx-vp9", quality=None,
        pix_fmt_out="yuv420p", output_params=["-crf", str(crf), "-b:v", "0"], macro_block_size=1)
    writer.send(None)
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    os.replace(tmp, path)


def write_caption(path: Path, caption: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(caption + "\n", encoding="utf-8")
    os.replace(tmp, path)


FORMATS = ("npy", "webm", "mp4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_starflow.cli import checks

    p = checks.ArgumentParser(prog="tools/make_synthetic_data.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (one that holds metadata.jsonl needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder of an earlier run")
    p.add_argument("--split", default="train", help="seed stream: train | heldout")
    p.add_argument("--num", type=checks.integer(1), required=True, help="number of clips (>= 1)")
    p.add_argument("--start", type=checks.integer(0), default=0, help="index of the first clip (>= 0)")
    p.add_argument("--frames", type=checks.integer(1), default=8, help=">= 1")
    p.add_argument("--height", type=checks.integer(8, 4096), default=32,
                   help="pixels in [8, 4096] (even for mp4 / lossy webm)")
    p.add_argument("--width", type=checks.integer(8, 4096), default=32, help="as --height")
    p.add_argument("--fps", type=checks.integer(1, 240), default=8,
                   help="frame rate stored in video files, in [1, 240]")
    p.add_argument("--format", default="npy",
                   help="npy | webm (VP9) | mp4 (H.264), or a comma-separated list, e.g. webm,mp4")
    p.add_argument("--vp9-lossy", action="store_true", help="webm: 4:2:0 constant-quality VP9 "
                   "instead of lossless 4:4:4")
    p.add_argument("--crf", type=checks.integer(0, 51), default=18,
                   help="quality of mp4 and lossy webm in [0, 51] (lower = better)")
    p.add_argument("--no-captions", dest="captions", action="store_false",
                   help="do not write <name>.txt captions next to video files")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        p.error(f"--format: unknown {bad or args.format!r}; valid: {', '.join(FORMATS)} (comma-separated)")
    chroma_420 = "mp4" in args.formats or ("webm" in args.formats and args.vp9_lossy)
    if chroma_420 and (args.height % 2 or args.width % 2):
        p.error(f"--height {args.height} / --width {args.width}: 4:2:0 video (mp4, lossy webm) "
                f"needs even sizes")
    checks.or_usage_error(p, checks.check_output_folder, "--out", str(args.out), args.overwrite,
                          marker="metadata.jsonl")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(args.start, args.start + args.num), desc=f"{args.split} clips", unit="clip"):
        video, caption, attrs = make_clip(index, args.split, args.frames, args.height, args.width)
        for fmt in args.formats:
            name = f"{args.split}_{index:07d}.{fmt}"
            if fmt == "npy":
                write_npy(out / name, video)
            elif fmt == "webm":
                if args.vp9_lossy:
                    write_webm_lossy(out / name, video, args.fps, args.crf)
                else:
                    write_webm(out / name, video, args.fps)
            else:
                write_mp4(out / name, video, args.fps, args.crf)
            if fmt != "npy" and args.captions:
                write_caption(out / f"{args.split}_{index:07d}.txt", caption)
            records.append(
                {
                    "file": name,
                    "caption": caption,
                    "attributes": attrs,
                    "index": index,
                    "split": args.split,
                    "frames": args.frames,
                    "height": args.height,
                    "width": args.width,
                    "fps": args.fps,
                }
            )
    meta = out / "metadata.jsonl"
    tmp = out / ".metadata.jsonl.partial"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, meta)
    print(f"wrote {len(records)} files ({args.num} clips) and {meta}")


if __name__ == "__main__":
    main()
