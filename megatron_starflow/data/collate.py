"""Batching of data-set items (``{"video", "caption", "attrs"}``) into one batch dict."""

from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    return {"video": torch.stack([it["video"] for it in items]),
            "caption": [it["caption"] for it in items],
            "attrs": [it["attrs"] for it in items]}
