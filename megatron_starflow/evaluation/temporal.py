"""Temporal consistency figures from analysed clips (see analyser.py), and frame PSNR.

* persistence: the object is found in every frame, and its size (pixel area) stays stable;
* smoothness: RMS distance (pixels) of the per-frame centroids from a constant-velocity fit; the
  renderer's clips move at constant velocity, so ground truth scores ~0 (pixel rounding only).
"""

from __future__ import annotations

import math

import numpy as np

from megatron_starflow.evaluation.analyser import ClipAnalysis


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return round(float(np.mean(values)), 5) if values else None


def temporal_summary(analyses: list[ClipAnalysis], side: int) -> dict:
    """Mean figures over clips. ``side`` = min(H, W), to express distances as fractions of it."""
    present = [a.present.mean() for a in analyses]
    every = [bool(a.present.all()) for a in analyses]
    size_cv, residual, speed = [], [], []
    for a in analyses:
        areas = a.areas[a.present]
        if len(areas) >= 2:
            size_cv.append(areas.std() / max(areas.mean(), 1e-9))
        if a.present.sum() >= 3:
            residual.append(a.motion_residual_px)
        if a.present.sum() >= 2:
            speed.append(math.hypot(*a.velocity))
    res = _mean(residual)
    return {
        "clips": len(analyses),
        "object_present_frame_fraction": _mean(present),
        "object_in_every_frame_fraction": _mean(every),
        "object_size_cv": _mean(size_cv),
        "motion_residual_px": res,
        "motion_residual_frac_of_side": None if res is None else round(res / side, 5),
        "speed_px_per_frame": _mean(speed),
    }


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 255) of two uint8 images / clips."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def finite_or_none(v: float, digits: int = 4):
    return round(float(v), digits) if v is not None and math.isfinite(v) else None
