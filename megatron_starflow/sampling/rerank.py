"""Best-of-N sampling by the flow's own likelihood ratio.

A normalizing flow gives the exact density of its samples, so a caption's N candidates can be
ranked without any external judge: the score of a candidate x~ (noisy-space tokens, before the
denoiser) is

    log p(x~ | caption) - log p(x~ | empty caption)

the log-likelihood ratio behind classifier-free guidance (the model's implicit "does this clip
match the caption" classifier; caption dropout trained the unconditional branch). The candidate
with the highest score is kept. Cost: N samples plus two flow forward passes per sample.
"""

from __future__ import annotations

import torch

from megatron_starflow.sampling.generate import Generation, generate


def caption_scores(system, tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """[B] log p(tokens | caption) - log p(tokens | ""), in nats per dimension (float64)."""
    model = system.model
    dtype = next(model.parameters()).dtype
    x = tokens.to(device=system.device, dtype=dtype)
    with torch.no_grad():
        cond = model(x, system.encode_text(captions)).nll_per_dim()
        uncond = model(x, system.encode_text([""] * len(captions))).nll_per_dim()
    return (uncond - cond).double().cpu()


def generate_best_of(system, captions: list[str], candidates: int, seed: int = 0, **kwargs) -> Generation:
    """``generate`` with ``candidates`` samples per caption (one batch, the seed's noise), keeping
    for each caption the one that ``caption_scores`` ranks first. ``candidates=1`` is ``generate``.
    A ``prefix_video`` of one clip per caption is repeated for that caption's candidates."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if candidates == 1:
        return generate(system, captions, seed=seed, **kwargs)
    prefix = kwargs.pop("prefix_video", None)
    if prefix is not None and prefix.shape[0] == len(captions) > 1:
        prefix = prefix.repeat_interleave(candidates, dim=0)
    many = [c for c in captions for _ in range(candidates)]
    out = generate(system, many, seed=seed, prefix_video=prefix, **kwargs)
    scores = caption_scores(system, out.tokens, many).view(len(captions), candidates)
    pick = scores.argmax(dim=1) + torch.arange(len(captions)) * candidates
    out.video = out.video[pick]
    out.tokens = out.tokens[pick.to(out.tokens.device)]
    out.seconds = dict(out.seconds, candidates=candidates)
    return out
