"""Held-out likelihood and denoiser quality.

Two likelihoods, named for what they are:
* ``bits_per_dim``: exact NLL of the noise-augmented tokens x~ = x + sigma*eps under the flow, in
  bits per latent dimension (what training optimises; can be negative: x~ is continuous).
* ``pixel_bits_per_dim`` (lossless s2d codec only): an upper bound on the discrete NLL of the 8-bit
  pixels, E_u[-log2 p(y)] + log2(256/2) with uniform dequantisation y = (x + u)/128 - 1 and no
  Gaussian noise (valid for any density; loose when the flow was trained at a larger sigma).
The denoiser is scored by PSNR (in pixel space, peak-to-peak 2 on [-1, 1]) of the noisy and the
denoised clips against the clean ones.
"""

from __future__ import annotations

import math

import torch

from megatron_starflow.training.builders import StarFlowSystem, collate
from megatron_starflow.training.losses import add_noise


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@torch.no_grad()
def evaluate(system: StarFlowSystem, dataset, batches: int, batch_size: int, seed: int = 1234) -> dict:
    """Deterministic (fixed clips, fixed noise) held-out metrics."""
    cfg = system.cfg
    was_training = system.training
    system.eval()
    gen = torch.Generator().manual_seed(seed)
    sigma = cfg.model.noise_std
    bpd, pix_bpd, clean_v, noisy_v, den_v = [], [], [], [], []
    n = min(len(dataset), batches * batch_size)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        text = system.encode_text(batch["caption"])
        clean = system.video_to_tokens(batch["video"], dequantize=False)
        noisy = add_noise(clean, sigma, gen)
        bpd.append(system.model(noisy, text).bits_per_dim())
        if system.codec.lossless:
            dequant = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
            pix_bpd.append(system.model(dequant, text).bits_per_dim() + system.codec.bits_per_dim_offset())
        if system.model.learnable_self_denoiser is not None:
            den_v.append(system.tokens_to_video_float(system.model.denoise(noisy, text)))
            noisy_v.append(system.tokens_to_video_float(noisy))
            clean_v.append(system.tokens_to_video_float(clean))
    result = {"bits_per_dim": torch.cat(bpd).mean().item(),
              "bits_per_dim_kind": f"noisy latent tokens (sigma={sigma}), continuous density",
              "clips": n}
    if pix_bpd:
        result["pixel_bits_per_dim"] = torch.cat(pix_bpd).mean().item()
        result["pixel_bits_per_dim_kind"] = "8-bit pixels, uniform dequantisation bound (+7 bits)"
    if den_v:
        clean, noisy, den = torch.cat(clean_v), torch.cat(noisy_v), torch.cat(den_v)
        result["psnr_noisy_db"] = psnr(noisy, clean)
        result["psnr_denoised_db"] = psnr(den, clean)
        result["denoiser_psnr_gain_db"] = result["psnr_denoised_db"] - result["psnr_noisy_db"]
    system.train(was_training)
    return result
