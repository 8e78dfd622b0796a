"""Where each slot of a block's sequence sits: text prefix, then one slot per video token.

Slot L+j predicts raster token j (frame j // (H*W)); its input is token j-1 (or the start token for
j = 0). RoPE angles are indexed by slot in natural order and are not permuted with the tokens
(METHOD.md section 9), so they depend only on the layout, which makes them cacheable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from megatron_starflow.models import masks, rope


@dataclass(frozen=True)
class SlotLayout:
    text_len: int
    frames: int
    height: int
    width: int
    with_time: bool
    pt_seq_len: float
    window: int = 0  # frames of look-back (0 = unlimited)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def total(self) -> int:
        return self.text_len + self.video_len

    def angles(self, head_dim: int, base: float, time_fraction: float) -> torch.Tensor:
        return _angles(self, head_dim, base, time_fraction)

    def rotary(self, head_dim: int, base: float, time_fraction: float, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """``rope.rotary_factors`` of ``angles``, computed once per layout, dtype and device."""
        return _rotary(self, head_dim, base, time_fraction, dtype, str(device))

    def labels(self, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot index, frame index, is-text) of every slot; text slots are labelled frame 0.
        Cached per layout and device: masks are built from them where they are used (a 7B
        denoiser mask is 33016^2 booleans, which the CPU would build and copy every step)."""
        return _labels(self, str(torch.device(device)))

    def attention_mask(self, q_start: int = 0, q_len: int | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``causal_mask``, or None when it is plain causal (no window): the stack then needs no
        mask for a one-slot query and uses the causal kernel for a whole sequence."""
        return None if self.window <= 0 else self.causal_mask(q_start, q_len, device)

    def causal_mask(self, q_start: int = 0, q_len: int | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """Allowed [q_len, q_start + q_len] for queries q_start.. attending to every earlier slot,
        built on ``device``."""
        q_len = self.total - q_start if q_len is None else q_len
        slot, frame, is_text = self.labels(device)
        q = slice(q_start, q_start + q_len)
        k = slice(0, q_start + q_len)
        return masks.frame_causal(slot[q], slot[k], frame[q], frame[k], is_text[k], self.window)

    def lookahead_mask(self, ahead: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        _, frame, is_text = self.labels(device)
        return masks.lookahead(frame, frame, is_text, self.window, ahead)


@lru_cache(maxsize=64)
def _labels(layout: SlotLayout, device: str):
    slot = torch.arange(layout.total)
    frame = torch.zeros(layout.total, dtype=torch.long)
    frame[layout.text_len:] = torch.arange(layout.video_len) // layout.tokens_per_frame
    is_text = slot < layout.text_len
    return slot.to(device), frame.to(device), is_text.to(device)


@lru_cache(maxsize=64)
def _angles(layout: SlotLayout, head_dim: int, base: float, time_fraction: float) -> torch.Tensor:
    coords = rope.video_coords(layout.frames, layout.height, layout.width, layout.pt_seq_len,
                               with_time=layout.with_time)
    if layout.text_len:
        coords = torch.cat([rope.text_coords(layout.text_len, layout.pt_seq_len), coords])
    return rope.rope_angles(coords, head_dim, base, time_fraction)


@lru_cache(maxsize=64)
def _rotary(layout: SlotLayout, head_dim: int, base: float, time_fraction: float, dtype: torch.dtype,
            device: str) -> torch.Tensor:
    return rope.rotary_factors(_angles(layout, head_dim, base, time_fraction), dtype).to(device)
