"""Reading conditioning videos / images, writing videos and frame grids (atomically: temp name,
then rename)."""

from __future__ import annotations

import os

import numpy as np


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    return frames if factor <= 1 else frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def auto_upscale(height: int, min_side: int = 128) -> int:
    """Tiny CPU videos are 16 px: enlarge by pixel repetition so a player shows them."""
    return max(1, -(-min_side // height))


def write_mp4(path: str, frames: np.ndarray, fps: int = 8, upscale: int = 1) -> str:
    """frames uint8 ``[T, H, W, 3]`` -> H.264 mp4 (yuv420p) via imageio-ffmpeg."""
    import imageio.v2 as imageio

    frames = _upscale(np.asarray(frames, dtype=np.uint8), upscale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext or '.mp4'}"
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=9, pixelformat="yuv420p",
                            macro_block_size=1, format="FFMPEG") as writer:
        for frame in frames:
            writer.append_data(frame)
    os.replace(tmp, path)
    return path


def output_paths(out: str, count: int) -> list[str]:
    """The mp4 paths of ``count`` videos written to ``out``: ``out`` itself for one, else
    ``<root>_<i><ext>``."""
    if count == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f"{root}_{i}{ext or '.mp4'}" for i in range(count)]


def write_videos(videos: np.ndarray, out: str, fps: int, grid: str | None = None) -> list[str]:
    """uint8 ``[B, T, H, W, 3]`` -> one mp4 per video (``output_paths``), upscaled for viewing,
    at most 8 fps; plus the PNG frame grid of all of them at ``grid``. Returns the mp4 paths."""
    up = auto_upscale(videos.shape[2])
    paths = [write_mp4(path, video, fps=min(fps, 8), upscale=up)
             for path, video in zip(output_paths(out, videos.shape[0]), videos)]
    if grid:
        write_png(grid, frame_grid(videos, upscale=max(1, up // 2)))
    return paths


def frame_grid(videos: np.ndarray, upscale: int = 1, gap: int = 2) -> np.ndarray:
    """videos uint8 ``[B, T, H, W, 3]`` -> one image: a row per video, a column per frame."""
    videos = _upscale(np.asarray(videos, dtype=np.uint8), upscale)
    b, t, h, w, _ = videos.shape
    grid = np.full((b * (h + gap) - gap, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        for j in range(t):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
    return grid


def write_png(path: str, image: np.ndarray) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
    return path


def read_video(path: str) -> np.ndarray:
    """Any video (or image) file -> uint8 ``[T, H, W, 3]``; one clear error if unreadable."""
    import imageio.v2 as imageio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    try:
        if path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")):
            frames = np.asarray(imageio.imread(path))[None]
        elif path.lower().endswith(".npy"):
            frames = np.load(path)
        else:
            frames = np.stack([np.asarray(f) for f in imageio.get_reader(path, format="FFMPEG")])
    except Exception as exc:  # imageio raises many kinds; the user needs one message
        raise ValueError(f"cannot read {path!r} as an image or video ({exc}); give a PNG/JPEG "
                         f"image, an .npy uint8 [T,H,W,3] array or a video file ffmpeg reads") from None
    if frames.ndim == 3:  # a grey image
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"{path!r} decoded to shape {frames.shape}; expected [T, H, W, 3]")
    return np.ascontiguousarray(frames[..., :3]).astype(np.uint8)


def conditioning_frames(task: str, image: str | None = None, video: str | None = None,
                        context_frames: int = 0) -> np.ndarray | None:
    """The given frames of an I2V (first frame of ``image``) or V2V (``video``, cut to
    ``context_frames`` when > 0) task as uint8 ``[F, H, W, 3]``; None for T2V."""
    if task not in ("i2v", "v2v"):
        return None
    source = image if task == "i2v" else video
    if not source:
        raise ValueError(f"--task {task} needs --{'image' if task == 'i2v' else 'video'} PATH")
    frames = read_video(source)
    if task == "i2v":
        return frames[:1]
    return frames[:context_frames] if context_frames else frames
