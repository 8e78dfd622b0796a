"""Deterministic analyser of one synthetic-style clip: which background, which object colour, which
shape, which way it moves, and how steadily.

It inverts the renderer of ``data/synthetic.py`` without learning anything:

1. background: per-channel median of the border pixels of every frame, refined as the median of the
   pixels not classified as object; named by the nearest palette background;
2. object mask: a pixel is object when it is nearer (RGB) to some palette object colour than to the
   estimated background and at least ``MIN_OBJECT_DISTANCE`` away from the background; per frame,
   the largest 8-connected component is kept (generated clips have speckles);
3. object colour: per-channel median of the kept pixels of all frames, nearest palette colour;
4. shape: the renderer's own masks (``synthetic.shape_mask``) are compared with the kept
   components under a likelihood exp(-BETA (1 - IoU)), with one radius per clip (uniform over the
   renderer's size range) and a sub-pixel centre per frame averaged out; the posterior over the
   four shapes (uniform prior) names the shape. Averaging instead of taking the best fit is what
   separates the shapes at 16x16 (half-extent 2.2 to 3.5 pixels), where e.g. a 5x5 block is a
   square for most radii and alignments but a circle only for one narrow radius at one alignment;
5. direction: least-squares constant-velocity fit of the per-frame centroids; the dominant axis
   and its sign name the direction; the fit's residual measures motion smoothness.

Everything is numpy on uint8 input, so it is exact and repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megatron_starflow.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, shape_mask, size_range

ATTRIBUTES = ("shape", "color", "direction", "background")
CHOICES = {"shape": SHAPES, "color": tuple(COLORS), "direction": DIRECTIONS,
           "background": tuple(BACKGROUNDS)}
CHANCE = {name: 1.0 / len(values) for name, values in CHOICES.items()}
CHANCE["overall"] = math.prod(CHANCE[a] for a in ATTRIBUTES)

_COLOR_RGB = np.array(list(COLORS.values()), dtype=np.float64)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
# Half of the closest object-colour / background pair (green vs darkgreen, ~166): a pixel this far
# from the background cannot be a noisy background pixel of a rendered clip.
MIN_OBJECT_DISTANCE = 0.5 * float(np.min(np.linalg.norm(_COLOR_RGB[:, None] - _BG_RGB[None], axis=-1)))
_CENTER_OFFSETS = np.linspace(-0.75, 0.75, 7)
_N_RADII = 25
_BETA = 40.0  # per-frame likelihood exp(-BETA (1 - IoU)): one wrong pixel of 25 costs a factor 5
_MAX_SHAPE_FRAMES = 8


@dataclass
class ClipAnalysis:
    """What the analyser read from one clip. Attribute fields are None when they cannot be read
    (no object, or no motion for ``direction``)."""

    background: str | None
    color: str | None
    shape: str | None
    direction: str | None
    valid: bool  # an object was found in at least half of the frames
    reason: str  # "" when valid, else why not
    confidence: dict = field(default_factory=dict)  # per attribute, in [0, 1]
    present: np.ndarray | None = None  # [T] bool: object found in that frame
    centers: np.ndarray | None = None  # [T, 2] (x, y) centroid in pixels, nan where absent
    areas: np.ndarray | None = None  # [T] pixels of the kept component (0 where absent)
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per frame (x, y), fitted
    motion_residual_px: float = float("nan")  # RMS distance of centroids from the fitted line
    shape_scores: dict = field(default_factory=dict)  # posterior over shapes (uniform prior)
    background_rgb: tuple = ()
    object_rgb: tuple = ()

    def attributes(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-frame arrays beyond presence and areas)."""
        return {**self.attributes(), "valid": self.valid, "reason": self.reason,
                "confidence": {k: round(float(v), 4) for k, v in self.confidence.items()},
                "present_frames": int(self.present.sum()) if self.present is not None else 0,
                "velocity_px_per_frame": [round(float(v), 4) for v in self.velocity],
                "motion_residual_px": _round(self.motion_residual_px),
                "shape_scores": {k: round(float(v), 4) for k, v in self.shape_scores.items()},
                "background_rgb": [round(float(v), 1) for v in self.background_rgb],
                "object_rgb": [round(float(v), 1) for v in self.object_rgb]}


def _round(v: float, digits: int = 4):
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def _nearest(rgb: np.ndarray, table: np.ndarray, names: tuple) -> tuple[str, float]:
    """Nearest palette entry and a confidence: 1 - d_nearest / d_second (0 = halfway)."""
    d = np.linalg.norm(table - rgb[None], axis=-1)
    order = np.argsort(d, kind="stable")
    conf = 1.0 - d[order[0]] / max(d[order[1]], 1e-9)
    return names[order[0]], float(conf)


def _border(video: np.ndarray) -> np.ndarray:
    top, bottom = video[:, 0], video[:, -1]
    left, right = video[:, 1:-1, 0], video[:, 1:-1, -1]
    return np.concatenate([p.reshape(-1, 3) for p in (top, bottom, left, right)]).astype(np.float64)


def object_mask(video: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """[T, H, W] bool: pixels nearer to a palette colour than to the background and far from it."""
    px = video.astype(np.float64)
    d_bg = np.linalg.norm(px - background_rgb, axis=-1)
    d_col = np.min(np.linalg.norm(px[..., None, :] - _COLOR_RGB, axis=-1), axis=-1)
    return (d_col < d_bg) & (d_bg >= MIN_OBJECT_DISTANCE)


def largest_components(mask: np.ndarray) -> np.ndarray:
    """Per frame, keep only the largest 8-connected component of ``mask`` [T, H, W] (ties: the
    one reaching furthest in raster order), by max-label propagation (vectorised over frames)."""
    t, h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(1, h, w), 0).astype(np.int64)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        best = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(best, padded[:, dy:dy + h, dx:dx + w], out=best)
        best *= mask
        if np.array_equal(best, labels):
            break
        labels = best
    keep = np.zeros_like(mask)
    for i in range(t):
        if not mask[i].any():
            continue
        counts = np.bincount(labels[i].ravel(), minlength=h * w + 1)
        counts[0] = 0
        top = counts.max()
        label = np.flatnonzero(counts == top)[-1]
        keep[i] = labels[i] == label
    return keep


def _logmeanexp(x: np.ndarray, axis) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    out = top + np.log(np.mean(np.exp(x - top), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def _shape_log_evidence(kept: np.ndarray, frames: np.ndarray, side: int,
                        sizes: tuple[float, float]) -> dict[str, float]:
    """log p(masks | shape), up to a shared constant: the renderer's masks of each shape are
    compared with the object masks of ``frames`` under a likelihood exp(-BETA (1 - IoU)) and the
    unknowns are averaged out (not maximised): ONE radius per clip, uniform over the renderer's
    size range, and a sub-pixel centre per frame, uniform around the mask's bounding-box centre.
    Averaging matters at 16x16, where e.g. a 5x5 block of pixels is both a square and a circle of
    one narrow radius at one alignment: the square explains it for most (radius, centre) pairs,
    the circle for few."""
    h, w = kept.shape[1:]
    radii = np.linspace(sizes[0] * 0.9, sizes[1] * 1.1, _N_RADII) * side
    m = 2  # window margin in pixels
    total = {s: np.zeros(len(radii)) for s in SHAPES}
    for i in frames:
        ys, xs = np.nonzero(kept[i])
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        wy0, wy1, wx0, wx1 = max(0, y0 - m), min(h, y1 + m + 1), max(0, x0 - m), min(w, x1 + m + 1)
        window = kept[i, wy0:wy1, wx0:wx1]
        py = np.arange(wy0, wy1, dtype=np.float64) + 0.5  # pixel centres, as in the renderer
        px = np.arange(wx0, wx1, dtype=np.float64) + 0.5
        cx = (x0 + x1 + 1) / 2.0 + _CENTER_OFFSETS
        cy = (y0 + y1 + 1) / 2.0 + _CENTER_OFFSETS
        # grids [Ncy, Ncx, Nr, Hw, Ww]
        dx = px[None, None, None, None, :] - cx[None, :, None, None, None]
        dy = py[None, None, None, :, None] - cy[:, None, None, None, None]
        r = radii[None, None, :, None, None]
        for shape in SHAPES:
            tmpl = shape_mask(shape, dx, dy, r)
            inter = (tmpl & window).sum(axis=(-1, -2))
            union = (tmpl | window).sum(axis=(-1, -2))
            loglik = -_BETA * (1.0 - inter / np.maximum(union, 1))  # [Ncy, Ncx, Nr]
            total[shape] += _logmeanexp(loglik.reshape(-1, len(radii)), axis=0)
    return {s: float(_logmeanexp(total[s], axis=0)) for s in SHAPES}


def analyse_clip(video, min_present_fraction: float = 0.5, object_scale: float = 1.0) -> ClipAnalysis:
    """uint8 video [T, H, W, 3] (numpy or torch) -> ClipAnalysis. ``object_scale``: the renderer's
    (``data.object_scale``), which sets the object sizes the analyser expects."""
    video = np.asarray(video.numpy() if hasattr(video, "numpy") else video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 clip [T, H, W, 3], got shape {video.shape}")
    video = video.astype(np.uint8, copy=False)
    t, h, w, _ = video.shape
    side = min(h, w)

    bg = np.median(_border(video), axis=0)
    mask = object_mask(video, bg)
    if (~mask).any():  # refine on every non-object pixel
        bg = np.median(video[~mask].astype(np.float64), axis=0)
        mask = object_mask(video, bg)
    background, bg_conf = _nearest(bg, _BG_RGB, CHOICES["background"])

    kept = largest_components(mask)
    areas = kept.sum(axis=(1, 2)).astype(np.float64)
    sizes = size_range(object_scale)
    # smallest area: a triangle / diamond of the smallest size (2 r^2); largest: its bounding box
    min_area = max(2.0, 0.3 * 2.0 * sizes[0] ** 2 * side * side)
    max_area = 3.0 * (2.0 * sizes[1]) ** 2 * side * side
    present = (areas >= min_area) & (areas <= max_area)
    areas = np.where(present, areas, 0.0)
    centers = np.full((t, 2), np.nan)
    for i in np.flatnonzero(present):
        ys, xs = np.nonzero(kept[i])
        centers[i] = (xs.mean() + 0.5, ys.mean() + 0.5)

    result = ClipAnalysis(background, None, None, None, False, "", {"background": bg_conf},
                          present, centers, areas, background_rgb=tuple(bg))
    n_present = int(present.sum())
    if n_present == 0:
        result.reason = "no object found in any frame"
        return result

    obj = np.median(video[kept & present[:, None, None]].astype(np.float64), axis=0)
    result.object_rgb = tuple(obj)
    result.color, result.confidence["color"] = _nearest(obj, _COLOR_RGB, CHOICES["color"])

    frames = np.flatnonzero(present)
    if len(frames) > _MAX_SHAPE_FRAMES:  # evenly spaced frames are plenty
        frames = frames[np.linspace(0, len(frames) - 1, _MAX_SHAPE_FRAMES).round().astype(int)]
    evidence = _shape_log_evidence(kept, frames, side, sizes)
    top = max(evidence.values())
    weights = {s: math.exp(evidence[s] - top) for s in SHAPES}
    posterior = {s: weights[s] / sum(weights.values()) for s in SHAPES}
    result.shape_scores = posterior
    result.shape = max(SHAPES, key=lambda s: (posterior[s], -SHAPES.index(s)))
    result.confidence["shape"] = posterior[result.shape]

    if n_present >= 2:
        frames = np.flatnonzero(present).astype(np.float64)
        pts = centers[present]
        design = np.stack([np.ones_like(frames), frames], axis=1)
        coef, *_ = np.linalg.lstsq(design, pts, rcond=None)
        vx, vy = float(coef[1, 0]), float(coef[1, 1])
        fit = design @ coef
        result.velocity = (vx, vy)
        result.motion_residual_px = float(np.sqrt(np.mean(np.sum((pts - fit) ** 2, axis=1))))
        span = frames[-1] - frames[0]
        major = max(abs(vx), abs(vy))
        if major * span >= 1.0:  # moved at least a pixel along its main axis
            if abs(vx) >= abs(vy):
                result.direction = "right" if vx > 0 else "left"
            else:
                result.direction = "down" if vy > 0 else "up"
            result.confidence["direction"] = float(major / (abs(vx) + abs(vy)))
        else:
            result.confidence["direction"] = 0.0

    if n_present < min_present_fraction * t:
        result.reason = f"object found in only {n_present} of {t} frames"
    else:
        result.valid = True
    return result


def score(analysis: ClipAnalysis, truth: dict) -> dict:
    """Per-attribute correctness (bool) against ground-truth attributes, plus ``overall``."""
    right = {a: analysis.valid and getattr(analysis, a) == truth[a] for a in ATTRIBUTES}
    right["background"] = getattr(analysis, "background") == truth["background"]  # needs no object
    right["overall"] = all(right[a] for a in ATTRIBUTES)
    return right


def accuracy(rows: list[dict]) -> dict:
    """Mean of ``score`` rows per key (and the chance level of each)."""
    keys = list(ATTRIBUTES) + ["overall"]
    n = max(len(rows), 1)
    return {k: {"accuracy": sum(bool(r[k]) for r in rows) / n, "chance": CHANCE[k]} for k in keys}
