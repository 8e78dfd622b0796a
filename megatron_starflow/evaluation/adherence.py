"""Prompt adherence and temporal behaviour of generated clips, scored by the analyser.

* T2V: samples for held-out captions (guidance weight ``w``), analysed; accuracy per attribute and
  overall (all four right) against the caption, with chance levels; temporal consistency of the
  samples next to the same figures for the ground-truth clips of those captions.
* I2V / V2V: the first ``given`` frames of a held-out clip are given; the PSNR of the first
  generated frame vs the clip's true next frame (and of all generated frames vs the true ones),
  next to the "repeat the last given frame" baseline; whether the generated frames keep moving the
  clip's way (direction and speed of the generated part, last given frame included).
* long video: T2V of ``factor`` x the training length (sliding window); attribute agreement and
  object presence within the training length vs beyond it. The renderer never shows an object
  beyond its path, so there is no ground truth past the training length, only the caption.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_starflow.data.synthetic import attributes_for, caption_for, render_clip, scaled
from megatron_starflow.evaluation.analyser import ATTRIBUTES, CHANCE, ClipAnalysis, accuracy, analyse_clip, score
from megatron_starflow.evaluation.temporal import finite_or_none, frame_psnr, temporal_summary
from megatron_starflow.sampling.rerank import generate_best_of
from megatron_starflow.sampling.jacobi import SolverOptions

SPLIT = "heldout"


def heldout_cases(n: int, start: int = 0) -> list[tuple[str, dict]]:
    """(caption, attributes) of held-out clips start .. start + n - 1."""
    out = []
    for i in range(start, start + n):
        attrs = attributes_for(i, SPLIT)
        out.append((caption_for(attrs), attrs.to_dict()))
    return out


def ground_truth(index: int, frames: int, height: int, width: int, object_scale: float = 1.0) -> np.ndarray:
    return render_clip(scaled(attributes_for(index, SPLIT), object_scale), frames, height, width)


def _analyse(system, video) -> ClipAnalysis:
    """The analyser, told the object sizes the model was trained on."""
    return analyse_clip(video, object_scale=system.cfg.data.object_scale)


def _generate_batched(system, captions, batch_size, seed, opts, frames=None, prefix=None,
                      temperature: float = 1.0, candidates: int = 1):
    videos, seconds = [], 0.0
    for k, start in enumerate(range(0, len(captions), batch_size)):
        chunk = captions[start:start + batch_size]
        pre = None if prefix is None else prefix[start:start + batch_size]
        out = generate_best_of(system, chunk, candidates, seed=seed + k, frames=frames, opts=opts,
                               prefix_video=pre, temperature=temperature)
        videos.append(out.video.numpy())
        seconds += out.seconds.get("total", 0.0)
    return np.concatenate(videos), seconds


def _options(guidance: float, solver: str = "jacobi") -> SolverOptions:
    return SolverOptions(solver=solver, guidance=guidance)


def t2v_adherence(system, samples: int, guidance: float, seed: int = 0, batch_size: int = 16,
                  solver: str = "jacobi", temperature: float = 1.0,
                  candidates: int = 1) -> tuple[dict, np.ndarray, list[dict]]:
    """-> (report, videos uint8 [N, T, H, W, 3], per-sample rows). ``temperature`` scales the
    prior noise z (1: the model's own distribution; below 1 trades diversity for fidelity);
    ``candidates`` > 1 keeps the best of that many samples per caption by the flow's own
    likelihood ratio (``sampling/rerank.py``)."""
    d = system.cfg.data
    cases = heldout_cases(samples)
    captions = [c for c, _ in cases]
    videos, seconds = _generate_batched(system, captions, batch_size, seed, _options(guidance, solver),
                                        temperature=temperature, candidates=candidates)
    analyses = [_analyse(system, v) for v in videos]
    rows, sample_rows = [], []
    for (caption, truth), a in zip(cases, analyses):
        right = score(a, truth)
        rows.append(right)
        sample_rows.append({"caption": caption, "read": a.attributes(), "valid": a.valid,
                            "right": {k: bool(v) for k, v in right.items()}})
    # The same captions' ground-truth clips through the same analyser: the ceiling / reference.
    gt = [_analyse(system, ground_truth(i, d.frames, d.height, d.width, d.object_scale))
          for i in range(samples)]
    gt_rows = [score(a, truth) for a, (_, truth) in zip(gt, cases)]
    side = min(d.height, d.width)
    report = {
        "samples": samples, "guidance": guidance, "solver": solver, "seed": seed,
        "temperature": temperature, "candidates": candidates, "generation_seconds": round(seconds, 2),
        "accuracy": {k: round(v["accuracy"], 4) for k, v in accuracy(rows).items()},
        "chance": {k: round(v, 5) for k, v in CHANCE.items()},
        "analyser_accuracy_on_ground_truth": {k: round(v["accuracy"], 4)
                                              for k, v in accuracy(gt_rows).items()},
        "valid_fraction": round(float(np.mean([a.valid for a in analyses])), 4),
        "temporal": temporal_summary(analyses, side),
        "temporal_ground_truth": temporal_summary(gt, side),
    }
    return report, videos, sample_rows


def continuation(system, clips: int, given: int, guidance: float, seed: int = 100,
                 batch_size: int = 16, solver: str = "jacobi",
                 temperature: float = 1.0) -> tuple[dict, np.ndarray, np.ndarray]:
    """I2V (``given`` = 1) or V2V: -> (report, generated [N, T, ...], ground truth [N, T, ...])."""
    d = system.cfg.data
    if not 0 < given < d.frames:
        raise ValueError(f"given frames {given} must be between 1 and {d.frames - 1}")
    cases = heldout_cases(clips)
    truth = np.stack([ground_truth(i, d.frames, d.height, d.width, d.object_scale) for i in range(clips)])
    prefix = torch.from_numpy(truth[:, :given].copy())
    videos, seconds = _generate_batched(system, [c for c, _ in cases], batch_size, seed,
                                        _options(guidance, solver), prefix=prefix,
                                        temperature=temperature)
    next_psnr = [frame_psnr(v[given], t[given]) for v, t in zip(videos, truth)]
    rest_psnr = [frame_psnr(v[given:], t[given:]) for v, t in zip(videos, truth)]
    copy_psnr = [frame_psnr(t[given - 1], t[given]) for t in truth]
    direction_right, speed_ratio, attrs_right, present = [], [], {a: [] for a in ATTRIBUTES}, []
    for v, t, (_, attrs) in zip(videos, truth, cases):
        part = _analyse(system, v[given - 1:])  # the last given frame anchors the continued motion
        present.append(float(part.present[1:].mean()))
        direction_right.append(part.direction == attrs["direction"])
        true_part = _analyse(system, t[given - 1:])
        true_speed = math.hypot(*true_part.velocity)
        if part.present.sum() >= 2 and true_speed > 0:
            speed_ratio.append(math.hypot(*part.velocity) / true_speed)
        whole = score(_analyse(system, v), attrs)
        for a in ATTRIBUTES:
            attrs_right[a].append(bool(whole[a]))
    report = {
        "clips": clips, "given_frames": given, "guidance": guidance, "seed": seed,
        "temperature": temperature,
        "generation_seconds": round(seconds, 2),
        "next_frame_psnr_db": _mean_finite(next_psnr),
        "generated_frames_psnr_db": _mean_finite(rest_psnr),
        "repeat_last_given_frame_psnr_db": _mean_finite(copy_psnr),
        "next_frame_psnr_kind": "uint8 RGB, peak 255, vs the same synthetic clip's true frame",
        "object_present_in_generated_frames": round(float(np.mean(present)), 4),
        "continued_direction_accuracy": round(float(np.mean(direction_right)), 4),
        "speed_ratio_generated_over_true": _mean_finite(speed_ratio),
        "attribute_accuracy_whole_clip": {a: round(float(np.mean(v)), 4) for a, v in attrs_right.items()},
    }
    return report, videos, truth


def long_video_drift(system, samples: int, factor: float, guidance: float, seed: int = 200,
                     batch_size: int = 16, solver: str = "jacobi",
                     temperature: float = 1.0) -> tuple[dict, np.ndarray]:
    """T2V of ``factor`` x the training length; figures within vs beyond the training length."""
    d = system.cfg.data
    k = system.codec.temporal_factor
    frames = int(round(d.frames * factor / k)) * k
    if frames <= d.frames:
        raise ValueError(f"long-video factor {factor} gives {frames} frames, not beyond {d.frames}")
    cases = heldout_cases(samples)
    videos, seconds = _generate_batched(system, [c for c, _ in cases], batch_size, seed,
                                        _options(guidance, solver), frames=frames,
                                        temperature=temperature)
    parts = {"within_training_length": slice(0, d.frames), "beyond_training_length": slice(d.frames, frames)}
    report = {"samples": samples, "frames": frames, "training_frames": d.frames, "guidance": guidance,
              "seed": seed, "temperature": temperature, "generation_seconds": round(seconds, 2)}
    for name, span in parts.items():
        analyses = [_analyse(system, v[span]) for v in videos]
        agree = {}
        for a in ("color", "background", "shape"):
            agree[a] = round(float(np.mean([getattr(x, a) == truth[a] for x, (_, truth) in
                                             zip(analyses, cases)])), 4)
        report[name] = {
            "frames": span.stop - span.start,
            "object_present_frame_fraction": round(float(np.mean([x.present.mean() for x in analyses])), 4),
            "caption_agreement": agree,
            "object_rgb_mean": _mean_rgb([x.object_rgb for x in analyses]),
        }
    # Drift of the object's colour between the two parts, per clip (RGB distance, 0..441).
    drift = []
    for v in videos:
        a, b = _analyse(system, v[:d.frames]), _analyse(system, v[d.frames:])
        if a.object_rgb and b.object_rgb:
            drift.append(float(np.linalg.norm(np.subtract(a.object_rgb, b.object_rgb))))
    report["object_rgb_drift"] = _mean_finite(drift)
    return report, videos


def _mean_finite(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return finite_or_none(float(np.mean(values))) if values else None


def _mean_rgb(values) -> list | None:
    values = [v for v in values if v]
    return [round(float(c), 1) for c in np.mean(values, axis=0)] if values else None
