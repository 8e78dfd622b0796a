"""Tests for procedural captioned clips and the make_synthetic_data tool."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_starflow.data.synthetic import (
    BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, ClipAttributes, SyntheticCaptionedVideos, all_captions,
    attributes_for, caption_for, make_clip, render_clip,
)

REPO = Path(__file__).resolve().parent.parent


def object_mask(video: np.ndarray, background: str) -> np.ndarray:
    return (video != np.asarray(BACKGROUNDS[background], dtype=np.uint8)).any(-1)


def centroids(video: np.ndarray, background: str) -> np.ndarray:
    """(x, y) centroid of non-background pixels per frame, [T, 2]."""
    out = []
    for m in object_mask(video, background):
        ys, xs = np.nonzero(m)
        out.append((xs.mean(), ys.mean()))
    return np.asarray(out)


def test_deterministic():
    a = make_clip(7, "train", 8, 16, 16)
    b = make_clip(7, "train", 8, 16, 16)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]


def test_train_heldout_disjoint():
    n = 200
    train = {tuple(sorted(attributes_for(i, "train").to_dict().items())) for i in range(n)}
    held = {tuple(sorted(attributes_for(i, "heldout").to_dict().items())) for i in range(n)}
    assert not train & held
    # Clips themselves differ too (same index, different split).
    assert make_clip(0, "train", 8, 16, 16)[0].tobytes() != make_clip(0, "heldout", 8, 16, 16)[0].tobytes()


def test_caption_matches_attrs():
    for i in range(50):
        _, caption, attrs = make_clip(i, "train", 4, 16, 16)
        assert caption == (f"a {attrs['color']} {attrs['shape']} moves {attrs['direction']} "
                           f"on a {attrs['background']} background")
        assert caption == caption_for(ClipAttributes.from_dict(attrs))
        assert attrs["shape"] in SHAPES and attrs["color"] in COLORS
        assert attrs["direction"] in DIRECTIONS and attrs["background"] in BACKGROUNDS


def test_attribute_coverage():
    captions = all_captions("train", 400)
    for word in (*SHAPES, *COLORS, *DIRECTIONS, *BACKGROUNDS):
        assert any(f" {word} " in f" {c} " for c in captions), word


@pytest.mark.parametrize("frames,height,width", [(8, 16, 16), (32, 64, 64), (5, 24, 40)])
def test_shapes_and_motion(frames, height, width):
    for i in range(40):
        video, _, attrs = make_clip(i, "train", frames, height, width)
        assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
        mask = object_mask(video, attrs["background"])
        counts = mask.reshape(frames, -1).sum(1)
        assert (counts > 0).all(), "object visible in every frame"
        # Object stays inside: it never touches all of a border row/col and its
        # area stays roughly constant (no clipping at the edges).
        assert counts.min() >= 0.7 * counts.max()
        # Object pixels have exactly the object colour.
        assert (video[mask] == np.asarray(COLORS[attrs["color"]])).all()
        c = centroids(video, attrs["background"])
        dx, dy = c[-1] - c[0]
        d = attrs["direction"]
        if d in ("left", "right"):
            assert (dx < 0) == (d == "left") and abs(dx) > abs(dy) and abs(dx) >= 1.0
            step = np.diff(c[:, 0])
        else:
            assert (dy < 0) == (d == "up") and abs(dy) > abs(dx) and abs(dy) >= 1.0
            step = np.diff(c[:, 1])
        # Monotone motion (constant speed up to pixel quantisation).
        assert (np.sign(step) * np.sign(step.sum()) >= 0).all()


def test_render_constant_speed_large():
    attrs = ClipAttributes("circle", "red", "right", "black", 0.0, 0.5, 1.0, 0.15)
    video = render_clip(attrs, 11, 64, 64)
    c = centroids(video, "black")
    step = np.diff(c[:, 0])
    assert np.allclose(step, step.mean(), atol=1.0)
    assert np.allclose(c[:, 1], c[0, 1])


def test_dataset():
    ds = SyntheticCaptionedVideos("train", 5, 4, 16, 16)
    assert len(ds) == 5
    item = ds[3]
    assert item["video"].dtype == torch.uint8 and item["video"].shape == (4, 16, 16, 3)
    assert item["index"] == 3 and isinstance(item["caption"], str) and isinstance(item["attrs"], dict)
    video, caption, attrs = make_clip(3, "train", 4, 16, 16)
    assert np.array_equal(ds[3]["video"].numpy(), video) and ds[3]["caption"] == caption
    with pytest.raises(IndexError):
        ds[5]


def run_tool(out: Path, fmt: str, num: int = 3):
    cmd = [sys.executable, "tools/make_synthetic_data.py", "--out", str(out), "--split", "heldout", "--num",
           str(num), "--frames", "6", "--height", "16", "--width", "16", "--format", fmt]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_tool_npy_roundtrip(tmp_path):
    records = run_tool(tmp_path, "npy")
    assert len(records) == 3
    for i, rec in enumerate(records):
        video, caption, attrs = make_clip(i, "heldout", 6, 16, 16)
        assert rec["caption"] == caption and rec["attributes"] == attrs
        assert np.array_equal(np.load(tmp_path / rec["file"]), video)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left behind"


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="imageio-ffmpeg not installed")
def test_tool_webm_roundtrip(tmp_path):
    import imageio.v3 as iio

    records = run_tool(tmp_path, "webm", num=2)
    for i, rec in enumerate(records):
        assert rec["file"].endswith(".webm")
        decoded = iio.imread(tmp_path / rec["file"], plugin="FFMPEG")
        video, _, _ = make_clip(i, "heldout", 6, 16, 16)
        assert decoded.shape == video.shape
        # Lossless VP9 (4:4:4); allow for the RGB<->YUV rounding.
        assert np.abs(decoded.astype(int) - video.astype(int)).max() <= 8
