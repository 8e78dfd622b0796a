"""Noise augmentation: the flow models x~ = x + sigma * eps (METHOD.md section 4), in training,
held-out evaluation and sampling alike."""

from __future__ import annotations

import torch


def add_noise(tokens: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    eps = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype, device=tokens.device)
    return tokens + sigma * eps
