"""One affine autoregressive flow block (TARFlow block), METHOD.md section 2.

A causal transformer reads ``[text; sos, x_0 .. x_{N-2}]`` and emits for token t a shift b_t and a
scale sigma_t that depend only on x_{<t}:
    forward (data -> noise):  z_t = (x_t - b_t) / sigma_t,   log-det = -sum log sigma_t
    inverse (noise -> data):  x_t = b_t + sigma_t * z_t      (needs x_{<t}: sequential or Jacobi)
The output projection starts at zero, so a fresh block is the identity (a = b = 0 -> sigma = 1).
Parameter names follow the authors' checkpoints (sos_embed, proj_in, proj_txt, final_norm,
proj_out) so their weights load by a name map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_starflow.config import ParallelConfig
from megatron_starflow.models.layout import SlotLayout
from megatron_starflow.models.transformer import (KVCache, TransformerStack, ZeroCenteredRMSNorm,
                                                  stack_options)

# softplus(0 + SOFTPLUS_INV_ONE) = 1: a zero network output means unit scale.
SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))


class FlowBlock(nn.Module):
    def __init__(self, channels: int, width: int, layers: int, head_dim: int, mlp_ratio: int = 4,
                 soft_clip: float = 4.0, text_width: int = 0, init_std: float = 0.02,
                 rope_base: float = 10000.0, rope_time_fraction: float = 0.25,
                 recompute: bool = False, parallel: ParallelConfig | None = None):
        super().__init__()
        self.channels, self.width, self.head_dim = channels, width, head_dim
        self.soft_clip = soft_clip
        self.rope = (head_dim, rope_base, rope_time_fraction)
        # The start token lives in input (latent) space and goes through proj_in like a token,
        # as in the authors' blocks (sos_embed of shape [1, 1, C]).
        self.sos_embed = nn.Parameter(torch.randn(1, 1, channels) * init_std)
        self.proj_in = nn.Linear(channels, width)
        self.proj_txt = nn.Linear(text_width, width) if text_width else None
        self.transformer = TransformerStack(width, layers, head_dim, mlp_ratio, init_std, recompute,
                                            **stack_options(parallel))
        self.final_norm = ZeroCenteredRMSNorm(width)
        self.proj_out = nn.Linear(width, 2 * channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # -- pieces -----------------------------------------------------------------------------
    def video_inputs(self, prev_tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of slots predicting tokens start..start+S-1 from their inputs
        ``prev_tokens`` = x_{start-1} .. x_{start+S-2} (row 0 is ignored when start == 0: sos)."""
        if start == 0:
            sos = self.sos_embed.to(prev_tokens.dtype).expand(prev_tokens.shape[0], 1, -1)
            prev_tokens = torch.cat([sos, prev_tokens[:, 1:]], dim=1)
        return self.proj_in(prev_tokens.to(self.proj_in.weight.dtype))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output -> (shift b, log sigma), soft-clipped, both ``[B, S, C]``."""
        out = self.proj_out(self.final_norm(h))
        # The affine transform and its log-det run in fp32 at least: with bf16 parameters only
        # the transformer computes in bf16 (tokens, z and log-dets stay fp32, as under autocast).
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        out = self.soft_clip * torch.tanh(out / self.soft_clip)
        a, b = out.split(self.channels, dim=-1)
        return b, torch.log(F.softplus(a + SOFTPLUS_INV_ONE))

    def _angles(self, layout: SlotLayout, start: int, length: int, like: torch.Tensor):
        return layout.angles(*self.rope)[start:start + length].to(like.device)

    def _rotary(self, layout: SlotLayout, start: int, length: int, like: torch.Tensor):
        return layout.rotary(*self.rope, like.dtype, like.device)[start:start + length]

    def _transformer(self, h, layout, start, cache=None, commit=False):
        """The stack over slots start..start+S-1 (RoPE tables and masks from the layout)."""
        length = h.shape[1]
        return self.transformer(h, layout.attention_mask(start, length, h.device),
                                self._angles(layout, start, length, h), cache, commit,
                                rotary=self._rotary(layout, start, length, h))

    # -- training / encoding: all tokens in parallel ----------------------------------------
    def forward(self, x: torch.Tensor, layout: SlotLayout, text: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, N, C]`` (already in this block's order) -> z ``[B, N, C]``, log-det ``[B]``."""
        shifted = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # slot j reads token j-1
        h = self.video_inputs(shifted, 0)
        if layout.text_len:
            h = torch.cat([self.proj_txt(text.to(h.dtype)), h], dim=1)
        h = self._transformer(h, layout, 0)
        b, log_sigma = self.head(h[:, layout.text_len:])
        z = (x - b) * torch.exp(-log_sigma)
        return z, -log_sigma.flatten(1).sum(1)

    # -- inversion: cached steps ------------------------------------------------------------
    def prefill_text(self, text: torch.Tensor, layout: SlotLayout, cache: KVCache) -> None:
        """Commit the text prefix's keys/values (deep block) into an empty cache."""
        h = self.proj_txt(text.to(self.proj_in.weight.dtype))
        self._transformer(h, layout, 0, cache, commit=True)

    def predict(self, prev_tokens: torch.Tensor, start: int, layout: SlotLayout, cache: KVCache,
                commit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, log sigma) of tokens start..start+S-1 given their inputs x_{start-1}..x_{start+S-2}
        and a cache holding every earlier slot. ``commit`` appends these slots to the cache."""
        slot = layout.text_len + start
        if len(cache) != slot:
            raise RuntimeError(f"KV cache holds {len(cache)} slots, expected {slot}")
        h = self._transformer(self.video_inputs(prev_tokens, start), layout, slot, cache, commit)
        return self.head(h)

    @torch.no_grad()
    def inverse_sequential(self, z: torch.Tensor, layout: SlotLayout,
                           text: torch.Tensor | None = None) -> torch.Tensor:
        """Exact inverse, one token at a time with a KV cache: z ``[B, N, C]`` -> x."""
        cache = KVCache(capacity=layout.total)
        if layout.text_len:
            self.prefill_text(text, layout, cache)
        x = torch.zeros_like(z)
        prev = torch.zeros_like(z[:, :1])
        for t in range(z.shape[1]):
            b, log_sigma = self.predict(prev, t, layout, cache, commit=True)
            x[:, t:t + 1] = b + torch.exp(log_sigma) * z[:, t:t + 1]
            prev = x[:, t:t + 1]
        return x
