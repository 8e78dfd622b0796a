"""Flow-score-matching denoiser (METHOD.md section 4.4-4.5).

A small non-causal transformer s_phi trained to regress the scaled score of the flow's density of
noisy data, t = -sigma * grad_x NLL(x~), so that x^ = x~ + sigma * s_phi(x~) is Tweedie's denoised
estimate. The exact score at frame n depends on every later frame; the denoiser sees only one frame
ahead (block-causal with one frame of look-ahead, and at most ``window`` frames back), which keeps
decoding streamable with one frame of latency. Text is prepended; every query sees all text.

Stacked layers compound a per-layer look-ahead: with the authors' mask in every layer, L layers
see L frames ahead. ``lookahead="first_layer"`` (our default) gives only the first layer the
one-frame look-ahead and makes later layers frame-causal, so the output of frame n depends on
frames <= n+1 exactly; ``"every_layer"`` reproduces the authors' denoiser (imported checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_starflow.config import ParallelConfig
from megatron_starflow.models.layout import SlotLayout
from megatron_starflow.models.transformer import TransformerStack, ZeroCenteredRMSNorm, stack_options


class FlowScoreDenoiser(nn.Module):
    def __init__(self, channels: int, width: int, layers: int, head_dim: int, text_width: int,
                 mlp_ratio: int = 4, init_std: float = 0.02, rope_base: float = 10000.0,
                 rope_time_fraction: float = 0.25, recompute: bool = False,
                 parallel: ParallelConfig | None = None, lookahead: str = "first_layer",
                 output_scale: float = 1.0):
        super().__init__()
        if lookahead not in ("first_layer", "every_layer"):
            raise ValueError(f"model.denoiser_lookahead={lookahead!r}; valid: first_layer, every_layer")
        self.lookahead = lookahead
        # model.denoiser_output_scale: a constant on the output (not a parameter), so the
        # authors' weights load unchanged (see convert/ml_starflow.py).
        self.output_scale = float(output_scale)
        self.rope = (head_dim, rope_base, rope_time_fraction)
        self.proj_in = nn.Linear(channels, width)
        self.proj_txt = nn.Linear(text_width, width)
        self.transformer = TransformerStack(width, layers, head_dim, mlp_ratio, init_std, recompute,
                                            **stack_options(parallel))
        self.final_norm = ZeroCenteredRMSNorm(width)
        self.proj_out = nn.Linear(width, channels)
        # Zero output: an untrained denoiser returns its input unchanged.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, tokens: torch.Tensor, layout: SlotLayout, text: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, N, C]`` (raster order, frames in time order) -> scaled score ``[B, N, C]``."""
        dtype = self.proj_in.weight.dtype
        h = torch.cat([self.proj_txt(text.to(dtype)), self.proj_in(tokens.to(dtype))], dim=1)
        ahead = layout.lookahead_mask(ahead=1, device=h.device)
        angles = layout.angles(*self.rope).to(h.device)
        rotary = layout.rotary(*self.rope, h.dtype, h.device)
        if self.lookahead == "every_layer":
            h = self.transformer(h, ahead, angles, rotary=rotary)
        else:
            causal = layout.lookahead_mask(ahead=0, device=h.device)
            h = self.transformer(h, causal, angles, first_layer_allowed=ahead, rotary=rotary)
        out = self.proj_out(self.final_norm(h[:, layout.text_len:]))
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out.to(torch.promote_types(out.dtype, tokens.dtype))
