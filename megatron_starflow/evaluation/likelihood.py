"""Held-out likelihood and denoiser quality.

Two likelihoods, named for what they are:
* ``bits_per_dim``: exact NLL of the noise-augmented tokens x~ = x + sigma*eps under the flow, in
  bits per latent dimension (what training optimises; can be negative: x~ is continuous).
* ``pixel_bits_per_dim`` (lossless s2d codec only): an upper bound on the discrete NLL of the 8-bit
  pixels, E_u[-log2 p(y)] + log2(256/2) with uniform dequantisation y = (x + u)/128 - 1 and no
  Gaussian noise (valid for any density; loose when the flow was trained at a larger sigma).
The denoiser is scored by PSNR (in pixel space, peak-to-peak 2 on [-1, 1]) of the noisy and the
denoised clips against the clean ones.
``per_frame_bits_per_dim`` splits the first figure exactly into latent frames (conditional bits/dim
of frame n given the earlier ones).
"""

from __future__ import annotations

import math

import torch

from megatron_starflow.data.collate import collate
from megatron_starflow.models.noise import add_noise
from megatron_starflow.models.starflow import HALF_LOG_2PI
from megatron_starflow.models.system import StarFlowSystem


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
        text = system.batch_text(batch)
        clean = system.batch_tokens(batch, dequantize=False)
        noisy = add_noise(clean, sigma, gen)
        bpd.append(system.model(noisy, text).bits_per_dim())
        if system.codec is not None and system.codec.lossless:
            dequant = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
            pix_bpd.append(system.model(dequant, text).bits_per_dim() + system.codec.bits_per_dim_offset())
        if system.model.learnable_self_denoiser is not None and system.codec is not None:
            den_v.append(system.tokens_to_video_float(system.model.denoise(noisy, text)))
            noisy_v.append(system.tokens_to_video_float(noisy))
            clean_v.append(system.tokens_to_video_float(clean))
    result = {"bits_per_dim": torch.cat(bpd).mean().item(),
              "bits_per_dim_kind": f"noisy latent tokens (sigma={sigma}), continuous density",
              "clips": n}
    if system.codec is None:
        result["skipped"] = ("pixel metrics (denoiser PSNR in pixels) need the codec, which a "
                             "system built for stored latents (data.source=latent_shards) does not "
                             "have; bits/dim is of the stored latents")
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


# ---------------------------------------------------------------------------- per-frame bits/dim

def _capture_log_sigmas(model):
    """Wrap every block's ``head`` (instance attribute, removed again by the returned ``restore``)
    to record the log-scales it returns; nothing in the model changes."""
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.blocks))}

    def wrap(index, head):
        def recording_head(h):
            shift, log_sigma = head(h)
            captured[index].append(log_sigma)
            return shift, log_sigma
        return recording_head

    for i, block in enumerate(model.blocks):
        block.head = wrap(i, block.head)

    def restore():
        for block in model.blocks:
            del block.head

    return captured, restore


@torch.no_grad()
def frame_nll_bits(model, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Exact per-latent-frame NLL of ``tokens`` [B, T, h, w, C], in bits per dimension: [B, T].

    The flow's NLL is a sum over tokens of 0.5 z^2 + 0.5 log 2 pi - log-det, where each block's
    log-det is itself a sum of per-token -log sigma (affine autoregressive blocks); grouping the
    terms by the latent frame a token belongs to in every block (the shallow blocks act within a
    frame, the deep block keeps the time-major order) splits the NLL into frames exactly. Because
    the deep block is causal over frames and the shallow blocks are per frame, frame n's share is
    -log p(x_n | x_<n, text): the conditional bits/dim of frame n. The mean over frames equals
    ``FlowOutput.bits_per_dim``."""
    b, t = tokens.shape[:2]
    captured, restore = _capture_log_sigmas(model)
    try:
        out = model(tokens, text)
    finally:
        restore()
    nll = 0.5 * out.z.double().reshape(b, t, -1).pow(2).sum(-1)
    for i, logs in captured.items():
        if len(logs) != 1:
            raise RuntimeError(f"block {i} computed its head {len(logs)} times in one forward pass")
        # shallow: [B*T, hw, C] (maybe raster-reversed within each frame); deep: [B, T*hw, C]
        nll = nll + logs[0].double().reshape(b, t, -1).sum(-1)
    dims = out.z[0, 0].numel()
    return (nll / dims + HALF_LOG_2PI) / math.log(2)


@torch.no_grad()
def per_frame_bits_per_dim(system: StarFlowSystem, dataset, batches: int, batch_size: int,
                           seed: int = 1234) -> dict:
    """Held-out bits/dim per latent frame (mean over clips), on the same clips and the same noise
    draws as ``evaluate`` (so the mean over frames equals its ``bits_per_dim``)."""
    cfg = system.cfg
    was_training = system.training
    system.eval()
    gen = torch.Generator().manual_seed(seed)
    noisy_rows, pixel_rows = [], []
    n = min(len(dataset), batches * batch_size)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        text = system.batch_text(batch)
        clean = system.batch_tokens(batch, dequantize=False)
        noisy_rows.append(frame_nll_bits(system.model, add_noise(clean, cfg.model.noise_std, gen), text))
        if system.codec is not None and system.codec.lossless:
            dequant = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
            pixel_rows.append(frame_nll_bits(system.model, dequant, text)
                              + system.codec.bits_per_dim_offset())
    system.train(was_training)
    per_frame = torch.cat(noisy_rows).mean(0)
    result = {"per_frame_bits_per_dim": [round(v, 5) for v in per_frame.tolist()],
              "per_frame_kind": "exact per-token NLL terms (0.5 z^2 + 0.5 log 2pi - log sigma of every "
                                "block) summed per latent frame = -log2 p(frame n | frames < n) per dim",
              "clips": n}
    if system.codec is not None:
        result["pixel_frames_per_latent_frame"] = system.codec.temporal_factor
    if pixel_rows:
        result["per_frame_pixel_bits_per_dim"] = [round(v, 5) for v in torch.cat(pixel_rows).mean(0).tolist()]
    return result
