"""The CPU quality suite: one JSON report and one PNG page for a checkpoint.

``python launch.py eval --checkpoint DIR --suite cpu [--samples N] [--cfg W] [--out report.json]``

Sections (see the modules named): likelihood (held-out bits/dim, per-frame bits/dim: likelihood.py),
denoiser (PSNR / SSIM of noisy, FSM-denoised and score-step clips: denoiser_quality.py), t2v (prompt
adherence + temporal consistency: adherence.py), i2v / v2v (continuation), long_video (drift beyond
the training length). The page (PIL only) shows the sample grids and the curves.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from megatron_starflow.evaluation.adherence import continuation, long_video_drift, t2v_adherence
from megatron_starflow.evaluation.analyser import ATTRIBUTES, CHANCE
from megatron_starflow.evaluation.denoiser_quality import denoiser_quality
from megatron_starflow.evaluation.likelihood import evaluate, per_frame_bits_per_dim


def run_cpu_suite(system, samples: int = 16, guidance: float = 1.0, seed: int = 0,
                  batches: int = 8, condition_clips: int | None = None, long_samples: int | None = None,
                  long_factor: float = 2.0, denoiser_clips: int = 32, score_step: bool = True,
                  solver: str = "jacobi", temperature: float = 1.0,
                  candidates: int = 1) -> tuple[dict, dict]:
    """-> (JSON-ready report, images for the page). ``solver`` and ``temperature`` apply to every
    generated clip (T2V, I2V / V2V continuations, long videos); ``candidates`` (best of N by the
    flow's likelihood ratio) to the T2V samples."""
    from megatron_starflow.data.datasets import make_datasets

    cfg = system.cfg
    heldout = make_datasets(cfg).heldout
    bs = cfg.data.batch_size
    condition_clips = max(1, samples // 2) if condition_clips is None else condition_clips
    long_samples = max(1, samples // 4) if long_samples is None else long_samples
    report, images, seconds = {}, {}, {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.time()
        out = fn(*args, **kwargs)
        seconds[name] = round(time.time() - t0, 2)
        return out

    report["likelihood"] = timed("likelihood", evaluate, system, heldout, batches, bs)
    report["likelihood"].update(timed("per_frame", per_frame_bits_per_dim, system, heldout, batches, bs))
    report["denoiser"] = timed("denoiser", denoiser_quality, system, heldout, denoiser_clips, bs,
                               score_step=score_step)
    t2v, videos, rows = timed("t2v", t2v_adherence, system, samples, guidance, seed, solver=solver,
                                    temperature=temperature, candidates=candidates)
    t2v["per_sample"] = rows
    report["t2v"] = t2v
    images["t2v"], images["t2v_rows"] = videos, rows
    frames = cfg.data.frames // system.codec.temporal_factor
    if condition_clips and frames >= 2:
        given_v2v = system.codec.temporal_factor * max(1, frames // 2)
        for name, given in (("i2v", system.codec.temporal_factor), ("v2v", given_v2v)):
            if name == "v2v" and given == system.codec.temporal_factor:
                continue  # a 2-frame model: V2V is I2V
            rep, gen, truth = timed(name, continuation, system, condition_clips, given, guidance,
                                    seed + 100, solver=solver, temperature=temperature)
            report[name] = rep
            images[name] = (gen, truth, given)
    if long_samples and long_factor > 1:
        rep, long_videos = timed("long_video", long_video_drift, system, long_samples, long_factor,
                                 guidance, seed + 200, solver=solver, temperature=temperature)
        report["long_video"] = rep
        images["long_video"] = long_videos
    report["seconds"] = seconds
    report["summary"] = _summary(report)
    return report, images


def _summary(report: dict) -> dict:
    t2v, den, lik = report["t2v"], report["denoiser"], report["likelihood"]
    out = {
        "t2v_overall_adherence": t2v["accuracy"]["overall"],
        "t2v_overall_chance": round(CHANCE["overall"], 5),
        "t2v_attribute_accuracy": {a: t2v["accuracy"][a] for a in ATTRIBUTES},
        "object_in_every_frame_fraction": t2v["temporal"]["object_in_every_frame_fraction"],
        "heldout_bits_per_dim": round(lik["bits_per_dim"], 5),
        "psnr_noisy_db": den.get("psnr_noisy_db"),
        "psnr_fsm_db": den.get("psnr_fsm_db"),
        "psnr_score_step_db": den.get("psnr_score_step_db"),
    }
    for name in ("i2v", "v2v"):
        if name in report:
            out[f"{name}_next_frame_psnr_db"] = report[name]["next_frame_psnr_db"]
            out[f"{name}_continued_direction_accuracy"] = report[name]["continued_direction_accuracy"]
    if "long_video" in report:
        out["long_video_presence_beyond_training"] = \
            report["long_video"]["beyond_training_length"]["object_present_frame_fraction"]
    return out


# ------------------------------------------------------------------------------------ the page

def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size
        return ImageFont.load_default()


def _grid(videos: np.ndarray, scale: int, gap: int = 2) -> np.ndarray:
    from megatron_starflow.sampling.video_io import frame_grid

    return frame_grid(videos, upscale=scale, gap=gap)


def _line_chart(values: list, title: str, width: int = 360, height: int = 200, ylabel: str = ""):
    """A simple poly-line chart with min / max labels, as a PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(11)
    draw.text((6, 4), title, fill="black", font=font)
    left, top, right, bottom = 56, 24, width - 10, height - 24
    draw.rectangle([left, top, right, bottom], outline="black")
    vals = [float(v) for v in values]
    if vals:
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        pts = []
        for i, v in enumerate(vals):
            x = left + (right - left) * (i / max(len(vals) - 1, 1))
            y = bottom - (bottom - top) * (v - lo) / (hi - lo)
            pts.append((x, y))
        if len(pts) > 1:
            draw.line(pts, fill=(30, 90, 200), width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
        draw.text((4, top - 2), f"{hi:.3g}", fill="black", font=font)
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black", font=font)
        draw.text((left, bottom + 4), "frame 0", fill="black", font=font)
        draw.text((right - 50, bottom + 4), f"frame {len(vals) - 1}", fill="black", font=font)
    if ylabel:
        draw.text((left + 4, top + 2), ylabel, fill=(90, 90, 90), font=font)
    return img


def _bar_chart(items: list[tuple[str, float, float | None]], title: str, width: int = 360,
               height: int = 200, vmax: float | None = None):
    """Bars (label, value, reference-or-None); the reference is drawn as a red tick (e.g. chance)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(11)
    draw.text((6, 4), title, fill="black", font=font)
    left, top, right, bottom = 10, 24, width - 10, height - 30
    values = [v for _, v, _ in items if v is not None] + [r for _, _, r in items if r is not None]
    vmax = vmax or (max(values) if values else 1.0) or 1.0
    slot = (right - left) / max(len(items), 1)
    for i, (label, value, ref) in enumerate(items):
        x0 = left + i * slot + slot * 0.2
        x1 = left + (i + 1) * slot - slot * 0.2
        if value is not None:
            y = bottom - (bottom - top) * max(0.0, min(1.0, value / vmax))
            draw.rectangle([x0, y, x1, bottom], fill=(60, 150, 90))
            draw.text((x0, y - 12), f"{value:.3g}", fill="black", font=font)
        if ref is not None:
            y = bottom - (bottom - top) * max(0.0, min(1.0, ref / vmax))
            draw.line([x0 - 3, y, x1 + 3, y], fill=(220, 30, 30), width=2)
        draw.text((x0, bottom + 4), label[:10], fill="black", font=font)
    draw.line([left, bottom, right, bottom], fill="black")
    return img


def render_page(report: dict, images: dict, title: str = "") -> np.ndarray:
    """The PNG page: grids (T2V with the analyser's reading, I2V / V2V vs truth, long video) and
    charts (adherence vs chance, per-frame bits/dim, denoiser PSNR)."""
    from PIL import Image, ImageDraw

    font = _font(12)
    t2v = images["t2v"]
    side = t2v.shape[2]
    scale = max(1, 48 // side)
    blocks: list[Image.Image] = []

    def caption_block(text: str, width: int, height: int = 18, color="black"):
        img = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(img).text((4, 2), text, fill=color, font=font)
        return img

    # T2V: one row per sample, text on the right
    grid = Image.fromarray(_grid(t2v, scale))
    row_h = side * scale + 2
    text_w = 520
    panel = Image.new("RGB", (grid.width + text_w, grid.height), "white")
    panel.paste(grid, (0, 0))
    draw = ImageDraw.Draw(panel)
    for i, row in enumerate(images["t2v_rows"]):
        read = row["read"]
        ok = row["right"]["overall"]
        draw.text((grid.width + 6, i * row_h + 2), row["caption"], fill="black", font=font)
        got = " ".join(str(read[a]) for a in ("color", "shape", "direction", "background"))
        draw.text((grid.width + 6, i * row_h + 16), f"read: {got}",
                  fill=(20, 140, 40) if ok else (200, 30, 30), font=font)
    rep = report["t2v"]
    blocks.append(caption_block(f"T2V, guidance w={rep['guidance']}: overall adherence "
                                f"{rep['accuracy']['overall']:.2f} (chance {rep['chance']['overall']:.4f})",
                                panel.width))
    blocks.append(panel)
    for name in ("i2v", "v2v"):
        if name not in images:
            continue
        gen, truth, given = images[name]
        n = min(4, len(gen))
        pairs = np.stack([x for k in range(n) for x in (truth[k], gen[k])])
        g = Image.fromarray(_grid(pairs, scale))
        r = report[name]
        blocks.append(caption_block(f"{name.upper()} ({given} given frame(s)); rows: truth, generated | "
                                    f"next-frame PSNR {r['next_frame_psnr_db']} dB (repeat-last "
                                    f"{r['repeat_last_given_frame_psnr_db']} dB), continued direction "
                                    f"{r['continued_direction_accuracy']}", max(g.width, 700)))
        blocks.append(g)
    if "long_video" in images:
        lv = images["long_video"]
        g = Image.fromarray(_grid(lv[:4], max(1, scale // 2)))
        r = report["long_video"]
        blocks.append(caption_block(f"long video: {r['frames']} frames (trained on {r['training_frames']}); "
                                    f"presence beyond training length "
                                    f"{r['beyond_training_length']['object_present_frame_fraction']}",
                                    max(g.width, 700)))
        blocks.append(g)
    # charts
    acc = rep["accuracy"]
    charts = [
        _bar_chart([(a, acc[a], rep["chance"][a]) for a in list(ATTRIBUTES) + ["overall"]],
                   "T2V accuracy (red: chance)", vmax=1.0),
    ]
    lik = report["likelihood"]
    charts.append(_line_chart(lik["per_frame_bits_per_dim"], "held-out bits/dim per latent frame"))
    den = report["denoiser"]
    if "psnr_noisy_db" in den:
        charts.append(_bar_chart([("noisy", den.get("psnr_noisy_db"), None), ("FSM", den.get("psnr_fsm_db"), None),
                                  ("score", den.get("psnr_score_step_db"), None)], "denoiser PSNR (dB)"))
    strip = Image.new("RGB", (sum(c.width for c in charts) + 10 * len(charts), max(c.height for c in charts)),
                      "white")
    x = 0
    for c in charts:
        strip.paste(c, (x, 0))
        x += c.width + 10
    blocks.append(strip)

    width = max(b.width for b in blocks) + 20
    header = caption_block(title, width, 22)
    blocks.insert(0, header)
    height = sum(b.height for b in blocks) + 8 * len(blocks) + 10
    page = Image.new("RGB", (width, height), "white")
    y = 5
    for b in blocks:
        page.paste(b, (10, y))
        y += b.height + 8
    return np.asarray(page)


def write_report(report: dict, images: dict, out_json: str, out_png: str | None, title: str = "") -> dict:
    from megatron_starflow.sampling.video_io import write_png

    paths = {"json": out_json}
    if out_png:
        write_png(out_png, render_page(report, images, title))
        paths["png"] = out_png
    report["files"] = paths
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    tmp = f"{out_json}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    os.replace(tmp, out_json)
    return report


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
