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
         decodes VP8, VP9 and MJPEG only; when the caller's device is CUDA the GPU decoder
         (``device="mixed"``, NVDEC) is used instead, which reads H.264/HEVC/AV1 as well;
       * ``auto``: DALI for the records whose codec DALI can decode on this device, PyAV for the
         rest (and PyAV again if DALI fails on a file, before calling it bad);
  4. resize (bilinear, antialiased, shorter side to cover the target) and centre / random crop to
     ``height x width``. Steps 2 and 4 are shared by both back ends, so they differ only in decoding.

A sample that fails any step is skipped, recorded in a :class:`BadDataLog` with its path and
replaced by the next sample of the rank's stride (a batch always has ``batch_size`` samples); the
iterator raises :class:`BadDataError` once the bad fraction passes the limit. Latent shards
(``tools/prepare_data.py --latents``) are read in ``mode="latents"``: stored codec latents and text
embeddings, no decoding. ``num_workers > 0`` decodes in worker processes with the same order.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from megatron_starflow.data.bad_data import (MISSING, NO_CAPTION, TOO_SHORT, TRUNCATED, UNDECODABLE,
                                             ZERO_BYTE, BadDataError, BadDataLog, BadSample)
from megatron_starflow.data.sampler import GlobalOrderSampler

VIDEO_EXTENSIONS = (".webm", ".mp4", ".mkv", ".mov", ".avi", ".m4v")
# What the CPU variant of DALI's video decoder reads (DALI 2.x, frames_decoder_cpu.cc).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# What DALI's GPU decoder (device="mixed", NVDEC) reads (DALI 2.x fn.decoders.video).
DALI_GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "av1", "mpeg4"})
BACKENDS = ("auto", "dali", "pyav")


# --------------------------------------------------------------------------------------------
# records and clip specification
# --------------------------------------------------------------------------------------------
@dataclass
class VideoRecord:
    """One sample: where its bytes are, its caption and what is known about the stream.

    ``path`` is a file, or a tar shard when ``offset``/``size`` locate a member inside it.
    ``kind`` is ``video`` (encoded container), ``frames`` (an ``.npy`` of already decoded uint8
    frames of a latent shard), ``latent`` (a latent shard sample stored without its frames) or
    ``missing``. ``meta`` may hold ``codec``, ``fps``, ``frames``,
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


def clip_spec(cfg, train: bool = True) -> ClipSpec:
    """The clips ``data.*`` of a config asks for; held-out clips (``train=False``) are centre
    crops from the first frame."""
    d = cfg.data
    return ClipSpec(frames=d.frames, height=d.height, width=d.width, sample_fps=float(d.sample_fps),
                    stride=d.frame_stride, crop=d.crop if train else "center",
                    start=d.clip_start if train else "first")


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


def dali_device_for(device) -> tuple[str, int | None]:
    """DALI's decoder placement for the process's compute device (``parallel/device.py``'s one
    decision, passed down by the caller): the GPU decoder (``"mixed"``: NVDEC, reads H.264/HEVC
    too) on the device's GPU when it is CUDA, else the CPU decoder."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return "mixed", (device.index if device.index is not None else 0)
    return "cpu", None


class DaliDecoder:
    """``nvidia.dali.fn.decoders.video`` fed encoded bytes + per-sample frame indices.

    ``device="cpu"`` runs DALI's CPU decoder (VP8/VP9/MJPEG in the pip wheel); ``"mixed"`` parses
    on the CPU and decodes on GPU ``device_id`` with NVDEC (every codec of
    :data:`DALI_GPU_CODECS`), handing back host arrays. A DALI pipeline is invalid after any
    error, so a failed batch is rebuilt and retried one sample at a time; a sample that fails
    alone is reported to the caller."""

    def __init__(self, max_batch: int = 8, threads: int = 2, device: str = "cpu",
                 device_id: int | None = None):
        if not dali_available():
            raise RuntimeError("data.video_backend=dali but nvidia-dali is not installed; "
                               "pip install nvidia-dali-cuda130, or use video_backend=pyav")
        if device not in ("cpu", "mixed"):
            raise ValueError(f"DALI decoder device {device!r}; valid: cpu, mixed")
        self.max_batch, self.threads, self.device = int(max_batch), int(threads), device
        self.device_id = None if device == "cpu" else int(device_id or 0)
        self.codecs = DALI_CPU_CODECS if device == "cpu" else DALI_GPU_CODECS
        self._pipe = None
        self._lock = threading.Lock()

    def _build(self):
        import warnings

        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device=self.device, frames=frames, pad_mode="none")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._pipe = pipe()
            self._pipe.build()

    def can_decode(self, codec: str | None) -> bool:
        return (codec or "") in self.codecs

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
# decoding a list of samples (in this process or in a worker process)
# --------------------------------------------------------------------------------------------
def _sample_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(position), 0xC11B]))


MODES = ("clips", "latents")


@dataclass
class DecodeSettings:
    """Everything a decoder needs besides the records (picklable: sent to worker processes).

    ``mode="clips"``: decode the video (or read the pre-decoded ``frames.npy``) of each record;
    ``mode="latents"``: read the ``latent.npy`` and ``text.npy`` members of latent shards (no
    decoding; ``latent_shape``/``text_shape`` when given are checked per sample)."""

    spec: ClipSpec
    backend: str = "auto"
    seed: int = 0
    dali_device: str = "cpu"
    dali_device_id: int | None = None
    max_batch: int = 8
    mode: str = "clips"
    latent_shape: tuple | None = None
    text_shape: tuple | None = None


def _load_npy(data: bytes, what: str) -> np.ndarray:
    """An ``.npy`` member -> array; a damaged one is one bad sample: ``zero_byte``, ``truncated``
    (a valid header, too few bytes) or ``undecodable`` (not an .npy)."""
    if not data:
        raise BadSample(ZERO_BYTE, f"{what}: zero bytes")
    buf = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(buf)
        fmt = np.lib.format
        (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(buf)
    except Exception as exc:  # noqa: BLE001
        raise BadSample(UNDECODABLE, f"{what}: not an .npy array ({exc})") from None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise BadSample(TRUNCATED, f"{what}: {exc}") from None


class ClipDecoder:
    """Decodes ``[(position, sample index)]`` of ``records`` into clips (or latents): per sample
    the result or the :class:`BadSample` it raised, and which path produced it."""

    def __init__(self, records: list[VideoRecord], settings: DecodeSettings):
        s = settings
        if s.backend not in BACKENDS:
            raise ValueError(f"video backend {s.backend!r}; valid: {', '.join(BACKENDS)}")
        if s.mode not in MODES:
            raise ValueError(f"decode mode {s.mode!r}; valid: {', '.join(MODES)}")
        self.records, self.settings, self.spec = records, s, s.spec
        self._dali = None
        if s.mode == "clips" and (s.backend == "dali" or (s.backend == "auto" and dali_available())):
            self._dali = DaliDecoder(max_batch=max(1, s.max_batch), device=s.dali_device,
                                     device_id=s.dali_device_id)

    @property
    def dali(self) -> DaliDecoder | None:
        """The DALI decoder (CPU, or the GPU decoder on a CUDA device), or None (PyAV only)."""
        return self._dali

    # -- per sample ----------------------------------------------------------------------------
    def _check_record(self, record: VideoRecord) -> None:
        if not record.caption or not record.caption.strip():
            raise BadSample(NO_CAPTION, "no caption")
        if self.settings.mode == "latents":
            missing = [m for m in ("latent", "text") if m not in record.meta.get("members", {})]
            if missing:
                names = ", ".join(m + ".npy" for m in missing)
                raise BadSample(MISSING, f"latent shard sample without {names}")
            return
        if record.kind == "missing":
            raise BadSample(MISSING, "video member or file is missing")
        if record.kind == "latent":
            raise BadSample(MISSING, "latent shard sample stored without frames.npy: train from it "
                                     "with data.source=latent_shards")
        if record.size == 0 or (record.offset < 0 and os.path.getsize(record.path) == 0):
            raise BadSample(ZERO_BYTE, "zero-byte file")

    def _prepare(self, record: VideoRecord, position: int):
        """Checks and frame indices -> (bytes, indices, rng); raises BadSample."""
        self._check_record(record)
        data = record.read_bytes()
        if len(data) == 0:
            raise BadSample(ZERO_BYTE, "zero-byte file")
        rng = _sample_rng(self.settings.seed, position)
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
        return self.settings.backend == "dali" or self._dali.can_decode(record.meta.get("codec"))

    def _finish(self, frames: np.ndarray, rng) -> np.ndarray:
        return resize_crop(frames, self.spec, rng)

    def _decode_frames_npy(self, data: bytes, rng) -> np.ndarray:
        clip = _load_npy(data, "frames.npy")
        if clip.ndim != 4 or clip.shape[0] < self.spec.frames or clip.dtype != np.uint8:
            raise BadSample(TOO_SHORT if clip.ndim == 4 else UNDECODABLE,
                            f"pre-decoded clip has shape {clip.shape} {clip.dtype}")
        return self._finish(clip[: self.spec.frames], rng)

    def _read_latents(self, record: VideoRecord) -> dict:
        s = self.settings
        out = {}
        for name, want in (("latent", s.latent_shape), ("text", s.text_shape)):
            array = _load_npy(record.read_member(name), f"{name}.npy")
            if want is not None and tuple(array.shape) != tuple(want):
                raise BadSample(UNDECODABLE, f"{name}.npy has shape {tuple(array.shape)}, the run "
                                             f"expects {tuple(want)}")
            if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
                raise BadSample(UNDECODABLE, f"{name}.npy is not finite floating point ({array.dtype})")
            out[name] = array
        return out

    # -- a list of samples ---------------------------------------------------------------------
    def decode(self, items: list[tuple[int, int]]) -> list[tuple[int, int, object, str]]:
        """``[(position, sample index)]`` -> ``[(position, index, clip | latents | BadSample,
        path)]`` in the order of ``items``; path is dali | pyav | frames | latents ("" if bad)."""
        out: dict[int, tuple] = {}
        if self.settings.mode == "latents":
            for k, (position, index) in enumerate(items):
                record = self.records[index]
                try:
                    self._check_record(record)
                    out[k] = (position, index, self._read_latents(record), "latents")
                except BadSample as bad:
                    out[k] = (position, index, bad, "")
            return [out[k] for k in range(len(items))]
        prepared = []
        for k, (position, index) in enumerate(items):
            record = self.records[index]
            try:
                prepared.append((k, position, index, *self._prepare(record, position)))
            except BadSample as bad:
                out[k] = (position, index, bad, "")
        if self.settings.backend == "dali":  # a codec this device's DALI cannot read: say so
            keep = []
            for p in prepared:
                record = self.records[p[2]]
                codec = record.meta.get("codec")
                if record.kind == "video" and codec and not self._dali.can_decode(codec):
                    out[p[0]] = (p[1], p[2], BadSample(UNDECODABLE, f"DALI ({self._dali.device}) cannot "
                                                       f"decode {codec}; use video_backend=auto or pyav"), "")
                else:
                    keep.append(p)
            prepared = keep
        dali_jobs = [p for p in prepared if self._use_dali(self.records[p[2]])]
        fallback = []
        if dali_jobs:
            results = self._dali.decode_batch([p[3] for p in dali_jobs], [p[4] for p in dali_jobs])
            for (k, position, index, data, idx, rng), res in zip(dali_jobs, results):
                if isinstance(res, BadSample):
                    if self.settings.backend == "auto":  # PyAV gets a go before it is called bad
                        fallback.append((k, position, index, data, idx, rng))
                    else:
                        out[k] = (position, index, res, "")
                else:
                    out[k] = (position, index, self._finish(res, rng), "dali")
        rest = [p for p in prepared if not self._use_dali(self.records[p[2]])] + fallback
        for k, position, index, data, idx, rng in rest:
            record = self.records[index]
            try:
                if record.kind == "frames":
                    out[k] = (position, index, self._decode_frames_npy(data, rng), "frames")
                else:
                    clip = decode_pyav(data, idx, int(record.meta.get("frames", 0)))
                    out[k] = (position, index, self._finish(clip, rng), "pyav")
            except BadSample as bad:
                out[k] = (position, index, bad, "")
        return [out[k] for k in range(len(items))]


# A worker process's decoder (``data.num_workers > 0``): built once by the pool's initializer.
_WORKER_DECODER: ClipDecoder | None = None


def _init_worker(records: list[VideoRecord], settings: DecodeSettings) -> None:
    global _WORKER_DECODER
    torch.set_num_threads(1)  # the workers are the parallelism
    _WORKER_DECODER = ClipDecoder(records, settings)


def _worker_decode(items: list[tuple[int, int]]) -> list[tuple[int, int, object, str]]:
    return _WORKER_DECODER.decode(items)


# --------------------------------------------------------------------------------------------
# the iterator
# --------------------------------------------------------------------------------------------
class VideoClipIterator:
    """Resumable batches of this rank: ``batch_size`` good samples per :meth:`next_batch`.

    Order and position: :class:`GlobalOrderSampler` (its docstring). Each rank reads the slots of
    its own stride of the global order; a bad sample is skipped, counted and logged in the
    :class:`BadDataLog`, and replaced by the next slot of the stride, so every batch has exactly
    ``batch_size`` samples (the global batch, the loss scale and the meaning of the learning rate
    stay fixed). ``state_dict()`` is this rank's part of the position (``sampler.merge_states``
    of every DP rank's part resumes with any DP size; the same DP size continues exactly).

    ``num_workers > 0`` decodes in that many worker processes (spawned), reading ahead up to
    ``prefetch`` chunks per worker along this rank's stride. A rank's slots do not depend on any
    other rank, and results are consumed in slot order, so the batches are identical to
    ``num_workers=0``; a resume drops what was read ahead and starts again at the saved slot.

    ``device`` is the process's compute device (``parallel/device.py``): CUDA selects DALI's GPU
    decoder. ``mode="latents"`` reads stored latents and text embeddings instead of decoding
    (``data.source=latent_shards``); ``constants`` are added to every batch (e.g. the stored
    caption-dropout embedding).
    """

    def __init__(self, records: list[VideoRecord], spec: ClipSpec, backend: str = "auto", seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, batch_size: int = 1, shuffle: bool = True,
                 bad_log: BadDataLog | None = None, shard_sizes: list[int] | None = None,
                 num_workers: int = 0, device=None, mode: str = "clips", prefetch: int = 2,
                 latent_shape: tuple | None = None, text_shape: tuple | None = None,
                 constants: dict | None = None):
        if not records:
            raise ValueError("no video records to iterate over")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if backend not in BACKENDS:  # checked here too: with workers the decoder is built there
            raise ValueError(f"video backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}; valid: {', '.join(MODES)}")
        if backend == "dali" and mode == "clips" and not dali_available():
            raise RuntimeError("data.video_backend=dali but nvidia-dali is not installed; "
                               "pip install nvidia-dali-cuda130, or use video_backend=pyav")
        dali_device, dali_id = dali_device_for(device)
        self.settings = DecodeSettings(spec, backend, int(seed), dali_device, dali_id,
                                       max(1, int(batch_size)), mode, latent_shape, text_shape)
        self.records, self.spec, self.backend, self.mode = records, spec, backend, mode
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.sampler = GlobalOrderSampler(len(records), seed, dp_rank, dp_size, shard_sizes, shuffle)
        self.bad = bad_log or BadDataLog()
        self.decoder = ClipDecoder(records, self.settings) if num_workers == 0 else None
        self.num_workers, self.prefetch = int(num_workers), max(1, int(prefetch))
        self.constants = dict(constants or {})
        self.decoded_by = {"dali": 0, "pyav": 0, "frames": 0, "latents": 0}
        self._pool = None
        self._reset_readahead()

    # -- reading ahead along the stride --------------------------------------------------------
    def _reset_readahead(self) -> None:
        if getattr(self, "_pending", None):
            for future in self._pending:
                future.cancel()
        self._pending: deque = deque()  # futures of submitted chunks, in slot order
        self._buffer: deque = deque()  # decoded slots not yet consumed, in slot order
        self._next_slot = self.sampler.scanned  # first slot not submitted yet

    def _chunk_items(self) -> list[tuple[int, int]]:
        lo = self._next_slot
        self._next_slot += self.batch_size
        positions = [self.sampler.slot_position(j) for j in range(lo, self._next_slot)]
        return [(p, self.sampler.sample_at(p)) for p in positions]

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.num_workers, multiprocessing.get_context("spawn"),
                                             initializer=_init_worker,
                                             initargs=(self.records, self.settings))
        return self._pool

    def _fill(self) -> None:
        """Decode (or collect) the next chunk of slots into the buffer."""
        if self.num_workers == 0:
            self._buffer.extend(self.decoder.decode(self._chunk_items()))
            return
        pool = self._executor()
        while len(self._pending) < self.num_workers * self.prefetch:
            self._pending.append(pool.submit(_worker_decode, self._chunk_items()))
        self._buffer.extend(self._pending.popleft().result())

    def _take(self, count: int) -> list[tuple[int, int, object, str]]:
        """The next ``count`` slots of this rank's stride, decoded; marks them used."""
        while len(self._buffer) < count:
            self._fill()
        out = [self._buffer.popleft() for _ in range(count)]
        self.sampler.scanned += count
        return out

    def decode(self, items: list[tuple[int, int]]) -> list[tuple[int, VideoRecord, object]]:
        """``[(position, sample index)]`` -> ``[(position, record, clip or BadSample)]``, in this
        process (evaluation and tools; not the training order)."""
        decoder = self.decoder or ClipDecoder(self.records, self.settings)
        out = []
        for position, index, res, how in decoder.decode(items):
            if how:
                self.decoded_by[how] += 1
            out.append((position, self.records[index], res))
        return out

    # -- batches -------------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """This rank's next batch of exactly ``batch_size`` good samples: ``{"video": uint8
        [B, T, H, W, 3]`` (clips) or ``"latent"``, ``"text"`` (latents), ``"caption", "key",
        "position", "epoch"`` and the constants}."""
        epoch = self.sampler.epoch
        good, bad_run = [], 0
        while len(good) < self.batch_size:
            for position, index, res, how in self._take(self.batch_size - len(good)):
                record = self.records[index]
                if isinstance(res, BadSample):
                    self.bad.skip(record.where, res.kind, str(res), key=record.key, position=position)
                    bad_run += 1
                    continue
                self.bad.ok()
                self.decoded_by[how] += 1
                good.append((position, record, res))
                bad_run = 0
            self.bad.check()
            if bad_run > self.sampler.num_samples:
                raise BadDataError(f"no readable sample in {bad_run} consecutive slots (more than the "
                                   f"{self.sampler.num_samples} samples of the data set); every skip "
                                   f"is listed in {self.bad.path or 'the bad-data log'}")
        batch = {"caption": [g[1].caption for g in good], "key": [g[1].key for g in good],
                 "position": [g[0] for g in good], "epoch": epoch}
        if self.mode == "latents":
            for name in ("latent", "text"):
                batch[name] = torch.from_numpy(np.stack([g[2][name] for g in good]))
        else:
            batch["video"] = torch.from_numpy(np.stack([g[2] for g in good]))
        batch.update(self.constants)
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
        """This rank's position and bad-data counters (merge every DP rank's with
        ``sampler.merge_states`` for a checkpoint)."""
        return {"sampler": self.sampler.state_dict(),
                "bad_data": {**self.bad.state_dict(), "dp_rank": self.sampler.dp_rank}}

    def load_state_dict(self, state: dict) -> None:
        exact = self.sampler.restores_exactly(state["sampler"])
        self.sampler.load_state_dict(state["sampler"])
        bad = state.get("bad_data", {})
        if "per_rank" in bad:  # a merged state: this rank's own counters, or all of them on rank 0
            own = bad["per_rank"].get(str(self.sampler.dp_rank))
            if exact and own is not None:
                bad = own
            elif self.sampler.dp_rank != 0:
                bad = {}
        self.bad.load_state_dict(bad)
        self._reset_readahead()

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        self._reset_readahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


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
            elif "latent.npy" in members:
                kind, loc = "latent", members["latent.npy"]
            else:
                video = [e for e in members if "." + e in VIDEO_EXTENSIONS]
                kind, loc = ("video", members[video[0]]) if video else ("missing", (-1, -1))
            records.append(VideoRecord(key, path, caption, kind, loc[0], loc[1], meta))
    return records


class HeldoutSamples:
    """Map-style, deterministic samples of an unshuffled ``VideoClipIterator`` for evaluation: the
    first ``limit`` records, decoded on first access, bad ones dropped. ``item(result, record,
    index)`` turns one decoded sample into the data set's dict."""

    def __init__(self, iterator: "VideoClipIterator", limit: int):
        self._it, self.limit = iterator, int(limit)
        self._items: list | None = None

    def _load(self) -> list:
        if self._items is None:
            n = min(self.limit, len(self._it.records))
            decoded = self._it.decode([(i, i) for i in range(n)])
            self._items = [(res, rec) for _, rec, res in decoded if not isinstance(res, BadSample)]
        return self._items

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index: int) -> dict:
        res, rec = self._load()[index]
        return self.item(res, rec, index)

    def item(self, result, record, index: int) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError
