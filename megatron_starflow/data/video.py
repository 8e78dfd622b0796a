"""Captioned video clips from real container files: PyAV and NVIDIA DALI back ends behind one iterator.

``VideoClipIterator`` walks a list of :class:`VideoRecord` (loose files, files inside tar shards, or
pre-decoded clips of a latent shard) in the resumable global order of
:class:`~megatron_starflow.data.sampler.GlobalOrderSampler` and yields ``(clip, caption)`` with
``clip`` uint8 ``[T, H, W, 3]``, or whole batches via :meth:`VideoClipIterator.next_batch`.

Per sample:
  1. caption check (empty / missing -> skipped as ``no_caption``), zero-byte check;
  2. frame indices: ``T`` frames, ``stride`` apart at ``sample_fps`` (0 = the file's own rate, else
     source frames are resampled to that rate: nearest frame of each target time), starting at a
     random (seeded per global position) or the first frame; a file shorter than the span is
     ``too_short``;
  3. decode just those frames with the chosen back end:
       * ``pyav``: FFmpeg through PyAV, reads every codec;
       * ``dali``: ``nvidia.dali.fn.decoders.video`` with per-sample ``frames=`` indices. On CPU it
         decodes VP8, VP9 and MJPEG only (H.264/HEVC need the GPU decoder: ``device="mixed"``);
       * ``auto``: DALI for the records whose codec DALI can decode on this device, PyAV for the
         rest (and PyAV again if DALI fails on a file, before calling it bad);
  4. resize (bilinear, antialiased, shorter side to cover the target) and centre / random crop to
     ``height x width``. Steps 2 and 4 are shared by both back ends, so they differ only in decoding.

A sample that fails any step is skipped and recorded in a :class:`BadDataLog` with its path; the
iterator raises :class:`BadDataError` once the bad fraction passes the limit.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from megatron_starflow.data.bad_data import (NO_CAPTION, TOO_SHORT, TRUNCATED, UNDECODABLE, ZERO_BYTE,
                                             MISSING, BadDataLog, BadSample)
from megatron_starflow.data.sampler import GlobalOrderSampler

VIDEO_EXTENSIONS = (".webm", ".mp4", ".mkv", ".mov", ".avi", ".m4v")
# What the CPU variant of DALI's video decoder reads (DALI 2.x, frames_decoder_cpu.cc).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
BACKENDS = ("auto", "dali", "pyav")


# --------------------------------------------------------------------------------------------
# records and clip specification
# --------------------------------------------------------------------------------------------
@dataclass
class VideoRecord:
    """One sample: where its bytes are, its caption and what is known about the stream.

    ``path`` is a file, or a tar shard when ``offset``/``size`` locate a member inside it.
    ``kind`` is ``video`` (encoded container), ``frames`` (an ``.npy`` of already decoded uint8
    frames of a latent shard) or ``missing``. ``meta`` may hold ``codec``, ``fps``, ``frames``,
    ``width``, ``height`` (from :func:`probe`, stored in shards) and ``latent``/``text`` member
    locations of latent shards.
    """

    key: str
    path: str
    caption: str | None
    kind: str = "video"
    offset: int = -1
    size: int = -1
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.key}" if self.offset >= 0 else self.path

    def read_bytes(self) -> bytes:
        if self.offset >= 0:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read(self.size)
        with open(self.path, "rb") as f:
            return f.read()

    def read_member(self, name: str) -> bytes:
        offset, size = self.meta["members"][name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)


@dataclass
class ClipSpec:
    frames: int
    height: int
    width: int
    sample_fps: float = 0.0  # 0: the file's own frame rate, else resample to this rate
    stride: int = 1  # take every stride-th frame (at sample_fps)
    crop: str = "center"  # center | random
    start: str = "random"  # random | first

    def __post_init__(self):
        if self.frames < 1 or self.height < 1 or self.width < 1 or self.stride < 1:
            raise ValueError(f"bad clip spec {self}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop={self.crop!r}; valid: center, random")
        if self.start not in ("random", "first"):
            raise ValueError(f"start={self.start!r}; valid: random, first")


@dataclass
class VideoInfo:
    codec: str
    fps: float
    frames: int  # 0 = unknown
    width: int
    height: int

    def to_dict(self) -> dict:
        return {"codec": self.codec, "fps": self.fps, "frames": self.frames,
                "width": self.width, "height": self.height}


def _open_av(source):
    import av

    return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def probe(source, count_frames: bool = False) -> VideoInfo:
    """Stream facts from the container header (``count_frames``: decode to count exactly).
    Raises :class:`BadSample` for a file PyAV cannot open."""
    try:
        container = _open_av(source)
    except Exception as exc:  # noqa: BLE001 - every FFmpeg failure means "not a readable video"
        raise BadSample(UNDECODABLE, f"cannot open container: {exc}") from None
    with container:
        if not container.streams.video:
            raise BadSample(UNDECODABLE, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        frames = int(stream.frames or 0)
        if not frames and fps and container.duration:
            frames = int(round(container.duration / 1e6 * fps))
        info = VideoInfo(stream.codec_context.name, fps, frames, stream.codec_context.width,
                         stream.codec_context.height)
        if count_frames:
            count = 0
            try:
                for _ in container.decode(stream):
                    count += 1
            except Exception as exc:  # noqa: BLE001
                raise BadSample(TRUNCATED if count else UNDECODABLE,
                                f"decode failed after {count} frames: {exc}") from None
            if info.frames and count < info.frames:
                raise BadSample(TRUNCATED, f"header says {info.frames} frames, decoded {count}")
            info.frames = count
    return info


def frame_indices(info: VideoInfo, spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """Source frame indices of one clip (see the module docstring); raises ``too_short``."""
    fps = info.fps or spec.sample_fps or 1.0
    step = spec.stride * (fps / spec.sample_fps if spec.sample_fps else 1.0)
    span = (spec.frames - 1) * step
    if info.frames and info.frames < math.floor(span + 1e-9) + 1:
        raise BadSample(TOO_SHORT, f"{info.frames} frames, a clip of {spec.frames} frames at stride "
                                   f"{spec.stride} (step {step:g} source frames) needs {math.floor(span) + 1}")
    start = 0.0
    if spec.start == "random" and info.frames:
        start = float(rng.uniform(0.0, info.frames - 1 - span)) if info.frames - 1 > span else 0.0
        start = float(math.floor(start))
    return np.floor(start + np.arange(spec.frames) * step + 1e-9).astype(np.int64)


def resize_crop(frames: np.ndarray, spec: ClipSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 ``[T, h, w, 3]`` -> uint8 ``[T, H, W, 3]``: scale so the frame covers ``H x W``
    (bilinear, antialiased), then centre or random crop."""
    t, h, w, _ = frames.shape
    if (h, w) != (spec.height, spec.width):
        scale = max(spec.height / h, spec.width / w)
        nh, nw = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
        if (nh, nw) != (h, w):
            x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                                antialias=True)
            frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            h, w = nh, nw
        if spec.crop == "random" and rng is not None:
            top = int(rng.integers(0, h - spec.height + 1))
            left = int(rng.integers(0, w - spec.width + 1))
        else:
            top, left = (h - spec.height) // 2, (w - spec.width) // 2
        frames = frames[:, top:top + spec.height, left:left + spec.width]
    return np.ascontiguousarray(frames)


# --------------------------------------------------------------------------------------------
# back ends
# --------------------------------------------------------------------------------------------
def decode_pyav(source, indices: np.ndarray, expected_frames: int = 0) -> np.ndarray:
    """Decode the frames ``indices`` (sorted or not, duplicates allowed) with PyAV -> ``[T, h, w, 3]``."""
    wanted = set(int(i) for i in indices)
    last = int(max(indices))
    got: dict[int, np.ndarray] = {}
    try:
        container = _open_av(source)
    except Exception as exc:  # noqa: BLE001
        raise BadSample(UNDECODABLE, f"cannot open container: {exc}") from None
    count = 0
    with container:
        if not container.streams.video:
            raise BadSample(UNDECODABLE, "no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height >= 320 * 240:
            stream.thread_type = "AUTO"  # frame threads pay off on large frames only
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    got[count] = frame.to_ndarray(format="rgb24")
                count += 1
                if count > last:
                    break
        except Exception as exc:  # noqa: BLE001
            kind = TRUNCATED if count or expected_frames else UNDECODABLE
            raise BadSample(kind, f"decode failed after {count} frames: {exc}") from None
    if count <= last:
        if expected_frames and count < expected_frames:  # the header promised more: cut short
            raise BadSample(TRUNCATED, f"stream ends after {count} of {expected_frames} frames")
        if count == 0:
            raise BadSample(UNDECODABLE, "no frame could be decoded")
        raise BadSample(TOO_SHORT, f"{count} frames, clip needs frame {last}")
    return np.stack([got[int(i)] for i in indices])


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


class DaliDecoder:
    """``nvidia.dali.fn.decoders.video`` fed encoded bytes + per-sample frame indices.

    A DALI pipeline is invalid after any error, so a failed batch is rebuilt and retried one sample
    at a time; a sample that fails alone is reported to the caller."""

    def __init__(self, max_batch: int = 8, threads: int = 2, device: str = "cpu"):
        if not dali_available():
            raise RuntimeError("data.video_backend=dali but nvidia-dali is not installed; "
                               "pip install nvidia-dali-cuda130, or use video_backend=pyav")
        self.max_batch, self.threads, self.device = int(max_batch), int(threads), device
        self.codecs = DALI_CPU_CODECS if device == "cpu" else None  # None: every NVDEC codec
        self._pipe = None
        self._lock = threading.Lock()

    def _build(self):
        import warnings

        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=None if self.device == "cpu" else 0, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device=self.device, frames=frames, pad_mode="none")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._pipe = pipe()
            self._pipe.build()

    def can_decode(self, codec: str | None) -> bool:
        return self.codecs is None or (codec or "") in self.codecs

    def _run(self, data: list[bytes], indices: list[np.ndarray]) -> list[np.ndarray]:
        if self._pipe is None:
            self._build()
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in data])
            self._pipe.feed_input("frames", [np.asarray(i, dtype=np.int32) for i in indices])
            (out,) = self._pipe.run()
            if self.device != "cpu":
                out = out.as_cpu()
            return [np.array(out[i]) for i in range(len(data))]
        except Exception:
            self._pipe = None  # invalid after an error: rebuild on next use
            raise

    def decode_batch(self, data: list[bytes], indices: list[np.ndarray]) -> list:
        """-> per sample, the frames ``[T, h, w, 3]`` or the exception that sample raised."""
        results: list = []
        with self._lock:
            for lo in range(0, len(data), self.max_batch):
                chunk, idx = data[lo:lo + self.max_batch], indices[lo:lo + self.max_batch]
                try:
                    results.extend(self._run(chunk, idx))
                except Exception:  # noqa: BLE001 - find the failing sample(s)
                    for d, i in zip(chunk, idx):
                        try:
                            results.extend(self._run([d], [i]))
                        except Exception as exc:  # noqa: BLE001
                            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()
                                     and "no longer valid" not in ln and "Error in" not in ln
                                     and "Critical error" not in ln]
                            results.append(BadSample(UNDECODABLE, f"DALI ({self.device}): "
                                                     f"{(lines or ['decode failed'])[-1][:300]}"))
        for k, (r, i) in enumerate(zip(results, indices)):
            if isinstance(r, np.ndarray) and r.shape[0] != len(i):
                results[k] = BadSample(TRUNCATED, f"DALI returned {r.shape[0]} of {len(i)} frames")
        return results


# --------------------------------------------------------------------------------------------
# the iterator
# --------------------------------------------------------------------------------------------
def _sample_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(position), 0xC11B]))


class VideoClipIterator:
    """Resumable iterator of ``(clip uint8 [T, H, W, 3], caption)`` over ``records``.

    ``state_dict()``/``load_state_dict()`` save and restore the position exactly (see
    :class:`GlobalOrderSampler`: the state is the number of globally consumed samples, valid for any
    DP size) together with the bad-data counters. ``iter(it)`` yields samples, :meth:`next_batch`
    yields the next step's batch of this rank (bad samples dropped, so a batch may be smaller;
    a step whose samples are all bad moves on to the next step's window).
    """

    def __init__(self, records: list[VideoRecord], spec: ClipSpec, backend: str = "auto", seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, batch_size: int = 1, shuffle: bool = True,
                 bad_log: BadDataLog | None = None, shard_sizes: list[int] | None = None,
                 num_workers: int = 0, dali_device: str = "cpu"):
        if backend not in BACKENDS:
            raise ValueError(f"video backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if not records:
            raise ValueError("no video records to iterate over")
        self.records, self.spec, self.backend = records, spec, backend
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.sampler = GlobalOrderSampler(len(records), seed, dp_rank, dp_size, shard_sizes, shuffle)
        self.bad = bad_log or BadDataLog()
        self._dali = None
        if backend == "dali" or (backend == "auto" and dali_available()):
            self._dali = DaliDecoder(max_batch=max(1, batch_size), device=dali_device)
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.decoded_by = {"dali": 0, "pyav": 0, "frames": 0}

    # -- per sample ----------------------------------------------------------------------------
    def _prepare(self, record: VideoRecord, position: int):
        """Checks and frame indices -> (bytes, indices, rng); raises BadSample."""
        if not record.caption or not record.caption.strip():
            raise BadSample(NO_CAPTION, "no caption")
        if record.kind == "missing":
            raise BadSample(MISSING, "video member or file is missing")
        if record.size == 0 or (record.offset < 0 and os.path.getsize(record.path) == 0):
            raise BadSample(ZERO_BYTE, "zero-byte file")
        data = record.read_bytes()
        if len(data) == 0:
            raise BadSample(ZERO_BYTE, "zero-byte file")
        rng = _sample_rng(self.seed, position)
        if record.kind == "frames":
            return data, None, rng
        meta = record.meta
        if "fps" in meta and "codec" in meta:
            info = VideoInfo(meta["codec"], float(meta["fps"]), int(meta.get("frames", 0)),
                             int(meta.get("width", 0)), int(meta.get("height", 0)))
        else:
            info = probe(data)
            meta.update(info.to_dict())
        return data, frame_indices(info, self.spec, rng), rng

    def _use_dali(self, record: VideoRecord) -> bool:
        if self._dali is None or record.kind != "video":
            return False
        return self.backend == "dali" or self._dali.can_decode(record.meta.get("codec"))

    def _finish(self, frames: np.ndarray, rng) -> np.ndarray:
        return resize_crop(frames, self.spec, rng)

    def _decode_frames_npy(self, data: bytes, rng) -> np.ndarray:
        clip = np.load(io.BytesIO(data), allow_pickle=False)
        if clip.ndim != 4 or clip.shape[0] < self.spec.frames or clip.dtype != np.uint8:
            raise BadSample(TOO_SHORT if clip.ndim == 4 else UNDECODABLE,
                            f"pre-decoded clip has shape {clip.shape} {clip.dtype}")
        return self._finish(clip[: self.spec.frames], rng)

    def decode(self, items: list[tuple[int, int]]) -> list[tuple[int, VideoRecord, object]]:
        """``[(position, sample index)]`` -> ``[(position, record, clip or BadSample)]``."""
        prepared, out = [], []
        for position, index in items:
            record = self.records[index]
            try:
                prepared.append((position, record, *self._prepare(record, position)))
            except BadSample as bad:
                out.append((position, record, bad))
        if self.backend == "dali":  # a codec this device's DALI cannot read: say so, do not try
            keep = []
            for p in prepared:
                codec = p[1].meta.get("codec")
                if p[1].kind == "video" and codec and not self._dali.can_decode(codec):
                    out.append((p[0], p[1], BadSample(UNDECODABLE, f"DALI ({self._dali.device}) cannot "
                                                      f"decode {codec}; use video_backend=auto or pyav")))
                else:
                    keep.append(p)
            prepared = keep
        dali_jobs = [p for p in prepared if self._use_dali(p[1])]
        if dali_jobs:
            results = self._dali.decode_batch([p[2] for p in dali_jobs], [p[3] for p in dali_jobs])
            for (position, record, data, idx, rng), res in zip(dali_jobs, results):
                if isinstance(res, BadSample) and self.backend == "auto":
                    prepared.append((position, record, data, idx, rng, "fallback"))
                    continue
                if not isinstance(res, BadSample):
                    self.decoded_by["dali"] += 1
                    res = self._finish(res, rng)
                out.append((position, record, res))
        rest = [p for p in prepared if not self._use_dali(p[1]) or len(p) == 6]

        def work(p):
            position, record, data, idx, rng = p[:5]
            try:
                if record.kind == "frames":
                    clip = self._decode_frames_npy(data, rng)
                    self.decoded_by["frames"] += 1
                else:
                    clip = self._finish(decode_pyav(data, idx, int(record.meta.get("frames", 0))), rng)
                    self.decoded_by["pyav"] += 1
                return position, record, clip
            except BadSample as bad:
                return position, record, bad

        out.extend(self._pool.map(work, rest) if self._pool is not None and len(rest) > 1
                   else map(work, rest))
        out.sort(key=lambda r: r[0])
        return out

    # -- batches -------------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next non-empty batch of this rank: ``{"video": uint8 [B', T, H, W, 3], "caption",
        "key", "position", "epoch", ...}`` (+ ``latent``/``text`` of latent shards)."""
        while True:
            epoch = self.sampler.epoch
            decoded = self.decode(self.sampler.next_batch(self.batch_size))
            good = []
            for position, record, res in decoded:
                if isinstance(res, BadSample):
                    self.bad.skip(record.where, res.kind, str(res), key=record.key)
                else:
                    self.bad.ok()
                    good.append((position, record, res))
            self.bad.check()
            if good:
                batch = {"video": torch.from_numpy(np.stack([g[2] for g in good])),
                         "caption": [g[1].caption for g in good],
                         "key": [g[1].key for g in good],
                         "position": [g[0] for g in good],
                         "epoch": epoch}
                for extra in ("latent", "text"):
                    if all(extra in g[1].meta.get("members", {}) for g in good):
                        batch[extra] = torch.stack([torch.from_numpy(np.load(
                            io.BytesIO(g[1].read_member(extra)), allow_pickle=False)) for g in good])
                return batch

    def batches(self) -> Iterator[tuple[int, dict]]:
        """Endless ``(epoch, batch)`` pairs, the shape of the training loop's synthetic batches."""
        while True:
            batch = self.next_batch()
            yield batch["epoch"], batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        while True:
            batch = self.next_batch()
            for clip, caption in zip(batch["video"].numpy(), batch["caption"]):
                yield clip, caption

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "bad_data": self.bad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.bad.load_state_dict(state.get("bad_data", {}))


# --------------------------------------------------------------------------------------------
# record sources: a folder, a CSV / JSONL manifest
# --------------------------------------------------------------------------------------------
def _caption_of(path: str) -> str | None:
    txt = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return f.read().strip()
    return None


def records_from_manifest(path: str) -> list[VideoRecord]:
    """CSV (header with ``path`` or ``file`` and ``caption``) or JSONL (same keys) manifest; relative
    paths are relative to the manifest's folder."""
    import csv

    root = os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    records = []
    for row in rows:
        name = row.get("path") or row.get("file") or row.get("video")
        if not name:
            raise ValueError(f"{path}: every row needs a 'path' (or 'file') column, got {row}")
        full = name if os.path.isabs(name) else os.path.join(root, name)
        caption = row.get("caption")
        if caption is None:
            caption = _caption_of(full)
        key = os.path.splitext(os.path.basename(name))[0]
        kind = "video" if os.path.isfile(full) else "missing"
        records.append(VideoRecord(key, full, caption, kind))
    return records


def records_from_folder(folder: str) -> list[VideoRecord]:
    """Videos of a folder, captions from ``metadata.jsonl`` (``file``/``caption``) when present,
    else from a ``.txt`` of the same stem."""
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        return [r for r in records_from_manifest(meta)
                if os.path.splitext(r.path)[1].lower() in VIDEO_EXTENSIONS]
    records = []
    for name in sorted(os.listdir(folder)):
        if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS and not name.startswith("."):
            full = os.path.join(folder, name)
            records.append(VideoRecord(os.path.splitext(name)[0], full, _caption_of(full)))
    return records


def records_from_tar(path: str) -> list[VideoRecord]:
    """Index one webdataset-style tar shard: members ``<key>.<ext>`` grouped by key."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext] = (member.offset_data, member.size)
    records = []
    with open(path, "rb") as f:
        def read(loc):
            f.seek(loc[0])
            return f.read(loc[1])

        for key in order:
            members = groups[key]
            caption = read(members["txt"]).decode("utf-8").strip() if "txt" in members else None
            meta = json.loads(read(members["json"])) if "json" in members else {}
            meta["members"] = {"latent": members["latent.npy"]} if "latent.npy" in members else {}
            if "text.npy" in members:
                meta["members"]["text"] = members["text.npy"]
            if "frames.npy" in members:
                kind, loc = "frames", members["frames.npy"]
            else:
                video = [e for e in members if "." + e in VIDEO_EXTENSIONS]
                kind, loc = ("video", members[video[0]]) if video else ("missing", (-1, -1))
            records.append(VideoRecord(key, path, caption, kind, loc[0], loc[1], meta))
    return records
