"""The step contract: ``forward_backward(noisy, text) -> losses`` for one data-parallel replica's
batch, with gradients accumulated into the parameters, and ``nll(noisy, text)`` (forward only,
per-sample NLL per dimension) for held-out evaluation. One implementation per way of splitting
the model, chosen from the layout; the loop around them is the same.

* ``LocalStep``: the whole model on this rank (one process, DP, TP, TP+SP).
* ``ContextParallelStep``: the deep block's and the denoiser's sequences split by latent frames
  over the CP group (``parallel/context_parallel.py``). Each rank's loss is its share of the
  replica's loss, scaled by ``cp`` because gradients are averaged over data x context ranks.
* ``PipelineStep``: this rank's contiguous flow blocks (``parallel/pipeline.py``), 1F1B over
  micro-batches; the denoiser lives on the first stage.

Losses returned: ``flow`` (mean NLL per dimension, the optimised loss), ``bits_per_dim`` and
``fsm`` (denoiser MSE), each a float on the ranks that compute it and None elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_starflow.models.starflow import HALF_LOG_2PI
from megatron_starflow.training.layout import ProcessLayout
from megatron_starflow.training.losses import flow_and_fsm_backward, fsm_target


def bits_per_dim(nll_per_dim: float) -> float:
    return (nll_per_dim + HALF_LOG_2PI) / math.log(2)


class LocalStep:
    def __init__(self, model, fsm_weight: float):
        self.model, self.fsm_weight = model, fsm_weight

    def forward_backward(self, noisy: torch.Tensor, text: torch.Tensor) -> dict:
        losses = flow_and_fsm_backward(self.model, noisy, text, self.fsm_weight)
        return {"flow": losses.flow.item(), "bits_per_dim": losses.bits_per_dim.item(),
                "fsm": None if losses.fsm is None else losses.fsm.item()}

    @torch.no_grad()
    def nll(self, noisy: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        return self.model(noisy, text).nll_per_dim()


class ContextParallelStep:
    def __init__(self, model, fsm_weight: float, layout: ProcessLayout):
        self.model, self.fsm_weight, self.layout = model, fsm_weight, layout

    def _ranges(self, frames: int):
        from megatron_starflow.parallel.context_parallel import frame_split

        return frame_split(frames, self.layout.cp_size)

    def forward_backward(self, noisy: torch.Tensor, text: torch.Tensor) -> dict:
        from megatron_starflow.parallel.context_parallel import cp_denoise_score, cp_flow_nll

        group, cp = self.layout.cp_group, self.layout.cp_size
        b, t, h, w, c = noisy.shape
        ranges = self._ranges(t)
        a, e = ranges[self.layout.cp_rank]
        noisy = noisy.detach().requires_grad_(True)
        local, total = cp_flow_nll(self.model, noisy, text, group, ranges)
        (local * cp).backward()
        result = {"flow": total.item(), "bits_per_dim": bits_per_dim(total.item()), "fsm": None}
        den = self.model.learnable_self_denoiser
        if den is None:
            return result
        # Each rank's input grad is its share of the replica's (scaled by cp): sum and unscale.
        grad = noisy.grad.clone()
        dist.all_reduce(grad, group=group)
        grad /= cp
        dims = t * h * w * c
        target = fsm_target(grad[:, a:e], b * dims, self.model.cfg.noise_std).detach()
        local_noisy = noisy.detach()[:, a:e].reshape(b, (e - a) * h * w, c)
        pred = cp_denoise_score(den, local_noisy, self.model.denoiser_layout(t, h, w), text.detach(),
                                ranges, group)
        # The replica's MSE is a mean over all B*N*C elements: this rank holds its share.
        sq = (pred.float() - target.reshape(pred.shape).float()).pow(2).sum() / noisy.numel()
        (self.fsm_weight * sq * cp).backward()
        fsm = sq.detach().clone()
        dist.all_reduce(fsm, group=group)
        result["fsm"] = fsm.item()
        return result

    @torch.no_grad()
    def nll(self, noisy: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        """Per-sample NLL per dimension (every CP rank returns the same values)."""
        from megatron_starflow.parallel.context_parallel import cp_flow_nll_per_sample

        return cp_flow_nll_per_sample(self.model, noisy, text, self.layout.cp_group,
                                      self._ranges(noisy.shape[1]))


class PipelineStep:
    def __init__(self, stage, fsm_weight: float, layout: ProcessLayout, micro_batches: int):
        self.stage, self.fsm_weight, self.layout = stage, fsm_weight, layout
        self.micro_batches = micro_batches

    def _split(self, noisy: torch.Tensor, text: torch.Tensor) -> list[dict]:
        return [{"noisy": n, "text": t} for n, t in zip(noisy.chunk(self.micro_batches),
                                                         text.chunk(self.micro_batches))]

    def forward_backward(self, noisy: torch.Tensor, text: torch.Tensor) -> dict:
        from megatron_starflow.parallel.pipeline import pipeline_flow_and_fsm_backward

        # The micro-batches' backwards reach the text embeddings one after another: they
        # accumulate into a leaf, whose gradient then runs through the text encoder once.
        leaf = text.detach().requires_grad_(text.requires_grad)
        out = pipeline_flow_and_fsm_backward(self.stage, self._split(noisy, leaf), self.fsm_weight,
                                             group=self.layout.pp_group)
        if leaf.grad is not None:
            text.backward(leaf.grad)
        flow = out["flow"].item() if "flow" in out else None
        return {"flow": flow, "bits_per_dim": None if flow is None else bits_per_dim(flow),
                "fsm": out["fsm"].item() if "fsm" in out else None}

    @torch.no_grad()
    def nll(self, noisy: torch.Tensor, text: torch.Tensor) -> torch.Tensor | None:
        """Per-sample NLL per dimension on the last stage (None on the others)."""
        from megatron_starflow.parallel.pipeline import pipeline_forward

        return pipeline_forward(self.stage, self._split(noisy, text), group=self.layout.pp_group)


def build_step(model_or_stage, cfg, layout: ProcessLayout):
    if layout.pp_size > 1:
        return PipelineStep(model_or_stage, cfg.model.fsm_weight, layout,
                            cfg.parallel.micro_batches or layout.pp_size)
    if layout.cp_size > 1:
        return ContextParallelStep(model_or_stage, cfg.model.fsm_weight, layout)
    return LocalStep(model_or_stage, cfg.model.fsm_weight)
