"""Noise-augmented NLL and flow-score matching (METHOD.md section 4).

One training step runs the flow on x~ = x + sigma * eps with x~ requiring grad; the flow loss's
backward gives the flow's parameter gradients *and* x~.grad. Rescaled from the mean loss to each
sample's summed NLL, -sigma * x~.grad is the denoiser's regression target (detached), so the target
costs no extra pass. The denoiser then trains on detached inputs: its loss cannot reach the flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_starflow.models.starflow import FlowOutput, StarFlowV


@dataclass
class StepLosses:
    flow: torch.Tensor  # mean NLL per dim (the optimised flow loss)
    bits_per_dim: torch.Tensor  # exact NLL of x~ in bits/dim, batch mean (detached)
    fsm: torch.Tensor | None  # denoiser MSE
    output: FlowOutput


def fsm_target(noisy_grad: torch.Tensor, batch_mean_scale: float, sigma: float) -> torch.Tensor:
    """-sigma * grad_x (summed NLL of each sample), from the grad of a batch-and-dim mean loss.

    ``batch_mean_scale`` = B * D: d(mean over B of per-dim NLL)/dx_b = (1/(B*D)) d(NLL_sum_b)/dx_b.
    """
    return -sigma * noisy_grad * batch_mean_scale


def flow_and_fsm_backward(model: StarFlowV, noisy: torch.Tensor, text: torch.Tensor,
                          fsm_weight: float = 1.0, loss_scale: float = 1.0) -> StepLosses:
    """Forward + backward of the flow loss, then of the denoiser loss on the target it produced.
    Gradients accumulate into ``.grad`` of the parameters (scaled by ``loss_scale``, e.g. 1/grad
    accumulation steps)."""
    noisy = noisy.detach().requires_grad_(True)
    out = model(noisy, text)
    nll = out.nll_per_dim()
    flow_loss = nll.mean()
    (flow_loss * loss_scale).backward()
    fsm = None
    if model.learnable_self_denoiser is not None:
        scale = noisy.shape[0] * out.dims / loss_scale
        target = fsm_target(noisy.grad, scale, model.cfg.noise_std).detach()
        pred = model.denoise_score(noisy.detach(), text.detach())
        fsm = F.mse_loss(pred, target)
        (fsm_weight * fsm * loss_scale).backward()
    return StepLosses(flow_loss.detach(), out.bits_per_dim().mean().detach(),
                      None if fsm is None else fsm.detach(), out)
