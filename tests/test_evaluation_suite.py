"""The CPU quality suite on a tiny random-weight system: report structure, determinism,
consistency with likelihood.evaluate, and the ``launch.py eval --suite cpu`` command (plain ``eval``
keeps its output). Every figure is checked against a reference that a wrong implementation
misses: SSIM against scikit-image, PSNR against its formula and a noise bound derived from sigma,
the score step of an identity flow against its closed form, prompt adherence of ground-truth
"generations" against the analyser's own ceiling, and the page against the sampled videos. The
``*_rejects_*`` tests break the code on purpose (SSIM with the wrong window / constants / range,
adherence scored against shuffled captions, a page without the samples) and show the checks fail."""

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers_system import TINY_SYSTEM

from megatron_starflow.evaluation.analyser import ATTRIBUTES, CHANCE

SYSTEM = TINY_SYSTEM + ["model.noise_std=0.1", "data.num_heldout_clips=8", "data.batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite_env(tmp_path_factory, megatron_ready):
    """(system, run folder, step folder): random flow and denoiser heads, saved as step 0."""
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    run_dir = str(tmp_path_factory.mktemp("eval_run"))
    cfg = load_config(None, SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in list(system.model.blocks) + [system.model.learnable_self_denoiser]:
            for p in (module.proj_out.weight, module.proj_out.bias, module.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    system.eval()
    step_dir = save_system_checkpoint(run_dir, 0, cfg, system,
                               tokenizer_file=tokenizer_path(cfg, run_dir))
    return system, run_dir, step_dir


def _in01(v):
    return v is not None and 0.0 <= v <= 1.0


def test_t2v_adherence_structure_and_determinism(suite_env):
    from megatron_starflow.evaluation.adherence import t2v_adherence

    system = suite_env[0]
    rep, videos, rows = t2v_adherence(system, 3, guidance=1.0, seed=5, batch_size=2)
    assert videos.shape == (3, 4, 8, 8, 3) and videos.dtype == np.uint8
    assert len(rows) == 3 and all(set(r["right"]) == set(ATTRIBUTES) | {"overall"} for r in rows)
    from megatron_starflow.evaluation.adherence import ground_truth, heldout_cases
    from megatron_starflow.evaluation.analyser import analyse_clip, score

    d = system.cfg.data
    truth_rows = [score(analyse_clip(ground_truth(i, d.frames, d.height, d.width)), attrs)
                  for i, (_, attrs) in enumerate(heldout_cases(3))]
    for k in list(ATTRIBUTES) + ["overall"]:
        # the report's accuracies are the means of its per-sample rows / of the truth's rows
        assert rep["accuracy"][k] == round(np.mean([r["right"][k] for r in rows]), 4)
        assert rep["analyser_accuracy_on_ground_truth"][k] == round(np.mean([r[k] for r in truth_rows]), 4)
        assert rep["chance"][k] == round(CHANCE[k], 5)
    assert rep["temporal_ground_truth"]["object_present_frame_fraction"] == 1.0
    t = rep["temporal"]
    assert _in01(t["object_present_frame_fraction"]) and _in01(t["object_in_every_frame_fraction"])
    again, videos2, _ = t2v_adherence(system, 3, guidance=1.0, seed=5, batch_size=2)
    assert np.array_equal(videos, videos2)
    again.pop("generation_seconds"), rep.pop("generation_seconds")
    assert again == rep
    _, other, _ = t2v_adherence(system, 3, guidance=1.0, seed=6, batch_size=2)
    assert not np.array_equal(other, videos)


class _TruthSystem:
    """Stands in for a model whose samples are perfect: ``generate`` of a held-out caption renders
    that caption's ground-truth clip (8 frames of 16x16, where the analyser reads >= 95 %)."""

    def __init__(self, samples: int, object_scale: float = 1.0):
        from types import SimpleNamespace

        from megatron_starflow.evaluation.adherence import heldout_cases

        self.cfg = SimpleNamespace(data=SimpleNamespace(frames=8, height=16, width=16,
                                                        object_scale=object_scale))
        self.index = {}  # caption -> its held-out indices (a caption can repeat), used in order
        for i, (caption, _) in enumerate(heldout_cases(samples)):
            self.index.setdefault(caption, []).append(i)

    def generate(self, system, captions, frames=None, seed=0, opts=None, prefix_video=None,
                 temperature=1.0):
        from types import SimpleNamespace

        from megatron_starflow.evaluation.adherence import ground_truth

        d = self.cfg.data
        video = np.stack([ground_truth(self.index[c].pop(0), d.frames, d.height, d.width, d.object_scale)
                          for c in captions])
        return SimpleNamespace(video=torch.from_numpy(video), seconds={"total": 0.0})


def _check_adherence_of_truth(monkeypatch, samples: int = 12, object_scale: float = 1.0) -> dict:
    """With perfect samples the adherence report must equal the analyser's ceiling (the same
    clips scored against the same captions), attribute by attribute, and be far above chance."""
    from megatron_starflow.evaluation import adherence

    system = _TruthSystem(samples, object_scale)
    monkeypatch.setattr(adherence, "generate_best_of",
                        lambda sys_, captions, candidates, **kw: system.generate(sys_, captions, **kw))
    rep, videos, rows = adherence.t2v_adherence(system, samples, guidance=0.0, batch_size=5)
    assert videos.shape == (samples, 8, 16, 16, 3)
    assert rep["accuracy"] == rep["analyser_accuracy_on_ground_truth"], "adherence != ceiling"
    assert rep["temporal"] == rep["temporal_ground_truth"], "temporal != ceiling"
    assert rep["accuracy"]["overall"] >= 0.9 and rep["valid_fraction"] == 1.0
    return rep


def test_adherence_of_ground_truth_samples_is_the_analyser_ceiling(monkeypatch):
    _check_adherence_of_truth(monkeypatch)


def test_adherence_ceiling_with_larger_objects(monkeypatch):
    """data.object_scale reaches both the ground truth and the analyser of the report."""
    rep = _check_adherence_of_truth(monkeypatch, object_scale=1.6)
    assert rep["accuracy"]["shape"] >= 0.95


def test_adherence_check_rejects_shuffled_captions(monkeypatch):
    """Break the pairing on purpose: every sample is generated for the next caption (as if
    captions were shuffled between generation and scoring). The check must fail."""
    from megatron_starflow.evaluation import adherence

    real = adherence._generate_batched

    def rotated(system, captions, *args, **kwargs):
        return real(system, captions[1:] + captions[:1], *args, **kwargs)

    monkeypatch.setattr(adherence, "_generate_batched", rotated)
    with pytest.raises(AssertionError, match="adherence != ceiling"):
        _check_adherence_of_truth(monkeypatch)


@pytest.mark.parametrize("given", [1, 2])
def test_continuation_report(suite_env, given):
    from megatron_starflow.evaluation.adherence import continuation

    system = suite_env[0]
    rep, gen, truth = continuation(system, 2, given, guidance=0.0, seed=1)
    assert gen.shape == truth.shape == (2, 4, 8, 8, 3)
    assert np.array_equal(gen[:, :given], truth[:, :given])  # the given frames come back unchanged
    assert rep["given_frames"] == given
    assert 0 < rep["next_frame_psnr_db"] < 60 and 0 < rep["repeat_last_given_frame_psnr_db"] < 60
    assert _in01(rep["continued_direction_accuracy"]) and _in01(rep["object_present_in_generated_frames"])
    with pytest.raises(ValueError, match="given frames"):
        continuation(system, 1, 4, guidance=0.0)


def test_long_video_report(suite_env):
    from megatron_starflow.evaluation.adherence import long_video_drift

    rep, videos = long_video_drift(suite_env[0], 1, 2.0, guidance=0.0, seed=3)
    assert videos.shape == (1, 8, 8, 8, 3) and rep["frames"] == 8 and rep["training_frames"] == 4
    for part in ("within_training_length", "beyond_training_length"):
        assert rep[part]["frames"] == 4 and _in01(rep[part]["object_present_frame_fraction"])
        assert all(_in01(v) for v in rep[part]["caption_agreement"].values())


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """scikit-image's SSIM (Wang et al. 2004: Gaussian window sigma 1.5, 11 taps, population
    covariances) per frame, channels last, data range 2, averaged over frames. Frames smaller
    than 11 pixels use our documented rule: the largest odd window that fits, sigma scaled."""
    from skimage.metrics import structural_similarity

    h, w = a.shape[-3:-1]
    size = min(11, h if h % 2 else h - 1, w if w % 2 else w - 1)
    sigma = 1.5 * size / 11
    x = a.double().reshape(-1, h, w, 3).numpy()
    y = b.double().reshape(-1, h, w, 3).numpy()
    return float(np.mean([structural_similarity(p, q, data_range=2.0, channel_axis=-1, win_size=size,
                                                gaussian_weights=True, sigma=sigma,
                                                use_sample_covariance=False) for p, q in zip(x, y)]))


def _ssim_cases():
    """Image pairs in [-1, 1]: noise at three levels, a synthetic clip and a noisy copy, an image
    and its mirror about its mean (SSIM near -1), identical images; 32x32, a 2-frame 16x24 video and 8x8 (shrunk window)."""
    from megatron_starflow.data.synthetic import make_clip

    g = torch.Generator().manual_seed(0)
    out = []
    for shape in [(32, 32, 3), (2, 16, 24, 3), (8, 8, 3)]:
        a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        for sigma in (0.05, 0.3, 1.0):
            out.append((a, (a + sigma * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)))
        half = (a + 1) / 2  # in [0, 1]: its mirror 1 - half has the same local means, opposite structure
        out.append((half, 1 - half))
        out.append((a, a.clone()))
    clip = torch.from_numpy(make_clip(3, "heldout", 2, 32, 32)[0]).double() / 127.5 - 1
    out.append((clip, (clip + 0.1 * torch.randn(clip.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)))
    return out


def _check_ssim(ssim_fn) -> None:
    values = []
    for a, b in _ssim_cases():
        ours, ref = ssim_fn(a, b), _sk_ssim(a, b)
        assert abs(ours - ref) < 1e-9, (tuple(a.shape), ours, ref)
        values.append(ref)
    assert max(values) == 1.0 and min(values) < 0  # identical pairs, negatives: the range is used


def test_ssim_matches_scikit_image():
    from megatron_starflow.evaluation.denoiser_quality import ssim

    _check_ssim(ssim)


def _box_window(size: int, sigma: float) -> torch.Tensor:
    return torch.full((size, size), 1.0 / size**2, dtype=torch.float64)


@pytest.mark.parametrize("broken", ["box window", "7-tap window", "sigma 3", "data range 1",
                                    "K1/K2 swapped"])
def test_ssim_check_rejects_broken_ssim(broken, monkeypatch):
    import functools

    from megatron_starflow.evaluation import denoiser_quality as dq

    fn = dq.ssim
    if broken == "box window":
        monkeypatch.setattr(dq, "gaussian_window", _box_window)
    elif broken == "7-tap window":
        fn = functools.partial(dq.ssim, window=7)
    elif broken == "sigma 3":
        fn = functools.partial(dq.ssim, sigma=3.0)
    elif broken == "data range 1":
        fn = functools.partial(dq.ssim, data_range=1.0)
    else:  # the Wang et al. constants exchanged: c1 = (0.03 L)^2, c2 = (0.01 L)^2
        fn = _ssim_k_swapped
    with pytest.raises(AssertionError):
        _check_ssim(fn)


def _ssim_k_swapped(a, b, data_range=2.0):
    """SSIM with c1 and c2 exchanged (everything else ours)."""
    import torch.nn.functional as F

    from megatron_starflow.evaluation.denoiser_quality import gaussian_window

    h, w, _ = a.shape[-3:]
    size = min(11, h if h % 2 else h - 1, w if w % 2 else w - 1)
    k = gaussian_window(size, 1.5 * size / 11)[None, None]
    x = a.double().reshape(-1, h, w, 3).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    y = b.double().reshape(-1, h, w, 3).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    mx, my = F.conv2d(x, k), F.conv2d(y, k)
    sxx, syy = F.conv2d(x * x, k) - mx**2, F.conv2d(y * y, k) - my**2
    sxy = F.conv2d(x * y, k) - mx * my
    c1, c2 = (0.03 * data_range) ** 2, (0.01 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) /
                  ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_denoiser_quality(suite_env, monkeypatch):
    """Every reported figure is recomputed by an independent implementation on the very tensors
    the suite compared (scikit-image SSIM, the PSNR formula); the noisy PSNR lies in the band that
    sigma fixes; the report is deterministic."""
    from megatron_starflow.evaluation import denoiser_quality as dq

    system = suite_env[0]
    heldout = _heldout(system)
    ssim_calls, psnr_calls = [], []
    _spy(monkeypatch, dq, "ssim", ssim_calls)
    _spy(monkeypatch, dq, "psnr", psnr_calls)
    rep = dq.denoiser_quality(system, heldout, 4, 2, score_step=True)
    names = ["noisy", "fsm", "score_step"]
    assert len(ssim_calls) == len(psnr_calls) == 3
    for name, (video, clean), (video_p, clean_p) in zip(names, ssim_calls, psnr_calls):
        assert video is video_p and clean is clean_p and video.shape == (4, 4, 8, 8, 3)
        assert clean.min() >= -1 and clean.max() <= 1 and video.min() >= -1 and video.max() <= 1
        assert abs(rep[f"ssim_{name}"] - _sk_ssim(video, clean)) <= 5e-6  # rounded to 5 digits
        mse = float(((video.double() - clean.double()) ** 2).mean())
        assert abs(rep[f"psnr_{name}_db"] - 10 * math.log10(2.0**2 / mse)) <= 5e-5
    # noise sigma on [-1, 1] (peak-to-peak 2): clamping to [-1, 1] can only shrink the error, by at
    # most half (pixels on the boundary), so MSE in [sigma^2 / 2, sigma^2] up to the sampling error
    # of 3072 squared normals (relative sd sqrt(2 / 3072) = 2.6 %, 4 sd allowed)
    sigma = system.cfg.model.noise_std
    lo, hi = 10 * math.log10(4 / sigma**2), 10 * math.log10(8 / sigma**2)
    slack = 10 * math.log10(1 + 4 * math.sqrt(2 / 3072))
    assert lo - slack <= rep["psnr_noisy_db"] <= hi + slack, (lo, rep["psnr_noisy_db"], hi)
    assert math.isclose(rep["fsm_psnr_gain_db"], rep["psnr_fsm_db"] - rep["psnr_noisy_db"], abs_tol=1e-3)
    assert dq.denoiser_quality(system, heldout, 4, 2, score_step=True) == rep  # fixed noise


def test_identity_flow_score_step_closed_form(suite_env, monkeypatch):
    """A fresh system's flow and denoiser heads are zero: the flow is the identity (z = x, log-det
    0), so NLL(x) = |x|^2 / 2, grad = x and the score step is exactly (1 - sigma^2) x~; the FSM
    denoiser returns x~ unchanged (gain 0 dB, same SSIM)."""
    from megatron_starflow.evaluation import denoiser_quality as dq
    from megatron_starflow.models.system import StarFlowSystem

    _, run_dir, _ = suite_env
    cfg = suite_env[0].cfg
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir).eval()
    tokens = []
    real = system.tokens_to_video_float
    monkeypatch.setattr(system, "tokens_to_video_float", lambda x: tokens.append(x.clone()) or real(x))
    rep = dq.denoiser_quality(system, _heldout(system), 4, 2, score_step=True)
    clean, noisy, fsm, score = tokens[:4]  # one batch of 2: clean, noisy, FSM, score step
    sigma = cfg.model.noise_std
    assert torch.equal(fsm, noisy)
    assert (score - (1 - sigma**2) * noisy).abs().max() < 1e-6
    assert rep["psnr_fsm_db"] == rep["psnr_noisy_db"] and rep["fsm_psnr_gain_db"] == 0.0
    assert rep["ssim_fsm"] == rep["ssim_noisy"]


def _heldout(system):
    from megatron_starflow.data.datasets import make_datasets

    return make_datasets(system.cfg).heldout


def test_per_frame_matches_evaluate(suite_env):
    from megatron_starflow.evaluation.likelihood import evaluate, per_frame_bits_per_dim

    system = suite_env[0]
    heldout = _heldout(system)
    full = evaluate(system, heldout, batches=2, batch_size=2)
    per = per_frame_bits_per_dim(system, heldout, batches=2, batch_size=2)
    assert len(per["per_frame_bits_per_dim"]) == 4 and per["clips"] == full["clips"] == 4
    assert abs(np.mean(per["per_frame_bits_per_dim"]) - full["bits_per_dim"]) < 1e-4
    assert abs(np.mean(per["per_frame_pixel_bits_per_dim"]) - full["pixel_bits_per_dim"]) < 1e-4


def _check_page_shows_samples(page: np.ndarray, videos: np.ndarray) -> None:
    """The T2V panel (below the 22-px title and the 18-px caption, 8-px gaps, 10-px margin) is the
    grid of the sampled videos: a row per sample, a frame per column, upscaled to >= 48 px."""
    from megatron_starflow.evaluation.report import _grid

    side = videos.shape[2]
    grid = _grid(videos, max(1, 48 // side))
    top = 5 + 22 + 8 + 18 + 8
    assert np.array_equal(page[top:top + grid.shape[0], 10:10 + grid.shape[1]], grid)


def test_page_check_rejects_a_page_without_the_samples(suite_env):
    """The page check fails for a page drawn from other videos (e.g. the ground truth, or the
    first sample twice)."""
    from megatron_starflow.evaluation.report import render_page

    videos = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
    rows = [{"caption": "c", "read": dict.fromkeys(("color", "shape", "direction", "background")),
             "right": {"overall": False}}] * 2
    report = {"t2v": {"guidance": 1.0, "accuracy": dict.fromkeys(list(ATTRIBUTES) + ["overall"], 0.0),
                      "chance": CHANCE},
              "likelihood": {"per_frame_bits_per_dim": [1.0, 0.5]}, "denoiser": {}}
    page = render_page(report, {"t2v": videos, "t2v_rows": rows})
    _check_page_shows_samples(page, videos)
    for other in (videos[::-1], videos[[0, 0]], 255 - videos):
        with pytest.raises(AssertionError):
            _check_page_shows_samples(page, other)


def test_cli_suite_writes_report_and_page(suite_env, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from megatron_starflow.cli import main

    from megatron_starflow.evaluation import report as report_module

    _, run_dir, step_dir = suite_env
    pages, samples = [], []
    real_render, real_t2v = report_module.render_page, report_module.t2v_adherence
    monkeypatch.setattr(report_module, "render_page",
                        lambda *a, **k: pages.append(real_render(*a, **k)) or pages[-1])
    monkeypatch.setattr(report_module, "t2v_adherence",
                        lambda *a, **k: samples.append(real_t2v(*a, **k)[1]) or real_t2v(*a, **k))
    out = str(tmp_path / "report.json")
    assert main(["eval", "--checkpoint", run_dir, "--suite", "cpu", "--samples", "2", "--cfg", "0.5",
                 "--batches", "1", "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == out and os.path.isfile(printed["page"])
    with open(out) as f:
        report = json.load(f)
    for key in ("likelihood", "denoiser", "t2v", "i2v", "v2v", "long_video", "seconds", "summary"):
        assert key in report, key
    assert report["t2v"]["guidance"] == 0.5 and report["t2v"]["samples"] == 2
    assert report["step"] == 0 and report["suite"] == "cpu"
    assert len(report["likelihood"]["per_frame_bits_per_dim"]) == 4
    assert _in01(report["summary"]["t2v_overall_adherence"])
    # the page: the PNG holds the rendered array, and its T2V panel shows the sampled videos
    assert len(pages) == 1 and len(samples) == 1
    page = np.asarray(Image.open(printed["page"]).convert("RGB"))
    assert np.array_equal(page, pages[0])
    _check_page_shows_samples(page, samples[0])
    # plain eval: the same JSON keys as before the suite existed
    assert main(["eval", "--checkpoint", run_dir, "--batches", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert set(plain) == {"checkpoint", "step", "bits_per_dim", "bits_per_dim_kind", "clips",
                          "pixel_bits_per_dim", "pixel_bits_per_dim_kind", "psnr_noisy_db",
                          "psnr_denoised_db", "denoiser_psnr_gain_db"}
