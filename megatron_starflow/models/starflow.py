"""STARFlow-V: K-1 shallow per-frame flow blocks, one deep text-conditioned causal block, and the
flow-score-matching denoiser (METHOD.md section 3).

Latents ``[B, T, H, W, C]`` are folded by ``patch_size`` into tokens ``[B, T, h, w, C*p*p]`` (channel
order p1, p2, c). Data -> noise runs blocks 0..K-1 in index order; the shallow blocks treat every
frame as its own one-frame video and see no text; the deep block runs causally over all frames with
the text prefix in front (optionally within a sliding window of frames). Blocks 0, 2, 4 reverse the
raster order inside each frame; the deep block keeps it, so the global order stays time-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megatron_starflow.config import ModelConfig, ParallelConfig
from megatron_starflow.models.denoiser import FlowScoreDenoiser
from megatron_starflow.models.flow_block import FlowBlock
from megatron_starflow.models.layout import SlotLayout

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class FlowOutput:
    z: torch.Tensor  # [B, T, h, w, C'] tokens in natural order
    logdets: list[torch.Tensor]  # per block, [B], summed over tokens and channels
    dims: int  # D: dimensions per sample

    def nll_per_dim(self) -> torch.Tensor:
        """Training loss per sample: 0.5 mean(z^2) - sum_blocks logdet / D (the authors' form,
        without the Gaussian constant)."""
        # In fp32 at least: with bf16 parameters the per-token terms are bf16, but their sums
        # over ~1e5 dimensions are not representable in bf16 (megatron computes losses in fp32).
        dtype = torch.promote_types(self.z.dtype, torch.float32)
        logdet = torch.stack([ld.to(dtype) for ld in self.logdets]).sum(0)
        return 0.5 * self.z.to(dtype).flatten(1).pow(2).mean(1) - logdet / self.dims

    def bits_per_dim(self) -> torch.Tensor:
        """Exact negative log-likelihood per dimension, in bits, of the flow's input."""
        return (self.nll_per_dim() + HALF_LOG_2PI) / math.log(2)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h // p, w // p, p * p * c)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, t, h, w, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h * p, w * p, c)


class StarFlowV(nn.Module):
    """``parallel``: the config's ``parallel.*`` (layer spec, sequence parallelism, FP8), handed to
    every transformer stack; None builds a local-spec model without SP or FP8. The TP size is
    megatron's ``parallel_state``."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig | None = None):
        super().__init__()
        self.cfg = cfg
        c = cfg.token_channels
        common = dict(head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio, soft_clip=cfg.soft_clip,
                      init_std=cfg.init_std, rope_base=cfg.rope_base,
                      rope_time_fraction=cfg.rope_time_fraction, recompute=cfg.recompute,
                      parallel=parallel)
        shallow = [FlowBlock(c, cfg.shallow_width, cfg.shallow_layers, **common)
                   for _ in range(cfg.num_blocks - 1)]
        deep = FlowBlock(c, cfg.deep_width, cfg.deep_layers, text_width=cfg.text_width, **common)
        self.blocks = nn.ModuleList(shallow + [deep])
        self.learnable_self_denoiser = None
        if cfg.use_denoiser:
            self.learnable_self_denoiser = FlowScoreDenoiser(
                c, cfg.resolved_denoiser_width, cfg.denoiser_layers, cfg.head_dim, cfg.text_width,
                cfg.mlp_ratio, cfg.init_std, cfg.rope_base, cfg.rope_time_fraction, cfg.recompute,
                parallel, cfg.denoiser_lookahead, cfg.denoiser_output_scale)

    # -- layouts and orders -------------------------------------------------------------------
    @property
    def deep_block(self) -> FlowBlock:
        return self.blocks[-1]

    @property
    def shallow_blocks(self) -> list[FlowBlock]:
        return list(self.blocks[:-1])

    def reverses(self, index: int) -> bool:
        """Blocks 0, 2, 4 reverse the in-frame raster order; the deep block never does."""
        return self.cfg.reverse_even_blocks and index % 2 == 0 and index < len(self.blocks) - 1

    def shallow_layout(self, h: int, w: int) -> SlotLayout:
        return SlotLayout(0, 1, h, w, with_time=False, pt_seq_len=self.cfg.pt_seq_len)

    def deep_layout(self, t: int, h: int, w: int) -> SlotLayout:
        return SlotLayout(self.cfg.text_length, t, h, w, with_time=True,
                          pt_seq_len=self.cfg.pt_seq_len, window=self.cfg.attn_window)

    def denoiser_layout(self, t: int, h: int, w: int) -> SlotLayout:
        return SlotLayout(self.cfg.text_length, t, h, w, with_time=True,
                          pt_seq_len=self.cfg.pt_seq_len, window=self.cfg.denoiser_window)

    def _check_text(self, text: torch.Tensor, batch: int) -> None:
        want = (batch, self.cfg.text_length, self.cfg.text_width)
        if text is None or tuple(text.shape) != want:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"text embeddings have shape {got}, the model expects {want} "
                             f"(model.text_length, model.text_width)")

    def _check_tokens(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[-1] != self.cfg.token_channels:
            raise ValueError(f"latent tokens must be [B, T, H, W, {self.cfg.token_channels}] "
                             f"(model.latent_channels * patch_size^2), got {tuple(x.shape)}")

    # -- per-frame shallow blocks -----------------------------------------------------------
    def shallow_forward(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h, w, c = x.shape
        seq = x.reshape(b * t, h * w, c)
        if self.reverses(index):
            seq = seq.flip(1)
        z, logdet = self.blocks[index](seq, self.shallow_layout(h, w))
        if self.reverses(index):
            z = z.flip(1)
        return z.reshape(b, t, h, w, c), logdet.reshape(b, t).sum(1)

    def shallow_inverse(self, index: int, z: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = z.shape
        seq = z.reshape(b * t, h * w, c)
        if self.reverses(index):
            seq = seq.flip(1)
        x = self.blocks[index].inverse_sequential(seq, self.shallow_layout(h, w))
        if self.reverses(index):
            x = x.flip(1)
        return x.reshape(b, t, h, w, c)

    # -- whole model ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> FlowOutput:
        """Data -> noise on (noisy) latent tokens ``[B, T, H, W, C']``."""
        self._check_tokens(tokens)
        self._check_text(text, tokens.shape[0])
        b, t, h, w, c = tokens.shape
        logdets = []
        u = tokens
        for i in range(len(self.blocks) - 1):
            u, logdet = self.shallow_forward(i, u)
            logdets.append(logdet)
        z, logdet = self.deep_block(u.reshape(b, t * h * w, c), self.deep_layout(t, h, w), text)
        logdets.append(logdet)
        return FlowOutput(z.reshape(b, t, h, w, c), logdets, t * h * w * c)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Noise -> data, exactly, with the sequential KV-cached inverse of every block."""
        self._check_tokens(z)
        self._check_text(text, z.shape[0])
        b, t, h, w, c = z.shape
        u = self.deep_block.inverse_sequential(z.reshape(b, t * h * w, c), self.deep_layout(t, h, w), text)
        x = u.reshape(b, t, h, w, c)
        for i in reversed(range(len(self.blocks) - 1)):
            x = self.shallow_inverse(i, x)
        return x

    def denoise_score(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """s_phi(x~): the denoiser's estimate of -sigma * grad NLL, same shape as ``tokens``."""
        b, t, h, w, c = tokens.shape
        s = self.learnable_self_denoiser(tokens.reshape(b, t * h * w, c),
                                         self.denoiser_layout(t, h, w), text)
        return s.reshape(tokens.shape)

    def denoise(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Tweedie step x^ = x~ + sigma * s_phi(x~)."""
        return tokens + self.cfg.noise_std * self.denoise_score(tokens, text)


def count_parameters(model: StarFlowV) -> dict[str, int]:
    """Parameter counts by part: shallow, deep (without its text projection), denoiser, text
    projection (deep block's and denoiser's)."""
    def n(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())
    deep_txt = n(model.deep_block.proj_txt)
    den = model.learnable_self_denoiser
    den_txt = n(den.proj_txt) if den is not None else 0
    parts = {
        "shallow": sum(n(b) for b in model.shallow_blocks),
        "deep": n(model.deep_block) - deep_txt,
        "denoiser": n(den) - den_txt,
        "text_projection": deep_txt + den_txt,
    }
    parts["total"] = sum(parts.values())
    return parts
