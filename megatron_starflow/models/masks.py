"""Attention masks as boolean ``[Sq, Sk]`` tensors, True = may attend.

Every mask is a function of per-slot labels (slot index, frame index, is-text), so the same code
builds the full training mask and the rectangular masks of cached (sequential or Jacobi) steps,
where queries are a slice of the sequence and keys are everything up to it.
"""

from __future__ import annotations

import torch


def frame_causal(q_slot: torch.Tensor, k_slot: torch.Tensor, q_frame: torch.Tensor,
                 k_frame: torch.Tensor, k_is_text: torch.Tensor, window: int) -> torch.Tensor:
    """Causal over slots; with ``window > 0`` a query of frame f also sees only video keys of
    frames f-window+1 .. f (text keys stay visible)."""
    allowed = k_slot[None, :] <= q_slot[:, None]
    if window > 0:
        recent = k_frame[None, :] > q_frame[:, None] - window
        allowed &= recent | k_is_text[None, :]
    return allowed


def lookahead(q_frame: torch.Tensor, k_frame: torch.Tensor, k_is_text: torch.Tensor,
              window: int, ahead: int = 1) -> torch.Tensor:
    """Denoiser mask: a query of frame f sees all text and the video frames f-window+1 .. f+ahead
    (one frame of look-ahead by default). Text queries are labelled frame 0, so they see frames
    0 .. ahead."""
    video = (k_frame[None, :] <= q_frame[:, None] + ahead) & (k_frame[None, :] > q_frame[:, None] - window)
    return video | k_is_text[None, :]
