"""Noise augmentation: the flow models x~ = x + sigma * eps (METHOD.md section 4), in training,
held-out evaluation and sampling alike."""

from __future__ import annotations

import torch


def add_noise(tokens: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``tokens + sigma * eps`` with eps drawn on the generator's device (the CPU generator of
    held-out evaluation and sampling gives the same noise on any device) and moved to the tokens'."""
    where = tokens.device if generator is None else generator.device
    eps = torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype, device=where)
    return tokens + sigma * eps.to(tokens.device)
