"""Denoiser quality: PSNR and SSIM of the noisy, the FSM-denoised and the score-step-denoised
held-out clips against the clean ones.

* noisy: x~ = x + sigma * eps with the training sigma (what sampling ends with);
* FSM: the learned flow-score-matching denoiser's Tweedie step x~ + sigma * s_phi(x~);
* score step: Tweedie with the flow's own exact score, x~ - sigma^2 * grad_x~ NLL(x~) (the
  "score-based" baseline of the paper, 22.05 dB there vs 26.69 dB for FSM).
All in pixel space on [-1, 1] (peak-to-peak 2), after decoding and clamping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_starflow.data.collate import collate
from megatron_starflow.evaluation.likelihood import psnr
from megatron_starflow.models.noise import add_noise
from megatron_starflow.models.system import StarFlowSystem


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03, valid positions only)
    of two images / videos ``[..., H, W, C]`` channels last, per channel and frame, then averaged.
    The window shrinks to the largest odd size that fits frames smaller than ``window``."""
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    h, w, c = a.shape[-3:]
    size = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"frames of {h}x{w} are too small for SSIM")
    kernel = gaussian_window(size, sigma * size / window if size < window else sigma)
    kernel = kernel[None, None].to(a.device)
    x = a.double().reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    y = b.double().reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)

    def blur(v):
        return F.conv2d(v, kernel)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def flow_score_step(model, noisy: torch.Tensor, text: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tweedie step with the flow's exact score: x~ - sigma^2 * grad NLL(x~) (NLL in nats)."""
    with torch.enable_grad():
        x = noisy.detach().clone().requires_grad_(True)
        out = model(x, text)
        nll = 0.5 * out.z.flatten(1).pow(2).sum(1) - torch.stack(out.logdets).sum(0)
        (grad,) = torch.autograd.grad(nll.sum(), x)
    return (noisy - sigma ** 2 * grad).detach()


def _finite(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None


@torch.no_grad()
def denoiser_quality(system: StarFlowSystem, dataset, clips: int, batch_size: int, seed: int = 4321,
                     score_step: bool = True) -> dict:
    """PSNR (dB) / SSIM of noisy, FSM-denoised and (optionally) score-step clips vs clean."""
    model, sigma = system.model, system.cfg.model.noise_std
    if model.learnable_self_denoiser is None:
        return {"skipped": "model has no FSM denoiser (model.use_denoiser=false)"}
    was_training = system.training
    system.eval()
    gen = torch.Generator().manual_seed(seed)
    clean_v, noisy_v, fsm_v, score_v = [], [], [], []
    n = min(len(dataset), clips)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        text = system.encode_text(batch["caption"])
        clean = system.video_to_tokens(batch["video"], dequantize=False)
        noisy = add_noise(clean, sigma, gen)
        clean_v.append(system.tokens_to_video_float(clean))
        noisy_v.append(system.tokens_to_video_float(noisy))
        fsm_v.append(system.tokens_to_video_float(model.denoise(noisy, text)))
        if score_step:
            score_v.append(system.tokens_to_video_float(flow_score_step(model, noisy, text, sigma)))
    system.train(was_training)
    clean = torch.cat(clean_v)
    result = {"clips": n, "sigma": sigma, "space": "decoded pixels in [-1, 1], peak-to-peak 2"}
    named = {"noisy": noisy_v, "fsm": fsm_v, "score_step": score_v}
    for name, parts in named.items():
        if not parts:
            continue
        video = torch.cat(parts)
        result[f"psnr_{name}_db"] = _finite(psnr(video, clean))
        result[f"ssim_{name}"] = round(ssim(video, clean), 5)
    if result.get("psnr_fsm_db") is not None and result.get("psnr_noisy_db") is not None:
        result["fsm_psnr_gain_db"] = round(result["psnr_fsm_db"] - result["psnr_noisy_db"], 4)
    return result
