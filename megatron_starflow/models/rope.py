"""3-D rotary positions (row, column, time), normalised to a reference grid (METHOD.md section 9).

Of a head's d dims, a fraction f (``rope_time_fraction``) rotates with the third coordinate (frame
index in the deep block and the denoiser, 0 in the per-frame shallow blocks, a scaled position for
text tokens) and the rest splits evenly between row and column, in the order [row | col | time].
The authors' code uses f = 1/4 (for d = 64: 24 row, 24 column, 16 time dims); METHOD.md's prose
says f = 1/2. Each axis with n pairs uses frequencies base^(-j/n), j = 0..n-1, and pairs are
interleaved (2i, 2i+1).
Rows and columns are scaled by pt_seq_len / sqrt(H*W) so that any resolution or aspect ratio maps
onto the same frequency range the model was trained with.
"""

from __future__ import annotations

import math

import torch

from megatron_starflow.config import rope_axis_dims


def video_coords(frames: int, height: int, width: int, pt_seq_len: float,
                 with_time: bool = True, dtype=torch.float64) -> torch.Tensor:
    """Coordinates of raster-ordered video tokens, frames in time order: ``[T*H*W, 3]``."""
    scale = pt_seq_len / math.sqrt(height * width)
    t, r, c = torch.meshgrid(torch.arange(frames, dtype=dtype), torch.arange(height, dtype=dtype),
                             torch.arange(width, dtype=dtype), indexing="ij")
    time = t if with_time else torch.zeros_like(t)
    return torch.stack([r * scale, c * scale, time], dim=-1).reshape(-1, 3)


def text_coords(length: int, pt_seq_len: float, dtype=torch.float64) -> torch.Tensor:
    """Text token l sits at (0, 0, l * pt_seq_len / L)."""
    pos = torch.arange(length, dtype=dtype) * (pt_seq_len / length)
    zeros = torch.zeros_like(pos)
    return torch.stack([zeros, zeros, pos], dim=-1)


def _axis_freqs(dims: int, base: float, dtype) -> torch.Tensor:
    # theta_k = base^(-2k/m) for the m/2 pairs of this axis' m dims
    return base ** (-torch.arange(0, dims, 2, dtype=dtype) / dims)


# The split of a head into (row, col, time) dims is checked when a config is validated, so it is
# defined next to the config; the model uses the same function.
axis_dims = rope_axis_dims


def rope_angles(coords: torch.Tensor, head_dim: int, base: float = 10000.0,
                time_fraction: float = 0.25) -> torch.Tensor:
    """Rotation angles ``[S, head_dim]`` in the interleaved layout megatron-core expects
    (``rotary_interleaved=True``: both members of pair i carry angle i)."""
    parts = []
    for axis, dims in enumerate(axis_dims(head_dim, time_fraction)):
        angles = coords[:, axis:axis + 1] * _axis_freqs(dims, base, coords.dtype)[None]
        parts.append(angles.repeat_interleave(2, dim=-1))
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Reference rotation of interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
    ``x``: ``[..., S, d]``; ``angles``: ``[S, d]``. Used by tests and the checkpoint importer to
    check megatron's rotation independently."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


def rotary_factors(angles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-pair rotations of ``angles`` [S, d] (interleaved) for ``rotate_pairs``: complex
    exp(i angle) ``[S, d/2]`` for float32/float64, else ``[S, d/2, 2]`` (cos, sin) in ``dtype``.
    cos and sin are taken of the angles cast to ``dtype``, as megatron's rotary embedding does, so
    both give the same values."""
    pairs = angles[:, 0::2].to(dtype)
    if dtype in (torch.float32, torch.float64):
        return torch.complex(pairs.cos(), pairs.sin())
    return torch.stack([pairs.cos(), pairs.sin()], dim=-1)


def rotate_pairs(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with precomputed ``rotary_factors`` (broadcast against ``x[..., d/2]``): one
    complex multiply of the pairs (x0 + i x1) exp(i angle) when the factors are complex."""
    if factors.is_complex():
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * factors).flatten(-2)
    c, s = factors[..., 0], factors[..., 1]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
