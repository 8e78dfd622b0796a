#!/usr/bin/env python
"""Data throughput per rank against what a 7B training step consumes; prints one JSON object.

    python benchmarks/data_throughput.py [--device auto|cpu|cuda] [--workers 0 2] [--mfu 0.4]
                                         [--clips 16] [--frames 17] [--height 128] [--width 224]
    python benchmarks/data_throughput.py --gpu-check      # DALI's GPU decoder: timed + vs PyAV

Every path is timed the way the training loop reads it (``data/video.py``'s ``VideoClipIterator``
with its fixed batch, one rank, ``--workers`` decode processes each):

* ``dali_vp9`` / ``dali_h264``: DALI's decoder on VP9 / H.264 shards — the CPU decoder on a CPU
  device (VP9 only: the pip wheel's CPU decoder has no H.264), the GPU decoder (``device="mixed"``,
  NVDEC) when ``--device`` is CUDA;
* ``pyav_vp9`` / ``pyav_h264``: PyAV (FFmpeg) on the same shards;
* ``decoded_clip_shards``: pre-decoded clips (``frames.npy`` of ``prepare_data.py --latents``,
  ``data.source=shards``);
* ``latent_shards_7b``: stored latents and text embeddings at the 7B shapes (Wan2.2 latent
  21 x 30 x 52 x 48 and T5 256 x 2048, float32; ``data.source=latent_shards``) — random values, a
  reader does not look at them.

Files are synthetic 4:2:0 VP9 (.webm) and H.264 (.mp4) clips of ``--file-frames`` frames at
``--height x --width``; a clip is ``--frames`` frames at that size (no resize). Decoding cost grows
with the decoded pixels, so the decoding paths also report ``clips_per_s_at_7b_clip``: the measured
pixel rate divided by one 7B clip (81 x 480 x 832) — an extrapolation, stated as such; the latent
path is measured at the 7B size itself.

The requirement (``requirement_7b``): the 7B preset's model FLOPs per clip (forward + backward,
``training/flops.py``) at the memory table's recommended layout for ``--gpus`` GPUs of ``--gpu-gb``
(``parallel/memory.py``), at ``--mfu`` of ``--peak-tflops`` per GPU: clips/s per GPU = MFU * peak /
FLOPs per clip. Every rank of a model-parallel group reads its replica's batch, so one rank's
loader must deliver tp * pp * cp times that. ``keeps_up``: whether each path's best measured (or
extrapolated) rate per rank reaches it. Rows of the GPU decoder without CUDA are "not measured".

``gpu_check()`` is what a GPU check script calls: the GPU paths timed, plus H.264 and VP9 decoded
by DALI's GPU decoder against PyAV (mean absolute difference in 8-bit levels).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parent.parent
H100_BF16_DENSE_TFLOPS = 989.0
CLIP_7B = (81, 480, 832)
LATENT_7B = (21, 30, 52, 48)
TEXT_7B = (256, 2048)


def _script(relative: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("starflow_" + Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ what 7B consumes
def requirement_7b(mfu: float = 0.4, peak_tflops: float = H100_BF16_DENSE_TFLOPS, gpus: int = 96,
                   gpu_gb: float = 80.0, reserve: float = 0.10) -> dict:
    from megatron_starflow.config import load_config
    from megatron_starflow.parallel import memory
    from megatron_starflow.training.flops import model_flops

    cfg = load_config(str(REPO / "examples/configs/starflow_v_7b_480p.yaml"), [])
    inventory = memory.param_inventory(cfg)
    results = [memory.estimate(cfg, lay, inventory) for lay in memory.candidate_layouts(cfg, gpus)]
    best = memory.recommend(results, gpu_gb * 1e9 * (1 - reserve))
    if best is None:
        raise ValueError(f"no layout of the 7B preset fits {gpus} x {gpu_gb} GB")
    layout = best["layout"]
    flops = model_flops(cfg, batch=1)
    per_gpu = mfu * peak_tflops * 1e12 / flops.model_flops_per_step
    ranks = layout["tp"] * layout["pp"] * cfg.parallel.cp
    return {"preset": "7b", "clip": list(CLIP_7B), "latent_grid": list(flops.grid),
            "gpus": gpus, "gpu_gb": gpu_gb, "layout": layout,
            "model_flops_per_clip": flops.model_flops_per_step, "mfu": mfu,
            "peak_tflops_per_gpu": peak_tflops, "clips_per_s_per_gpu": per_gpu,
            "ranks_reading_one_replica_batch": ranks, "clips_per_s_per_rank": per_gpu * ranks,
            "assumptions": [
                f"MFU {mfu:.0%} of {peak_tflops:g} dense bf16 TFLOP/s per GPU (H100 SXM)",
                "model FLOPs: matmuls of flow + denoiser forward and backward (3 x forward), "
                "recompute excluded (MFU convention); the frozen T5 and the VAE are not counted",
                f"layout: parallel/memory.py recommend() over {gpus} GPUs of {gpu_gb:g} GB "
                f"({100 * reserve:.0f}% reserve)",
                "every tp/pp/cp rank of a replica reads the replica's batch itself"]}


# ------------------------------------------------------------------------------ inputs
def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def make_inputs(root: str, clips: int, file_frames: int, frames: int, height: int, width: int,
                latent_samples: int) -> dict:
    """Synthetic VP9 and H.264 files packed into video shards, pre-decoded clip shards, and latent
    shards at the 7B shapes (random values), under ``root``."""
    import numpy as np

    from megatron_starflow.data.latent_shards import NULL_TEXT
    from megatron_starflow.data.shards import ShardWriter, npy_bytes, write_npy

    make, prep = _script("tools/make_synthetic_data.py"), _script("tools/prepare_data.py")
    out = {k: os.path.join(root, k) for k in ("videos", "vp9", "h264", "decoded", "latent_7b")}
    size = ["--height", str(height), "--width", str(width)]
    _quiet(make.main, ["--out", out["videos"], "--num", str(clips), "--frames", str(file_frames), *size,
                       "--fps", "16", "--format", "webm,mp4", "--vp9-lossy", "--overwrite"])
    for codec, ext in (("vp9", "webm"), ("h264", "mp4")):
        manifest = os.path.join(root, f"{codec}.jsonl")
        with open(os.path.join(out["videos"], "metadata.jsonl")) as src, open(manifest, "w") as dst:
            for line in src:
                row = json.loads(line)
                if row["file"].endswith(ext):
                    dst.write(json.dumps({**row, "path": os.path.join(out["videos"], row["file"])}) + "\n")
        _quiet(prep.main, ["--manifest", manifest, "--out", out[codec], "--shard-size", "16", "--overwrite"])
    _quiet(prep.main, ["--manifest", os.path.join(root, "vp9.jsonl"), "--out", out["decoded"], "--latents",
                       "--shard-size", "16", "--overwrite",
                       "--config", str(REPO / "examples/configs/tiny_cpu.yaml"),
                       f"data.frames={frames}", f"data.height={height}", f"data.width={width}"])
    rng = np.random.default_rng(0)
    latent = rng.standard_normal(LATENT_7B, dtype=np.float32)
    text = rng.standard_normal(TEXT_7B, dtype=np.float32)
    with ShardWriter(out["latent_7b"], max_count=8) as writer:
        for i in range(latent_samples):
            writer.write(f"s{i:05d}", {"txt": b"a caption", "json": b"{}",
                                       "latent.npy": npy_bytes(latent + i), "text.npy": npy_bytes(text)})
    write_npy(os.path.join(out["latent_7b"], NULL_TEXT), np.zeros(TEXT_7B, np.float32))
    return out


# ------------------------------------------------------------------------------ timing
def time_path(shards: str, spec, backend: str, device, workers: int, batch: int, clips: int,
              mode: str = "clips", shapes: tuple | None = None) -> dict:
    """Clips/s of this rank's ``next_batch`` over ``clips`` clips, after one warm-up batch
    (pipeline build, worker start)."""
    from megatron_starflow.data.bad_data import BadDataLog
    from megatron_starflow.data.shards import read_shards
    from megatron_starflow.data.video import VideoClipIterator

    records, sizes = read_shards(shards)
    extra = {"mode": mode} if mode == "clips" else {"mode": mode, "latent_shape": shapes[0],
                                                     "text_shape": shapes[1]}
    it = VideoClipIterator(records, spec, backend, seed=0, batch_size=batch, shard_sizes=sizes,
                           num_workers=workers, device=device, bad_log=BadDataLog(max_bad_fraction=0.5),
                           **extra)
    try:
        it.next_batch()
        steps = max(1, clips // batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            it.next_batch()
        seconds = time.perf_counter() - t0
    finally:
        it.close()
    n = steps * batch
    return {"clips_per_s": n / seconds, "clips": n, "seconds": seconds, "bad": it.bad.bad,
            "decoded_by": {k: v for k, v in it.decoded_by.items() if v}}


def run(device: str = "auto", workers=(0, 2), clips: int = 16, file_frames: int = 17, frames: int = 17,
        height: int = 128, width: int = 224, batch: int = 4, latent_samples: int = 16,
        mfu: float = 0.4, peak_tflops: float = H100_BF16_DENSE_TFLOPS, gpus: int = 96,
        gpu_gb: float = 80.0, threads: int = 1, workdir: str = "", timed_clips: int = 32) -> dict:
    import torch

    from megatron_starflow.data.video import ClipSpec, dali_available, dali_device_for
    from megatron_starflow.parallel.device import select_device

    torch.set_num_threads(threads)
    dev = select_device(device)  # the one device decision; the DALI decoder follows it
    dali_kind = "gpu" if dali_device_for(dev)[0] == "mixed" else "cpu"
    root = workdir or tempfile.mkdtemp(prefix="bench_data_")
    inputs = make_inputs(root, clips, file_frames, frames, height, width, latent_samples)
    spec = ClipSpec(frames, height, width, start="random")
    pixels = frames * height * width
    paths = {"pyav_vp9": (inputs["vp9"], "pyav", "clips"), "pyav_h264": (inputs["h264"], "pyav", "clips"),
             "dali_vp9": (inputs["vp9"], "dali", "clips"),
             "decoded_clip_shards": (inputs["decoded"], "auto", "clips"),
             "latent_shards_7b": (inputs["latent_7b"], "auto", "latents")}
    if dali_kind == "gpu":
        paths["dali_h264"] = (inputs["h264"], "dali", "clips")
    not_measured = {}
    if not dali_available():
        paths.pop("dali_vp9")
        not_measured["dali_vp9"] = "nvidia-dali is not installed"
    if dali_kind == "cpu":
        not_measured["dali_gpu_vp9"] = not_measured["dali_gpu_h264"] = (
            "not measured: no CUDA device here (DALI's GPU decoder, device='mixed')")
        not_measured["dali_h264"] = "DALI's CPU decoder (pip wheel) has no H.264: PyAV decodes it"
    results = {}
    for name, (shards, backend, mode) in paths.items():
        label = name.replace("dali_", f"dali_{dali_kind}_") if name.startswith("dali_") else name
        rows = {}
        for w in workers:
            row = time_path(shards, spec, backend, dev, w, batch, timed_clips, mode, (LATENT_7B, TEXT_7B))
            if mode == "clips":
                row["decoded_pixels_per_s"] = row["clips_per_s"] * pixels
                row["clips_per_s_at_7b_clip"] = row["decoded_pixels_per_s"] / (
                    CLIP_7B[0] * CLIP_7B[1] * CLIP_7B[2])
            else:
                row["clips_per_s_at_7b_clip"] = row["clips_per_s"]
                row["bytes_per_clip"] = 4 * (int(torch.Size(LATENT_7B).numel()) + TEXT_7B[0] * TEXT_7B[1])
            rows[str(w)] = row
        results[label] = {"workers": rows}
    need = requirement_7b(mfu, peak_tflops, gpus, gpu_gb)
    keeps_up = {}
    for name, res in results.items():
        best = max(r["clips_per_s_at_7b_clip"] for r in res["workers"].values())
        res["best_clips_per_s_at_7b_clip"] = best
        keeps_up[name] = {"clips_per_s_at_7b_clip": best, "needed_per_rank": need["clips_per_s_per_rank"],
                          "headroom": best / need["clips_per_s_per_rank"],
                          "keeps_up": best >= need["clips_per_s_per_rank"]}
    return {"benchmark": "data_throughput", "device": str(dev), "dali_decoder": dali_kind,
            "per_rank": "one process, as one training rank reads its batches",
            "cpu_count": os.cpu_count(), "torch_threads": threads, "batch": batch,
            "file": f"{file_frames} frames {height}x{width}, 16 fps, VP9 4:2:0 (.webm) and H.264 (.mp4)",
            "clip": [frames, height, width],
            "extrapolation": f"decoding paths: clips/s at a 7B clip = measured decoded pixels/s / "
                             f"({CLIP_7B[0]}*{CLIP_7B[1]}*{CLIP_7B[2]}) (linear in pixels; not measured "
                             f"at 480p); latent_shards_7b is measured at the 7B shapes",
            "paths": results, "not_measured": not_measured, "requirement_7b": need,
            "keeps_up": keeps_up, "workdir": root}


def gpu_check(clips: int = 16) -> dict:
    """For a GPU check script: DALI's GPU decoder timed and checked against PyAV on H.264 and VP9;
    ``{"status": "not measured", ...}`` without CUDA."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        return {"status": "not measured", "reason": "no CUDA device"}
    from megatron_starflow.data.bad_data import BadDataLog
    from megatron_starflow.data.shards import read_shards
    from megatron_starflow.data.video import ClipSpec, VideoClipIterator

    result = run(device="cuda", workers=(0,), clips=clips, timed_clips=4 * clips)
    spec = ClipSpec(17, 128, 224, start="first")
    agree = {}
    for codec in ("h264", "vp9"):
        records, _ = read_shards(os.path.join(result["workdir"], codec))
        out = {}
        for backend, device in (("dali", torch.device("cuda")), ("pyav", torch.device("cpu"))):
            it = VideoClipIterator(records[:4], spec, backend, shuffle=False, batch_size=4, device=device,
                                   bad_log=BadDataLog(max_bad_fraction=1.0))
            out[backend] = it.next_batch()["video"].numpy().astype(np.int16)
        diff = np.abs(out["dali"] - out["pyav"])
        agree[codec] = {"mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
                        "ok": bool(diff.mean() < 2.0)}
    result["dali_gpu_vs_pyav"] = agree
    result["status"] = "ok" if all(a["ok"] for a in agree.values()) else "mismatch"
    return result


def main(argv=None) -> int:
    from megatron_starflow.cli import checks

    count, positive = checks.integer(1), checks.real(0.0, lo_open=True)
    p = checks.ArgumentParser(prog="benchmarks/data_throughput.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the process's device (DALI's decoder follows it)")
    p.add_argument("--workers", type=checks.integer(0, 64), nargs="+", default=[0, 2],
                   help="decode worker processes, one row each (0 = in the loop)")
    p.add_argument("--clips", type=count, default=16, help="synthetic files per codec")
    p.add_argument("--timed-clips", type=count, default=32, help="clips timed per path and worker count")
    p.add_argument("--file-frames", type=count, default=17)
    p.add_argument("--frames", type=count, default=17, help="frames per clip (<= --file-frames)")
    p.add_argument("--height", type=checks.integer(8, 4096), default=128, help="even")
    p.add_argument("--width", type=checks.integer(8, 4096), default=224, help="even")
    p.add_argument("--batch", type=count, default=4)
    p.add_argument("--latent-samples", type=count, default=16, help="latent shard samples at 7B shapes")
    p.add_argument("--mfu", type=checks.real(0.0, 1.0, lo_open=True), default=0.4)
    p.add_argument("--peak-tflops", type=positive, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--gpus", type=count, default=96)
    p.add_argument("--gpu-gb", type=positive, default=80.0)
    p.add_argument("--threads", type=count, default=1, help="torch CPU threads of the loop process")
    p.add_argument("--gpu-check", action="store_true", help="run gpu_check() (CUDA) instead")
    p.add_argument("--workdir", default="", help="where files and shards go (default: a temp dir)")
    args, code = checks.parse(p, argv)
    if args is None:
        return code
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % 2:
            p.error(f"{flag} {value}: 4:2:0 video needs an even size")
    if args.file_frames < args.frames:
        p.error(f"--file-frames {args.file_frames} is fewer than --frames {args.frames}: a clip must "
                f"fit in a file")
    if args.gpu_check:
        print(json.dumps(gpu_check(), indent=1))
        return 0
    result = run(args.device, tuple(args.workers), args.clips, args.file_frames, args.frames, args.height,
                 args.width, args.batch, args.latent_samples, args.mfu, args.peak_tflops, args.gpus,
                 args.gpu_gb, args.threads, args.workdir, args.timed_clips)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
