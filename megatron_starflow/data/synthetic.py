"""Procedural captioned video clips with a known answer per caption.

Every clip is a single coloured shape sliding at constant speed across a plain
background. Because the caption is generated from the same attributes that drive
the renderer, a model's samples can be scored for prompt adherence exactly
(right colour? right shape? moving the right way?) without any learned judge.

Everything is a pure function of (split, index): no global RNG state, so clips
can be regenerated on any rank / worker / machine and always match.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down")

# Object colours are saturated / bright; backgrounds are dark or mid-gray, so
# every (colour, background) pair differs by a large RGB distance. The nearest
# pairs (blue/navy, green/darkgreen) still differ by >140 on one channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40),
    "green": (40, 230, 60),
    "blue": (70, 130, 255),
    "yellow": (245, 230, 40),
    "white": (255, 255, 255),
    "magenta": (235, 50, 235),
    "cyan": (40, 235, 235),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (90, 90, 90),
    "navy": (0, 0, 90),
    "darkgreen": (0, 80, 0),
}

# Unit vector (dx, dy) in image coordinates (y grows downwards).
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Ranges for the continuous attributes (all resolution independent, see ClipAttributes).
SIZE_RANGE = (0.14, 0.22)
SPEED_RANGE = (0.5, 1.0)

# Split names are turned into seed-stream ids with a stable hash (Python's hash()
# is salted per process, which would break determinism across workers).
_SPLIT_SALT = 0x5A17F10


@dataclasses.dataclass(frozen=True)
class ClipAttributes:
    """Everything needed to render one clip.

    Continuous fields are normalised so one set of attributes renders at any
    resolution / length:
      size:     half-extent of the shape as a fraction of min(height, width).
      start_x, start_y: start position in [0, 1] across the *free span* of each
                axis (the range of centres that keep the shape fully inside).
      speed:    total displacement over the whole clip, as a fraction of the free
                span along the motion axis (constant per-frame step).
    """

    shape: str
    color: str
    direction: str
    background: str
    start_x: float
    start_y: float
    speed: float
    size: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipAttributes":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def caption_for(attrs: ClipAttributes) -> str:
    return f"a {attrs.color} {attrs.shape} moves {attrs.direction} on a {attrs.background} background"


def sample_attributes(rng: np.random.Generator) -> ClipAttributes:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(*SIZE_RANGE))
    speed = float(rng.uniform(*SPEED_RANGE))
    start_x, start_y = (float(v) for v in rng.uniform(0.0, 1.0, size=2))
    # Along the motion axis, pick the start so the whole path stays in [0, 1].
    dx, dy = _DIRECTION_VECTORS[direction]
    along = float(rng.uniform(0.0, 1.0 - speed))
    if dx:
        start_x = along if dx > 0 else 1.0 - along
    else:
        start_y = along if dy > 0 else 1.0 - along
    return ClipAttributes(shape, color, direction, background, start_x, start_y, speed, size)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with half-extent r, given offsets from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        # Slightly smaller than the bounding box so its area is close to the circle's.
        s = 0.85 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # Apex at the top, base at the bottom: half-width grows linearly with depth.
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_centers(attrs: ClipAttributes, frames: int, height: int, width: int) -> np.ndarray:
    """Pixel-space centres [T, 2] (x, y) of the object in each frame."""
    r = attrs.size * min(height, width)
    free_x, free_y = max(width - 2 * r, 0.0), max(height - 2 * r, 0.0)
    dx, dy = _DIRECTION_VECTORS[attrs.direction]
    t = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
    ux = attrs.start_x + dx * attrs.speed * t
    uy = attrs.start_y + dy * attrs.speed * t
    # Clip guards against float round-off only; sample_attributes keeps u in [0, 1].
    ux, uy = np.clip(ux, 0.0, 1.0), np.clip(uy, 0.0, 1.0)
    return np.stack([r + ux * free_x, r + uy * free_y], axis=-1)


def render_clip(attrs: ClipAttributes, frames: int, height: int, width: int) -> np.ndarray:
    """Render uint8 video [T, H, W, 3]."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"frames/height/width must be positive, got {frames}/{height}/{width}")
    r = attrs.size * min(height, width)
    # Pixel centres sit at +0.5 so a shape centred in the frame is symmetric.
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = np.asarray(BACKGROUNDS[attrs.background], dtype=np.uint8)
    color = np.asarray(COLORS[attrs.color], dtype=np.uint8)
    for t, (cx, cy) in enumerate(object_centers(attrs, frames, height, width)):
        mask = shape_mask(attrs.shape, xs - cx, ys - cy, r)
        video[t][mask] = color
    return video


def _split_id(split: str) -> int:
    return zlib.crc32(split.encode("utf-8")) ^ _SPLIT_SALT


def attributes_for(index: int, split: str) -> ClipAttributes:
    """Attributes of clip `index` of `split`: a pure function of the pair.

    Each split name seeds its own SeedSequence entropy, so the train and
    heldout streams are independent and a held-out clip never reappears in train.
    """
    if index < 0:
        raise ValueError(f"clip index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([_split_id(split), int(index)]))
    return sample_attributes(rng)


def scaled(attrs: ClipAttributes, object_scale: float) -> ClipAttributes:
    """The same clip with the object's size multiplied by ``object_scale`` (caption, colours,
    direction and relative path unchanged): a knob for how many pixels a shape gets."""
    return attrs if object_scale == 1.0 else dataclasses.replace(attrs, size=attrs.size * object_scale)


def size_range(object_scale: float = 1.0) -> tuple[float, float]:
    """Range of ``ClipAttributes.size`` (half-extent / min(H, W)) the renderer makes at a scale."""
    return SIZE_RANGE[0] * object_scale, SIZE_RANGE[1] * object_scale


def make_clip(index: int, split: str, frames: int, height: int, width: int,
              object_scale: float = 1.0) -> tuple[np.ndarray, str, dict]:
    attrs = scaled(attributes_for(index, split), object_scale)
    return render_clip(attrs, frames, height, width), caption_for(attrs), attrs.to_dict()


def all_captions(split: str, num_clips: int, start: int = 0) -> list[str]:
    """Captions of clips [start, start + num_clips) — no rendering needed."""
    return [caption_for(attributes_for(i, split)) for i in range(start, start + num_clips)]


class SyntheticCaptionedVideos(Dataset):
    """Map-style dataset over the first `num_clips` clips of a split.

    Clips are rendered on first access and cached (per process: each DataLoader
    worker keeps its own cache, which is fine since rendering is deterministic).
    """

    def __init__(self, split: str, num_clips: int, frames: int, height: int, width: int, cache: bool = True,
                 object_scale: float = 1.0):
        self.split, self.num_clips = split, int(num_clips)
        self.object_scale = float(object_scale)
        self.frames, self.height, self.width = int(frames), int(height), int(width)
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, str, dict]] = {}

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        item = self._cache.get(index)
        if item is None:
            item = make_clip(index, self.split, self.frames, self.height, self.width, self.object_scale)
            if self.cache:
                self._cache[index] = item
        video, caption, attrs = item
        return {"video": torch.from_numpy(video.copy()), "caption": caption, "attrs": dict(attrs), "index": index}
