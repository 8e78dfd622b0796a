"""Classifier-free guidance of one autoregressive Gaussian step (METHOD.md section 5).

Each step is x_t | x_<t ~ N(b, sigma^2). The guided step is the Gaussian proportional to
p_c^(1+w) / p_u^w. With s = min(sigma_c / sigma_u, 1)^2 (the clamp keeps the precision positive):
    sigma = sigma_c / sqrt(1 + w - w s),   b = ((1 + w) b_c - w s b_u) / (1 + w - w s).
Only the deep block sees text, so only it is guided.
"""

from __future__ import annotations

import torch


def guided_gaussian(b_c: torch.Tensor, log_sigma_c: torch.Tensor, b_u: torch.Tensor,
                    log_sigma_u: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (b, log sigma) of the guided step; w = 0 returns the conditional step unchanged."""
    if w == 0:
        return b_c, log_sigma_c
    s = torch.exp(2 * torch.clamp(log_sigma_c - log_sigma_u, max=0.0))
    denom = 1 + w - w * s
    b = ((1 + w) * b_c - w * s * b_u) / denom
    return b, log_sigma_c - 0.5 * torch.log(denom)
