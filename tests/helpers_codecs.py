"""Test helper: a tiny random-weight Wan VAE saved as a diffusers folder.

Lets the Wan codec be exercised end to end (from_pretrained, scale factors, latent normalisation)
without downloading the real multi-GB checkpoint.
"""
import os

import torch
from diffusers import AutoencoderKLWan

TINY_Z_DIM = 4


def make_tiny_wan_vae(directory, seed: int = 0) -> str:
    """Build a tiny AutoencoderKLWan and `save_pretrained` it into `directory`; returns the path.

    Three levels (two downsamples, both temporal) give the real Wan 4x temporal factor, which diffusers'
    hard-coded 1 + 4k frame chunking needs; spatial factor is 2**2 = 4. scale_factor_* are set to match
    the structure so the saved config is self-consistent.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=TINY_Z_DIM,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True, True],  # one flag per downsample (len(dim_mult) - 1)
        # Non-trivial statistics so that normalisation is actually exercised.
        latents_mean=[0.1 * (i + 1) for i in range(TINY_Z_DIM)],
        latents_std=[1.0 + 0.5 * i for i in range(TINY_Z_DIM)],
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    os.makedirs(directory, exist_ok=True)
    vae.save_pretrained(str(directory))
    return str(directory)
