"""Batching of data-set items (``{"video", "caption", "attrs"}``, or ``{"latent", "text",
"caption", "attrs"}`` of latent shards) into one batch dict."""

from __future__ import annotations

import torch

TENSORS = ("video", "latent", "text")


def collate(items: list[dict]) -> dict:
    batch = {name: torch.stack([it[name] for it in items]) for name in TENSORS if name in items[0]}
    batch["caption"] = [it["caption"] for it in items]
    batch["attrs"] = [it["attrs"] for it in items]
    return batch
