"""The random inputs of a training sample — caption dropout, dequantisation noise, Gaussian noise
augmentation — drawn from a generator seeded by (run seed, the sample's global position in the
data order). They do not depend on which rank, or how many ranks, process the sample, so a step
computes the same loss at DP=1 and DP=4, and a run resumed with another layout continues with
the same noise it would have drawn (``data/sampler.py`` gives every sample its position)."""

from __future__ import annotations

import torch

_MIX = 1_000_003  # positions of two seeds never collide for runs shorter than 1e6 * batch epochs


def sample_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) * _MIX + int(position) + 1)


def replica_inputs(system, batch: dict, caption_dropout: float, sigma: float, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """(noisy tokens ``[B, T, h, w, C]`` on ``device``, captions after dropout) of one replica's
    batch (``batch["position"]``: the global positions of its samples)."""
    noisy, captions = [], []
    for i, position in enumerate(batch["position"]):
        gen = sample_generator(seed, position, device)
        dropped = bool(torch.rand(1, generator=gen, device=device).item() < caption_dropout)
        captions.append("" if dropped else batch["caption"][i])
        video = batch["video"][i:i + 1].to(device)
        tokens = system.video_to_tokens(video, dequantize=True, generator=gen)
        eps = torch.randn(tokens.shape, generator=gen, device=device, dtype=tokens.dtype)
        noisy.append(tokens + sigma * eps)
    return torch.cat(noisy), captions
