"""The frame analyser on ground-truth synthetic clips (its own accuracy, which the prompt-adherence
figures rest on), SSIM / PSNR, temporal figures, and the exact per-frame bits/dim split."""

import math

import numpy as np
import pytest
import torch

from megatron_starflow.data.synthetic import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, ClipAttributes,
                                              make_clip, render_clip)
from megatron_starflow.evaluation.analyser import ATTRIBUTES, CHANCE, accuracy, analyse_clip, score


def _accuracy_on_heldout(n, frames, size, noise=0.0):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        video, _, attrs = make_clip(i, "heldout", frames, size, size)
        if noise:
            video = np.clip(video + rng.normal(0, noise, video.shape), 0, 255).astype(np.uint8)
        rows.append(score(analyse_clip(video), attrs))
    return {k: v["accuracy"] for k, v in accuracy(rows).items()}


@pytest.mark.parametrize("n, frames, size", [(200, 8, 16), (50, 16, 32)])
def test_analyser_accuracy_on_ground_truth(n, frames, size):
    acc = _accuracy_on_heldout(n, frames, size)
    print(f"\nanalyser on {n} held-out ground-truth clips {size}x{size}x{frames}: "
          + ", ".join(f"{k} {acc[k]:.3f} (chance {CHANCE[k]:.4f})" for k in acc))
    for a in ATTRIBUTES:
        assert acc[a] >= 0.95, (a, acc)
    assert acc["overall"] >= 0.9


def test_analyser_tolerates_pixel_noise():
    """Gaussian pixel noise of the training sigma (0.1 on [-1, 1] = 12.8 levels)."""
    acc = _accuracy_on_heldout(60, 8, 16, noise=12.8)
    for a in ATTRIBUTES:
        assert acc[a] >= 0.95, (a, acc)


def test_chance_levels():
    assert CHANCE["shape"] == 1 / len(SHAPES) and CHANCE["direction"] == 1 / len(DIRECTIONS)
    assert CHANCE["color"] == 1 / len(COLORS) and CHANCE["background"] == 1 / len(BACKGROUNDS)
    assert math.isclose(CHANCE["overall"], 1 / (len(SHAPES) * len(DIRECTIONS) * len(COLORS) * len(BACKGROUNDS)))


def test_analyser_every_combination_at_16px():
    """Every shape x colour x background (16x16, 8 frames), directions in turn, positions / sizes /
    speeds drawn as the data does. (At 16 px a few placements are truly ambiguous: e.g. a circle
    of radius 2.9 centred on a pixel corner in every frame renders exactly as a diamond of radius
    3.2, so a handful of misses is allowed; random held-out clips score 100 %.)"""
    from megatron_starflow.data.synthetic import sample_attributes

    rng = np.random.default_rng(7)
    wrong = []
    k = 0
    for shape in SHAPES:
        for color in COLORS:
            for bg in BACKGROUNDS:
                direction = DIRECTIONS[k % 4]
                k += 1
                base = sample_attributes(rng)
                while base.direction != direction:
                    base = sample_attributes(rng)
                attrs = ClipAttributes(shape, color, direction, bg, base.start_x, base.start_y,
                                       base.speed, base.size)
                a = analyse_clip(render_clip(attrs, 8, 16, 16))
                if a.attributes() != {x: getattr(attrs, x) for x in ATTRIBUTES} or not a.valid:
                    wrong.append((attrs, a.attributes()))
    assert len(wrong) <= 3, wrong[:3]


def test_analyser_invalid_and_static_cases():
    empty = np.zeros((6, 16, 16, 3), np.uint8)
    empty[:] = BACKGROUNDS["navy"]
    a = analyse_clip(empty)
    assert not a.valid and a.reason and a.background == "navy"
    assert a.color is None and a.shape is None and a.direction is None
    assert score(a, {"shape": "circle", "color": "red", "direction": "up", "background": "navy"}) == \
        {"shape": False, "color": False, "direction": False, "background": True, "overall": False}
    # static object: no direction, but colour and shape are read
    attrs = ClipAttributes("square", "red", "right", "gray", 0.5, 0.5, 0.0, 0.2)
    s = analyse_clip(render_clip(attrs, 6, 16, 16))
    assert s.valid and s.direction is None and s.color == "red" and s.shape == "square"
    # object only in the first frame: present there, invalid overall
    video = render_clip(ClipAttributes("circle", "white", "up", "black", 0.5, 0.5, 0.5, 0.2), 6, 16, 16)
    video[1:] = 0
    p = analyse_clip(video)
    assert p.present.tolist() == [True] + [False] * 5 and not p.valid
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        analyse_clip(np.zeros((16, 16, 3), np.uint8))


def test_analyser_deterministic_and_accepts_torch():
    video, _, attrs = make_clip(3, "heldout", 8, 16, 16)
    a, b = analyse_clip(video), analyse_clip(torch.from_numpy(video))
    assert a.to_dict() == b.to_dict()
    assert np.array_equal(a.centers, b.centers)
    d = a.to_dict()
    assert set(ATTRIBUTES) <= set(d) and 0.0 <= d["confidence"]["shape"] <= 1.0
    assert math.isclose(sum(a.shape_scores.values()), 1.0, rel_tol=1e-9)


def test_analyser_velocity_matches_renderer():
    from megatron_starflow.data.synthetic import attributes_for, object_centers

    for i in range(5):
        attrs = attributes_for(i, "heldout")
        video = render_clip(attrs, 16, 32, 32)
        centers = object_centers(attrs, 16, 32, 32)
        true_v = (centers[-1] - centers[0]) / 15
        a = analyse_clip(video)
        assert np.allclose(a.velocity, true_v, atol=0.15), (a.velocity, true_v)


def test_temporal_summary_on_ground_truth():
    from megatron_starflow.evaluation.temporal import frame_psnr, temporal_summary

    clips = [analyse_clip(make_clip(i, "heldout", 8, 16, 16)[0]) for i in range(12)]
    t = temporal_summary(clips, 16)
    assert t["object_present_frame_fraction"] == 1.0 and t["object_in_every_frame_fraction"] == 1.0
    assert t["motion_residual_px"] < 0.5 and t["object_size_cv"] < 0.15
    assert t["speed_px_per_frame"] > 0.3
    a = make_clip(0, "heldout", 2, 16, 16)[0]
    assert frame_psnr(a[0], a[0]) == float("inf") and 0 < frame_psnr(a[0], a[1]) < 60


def test_ssim_and_psnr():
    from megatron_starflow.evaluation.denoiser_quality import gaussian_window, ssim
    from megatron_starflow.evaluation.likelihood import psnr

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 16, 16, 3, generator=g, dtype=torch.float64) * 2 - 1
    clean = torch.nn.functional.avg_pool2d(clean.reshape(-1, 16, 16, 3).permute(0, 3, 1, 2), 3, 1, 1)
    clean = clean.permute(0, 2, 3, 1).reshape(2, 3, 16, 16, 3)
    assert math.isclose(ssim(clean, clean), 1.0, abs_tol=1e-12)
    w = gaussian_window(11, 1.5)
    assert math.isclose(w.sum().item(), 1.0) and torch.equal(w, w.T)
    values = []
    for sigma in (0.02, 0.1, 0.3):
        noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
        s = ssim(noisy, clean)
        assert math.isclose(s, ssim(clean, noisy), rel_tol=1e-12)
        values.append((s, psnr(noisy, clean)))
    assert values[0][0] > values[1][0] > values[2][0] > -1
    assert values[0][1] > values[1][1] > values[2][1]
    assert abs(values[1][1] - 10 * math.log10(4 / 0.01)) < 0.3  # sigma 0.1 -> 26 dB
    # frames smaller than the window: it shrinks
    small = torch.zeros(1, 4, 5, 3)
    assert math.isclose(ssim(small, small), 1.0)


def test_per_frame_bits_split_is_exact_and_conditional(make_model, randn):
    """Per-frame bits/dim average to the model's bits/dim, and the first n frames' shares sum to
    the NLL of the n-frame clip (frame n's share is -log p(x_n | x_<n)); the model is untouched."""
    from megatron_starflow.evaluation.likelihood import frame_nll_bits

    model = make_model(head_std=0.2)
    x = randn(2, 5, 2, 3, model.cfg.token_channels, seed=1)
    text = randn(2, model.cfg.text_length, model.cfg.text_width, seed=2)
    per_frame = frame_nll_bits(model, x, text)
    assert per_frame.shape == (2, 5)
    with torch.no_grad():
        total = model(x, text).bits_per_dim()
        assert torch.allclose(per_frame.mean(1), total, atol=1e-10)
        for n in range(1, 5):
            assert torch.allclose(per_frame[:, :n].sum(1), model(x[:, :n], text).bits_per_dim() * n,
                                  atol=1e-9)
    assert all("head" not in vars(b) for b in model.blocks)
    # changing frame 3 leaves the shares of frames 0..2 unchanged (causality)
    y = x.clone()
    y[:, 3] += 0.5
    other = frame_nll_bits(model, y, text)
    assert torch.allclose(other[:, :3], per_frame[:, :3], atol=1e-10)
    assert (other[:, 3] - per_frame[:, 3]).abs().max() > 1e-3
