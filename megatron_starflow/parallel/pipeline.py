"""Pipeline parallelism over the chain of flow blocks, with megatron's 1F1B schedule.

A stage owns a contiguous range of whole flow blocks (never part of a block's layers: every
TransformerStack keeps ``pipeline_model_parallel_size = 1`` in its megatron config, so megatron
neither splits nor renumbers its layers). What crosses a stage boundary, per sample, is the state
of the chain: the running tokens u, the running log-det sum, and the per-block conditioning (the
text embeddings, which only the deep block reads but which must reach it, with their gradient
flowing back to where they were produced). We pack the state per sample into one flat vector and
send it as ``[F, b, 1]`` (F = N*C + 1 + L*text_width): the ``[seq, micro_batch, hidden]`` shape
megatron's p2p layer sends, so megatron's schedules can carry it unchanged on GPU; on CPU we run
our own 1F1B (see ``pipeline_flow_and_fsm_backward``).

The FSM denoiser lives on stage 0: its target is the gradient of the flow loss w.r.t. the noisy
input, which exists only once the pipeline backward has reached stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_starflow.config import ModelConfig
from megatron_starflow.models.starflow import StarFlowV


def block_costs(cfg: ModelConfig) -> list[float]:
    """Relative cost of each flow block (parameters ~ layers * width^2)."""
    shallow = cfg.shallow_layers * cfg.shallow_width**2
    return [float(shallow)] * (cfg.num_blocks - 1) + [float(cfg.deep_layers * cfg.deep_width**2)]


def split_blocks(cfg: ModelConfig, pp: int, split: list[int] | str | None = None) -> list[range]:
    """Block index ranges of the ``pp`` stages: ``split`` = blocks per stage (e.g. ``"2,1"``), or
    the contiguous split that minimises the largest stage cost."""
    n = cfg.num_blocks
    if isinstance(split, str):
        split = [int(s) for s in split.split(",") if s.strip()] or None
    if split:
        if len(split) != pp or sum(split) != n or min(split) < 1:
            raise ValueError(f"pipeline split {split} must list {pp} positive block counts that "
                             f"sum to model.num_blocks={n}")
    else:
        if n < pp:
            raise ValueError(f"model.num_blocks={n} flow blocks cannot fill {pp} pipeline stages")
        costs = block_costs(cfg)
        # best[k][i]: (max stage cost, counts) splitting blocks[:i] into k stages.
        best = {(0, 0): (0.0, [])}
        for k in range(1, pp + 1):
            for i in range(k, n - (pp - k) + 1):
                options = [(max(best[(k - 1, j)][0], sum(costs[j:i])), best[(k - 1, j)][1] + [i - j])
                           for j in range(k - 1, i) if (k - 1, j) in best]
                best[(k, i)] = min(options, key=lambda o: o[0])
        split = best[(pp, n)][1]
    starts = [sum(split[:s]) for s in range(pp)]
    return [range(a, a + c) for a, c in zip(starts, split)]


def prune_to_stage(model: StarFlowV, blocks: range, first: bool) -> StarFlowV:
    """Keep only this stage's blocks (others become Identity placeholders so that indices, the
    reversal rule and state-dict names ``blocks.{i}.*`` stay those of the full model); the denoiser
    stays on the first stage only."""
    for i in range(len(model.blocks)):
        if i not in blocks:
            model.blocks[i] = nn.Identity()
    if not first:
        model.learnable_self_denoiser = None
    return model


@dataclass
class ChainShape:
    t: int
    h: int
    w: int
    c: int
    text_len: int
    text_width: int

    @property
    def width(self) -> int:  # F: flat carry per sample
        return self.t * self.h * self.w * self.c + 1 + self.text_len * self.text_width

    def pack(self, u: torch.Tensor, logdet: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([u.flatten(1), logdet[:, None].to(u.dtype), text.flatten(1).to(u.dtype)], 1)
        return flat.t().unsqueeze(-1).contiguous()  # [F, b, 1]

    def unpack(self, carry: torch.Tensor):
        flat = carry.squeeze(-1).t()
        b, n = flat.shape[0], self.t * self.h * self.w * self.c
        u = flat[:, :n].reshape(b, self.t, self.h, self.w, self.c)
        return u, flat[:, n], flat[:, n + 1:].reshape(b, self.text_len, self.text_width)


class FlowPipelineStage(nn.Module):
    """One pipeline stage of StarFlowV, in the form megatron's schedules drive (and ours): ``config``
    (a ModelParallelConfig whose ``hidden_size`` is 1, the carry's last dim), ``set_input_tensor``
    and a forward from (noisy tokens, text) on stage 0 or from the received carry elsewhere."""

    def __init__(self, model: StarFlowV, blocks: range, stage: int, stages: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.model = prune_to_stage(model, blocks, stage == 0)
        self.block_range, self.stage, self.stages = blocks, stage, stages
        self.config = ModelParallelConfig(pipeline_model_parallel_size=stages, pipeline_dtype=dtype)
        self.config.hidden_size = 1  # read by the schedule's tensor-shape helper
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by the schedule
        self.input_tensor: torch.Tensor | None = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, shape: ChainShape, noisy: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the packed carry, or on the last stage the per-sample NLL per dim ``[b]``."""
        m = self.model
        if self.is_first:
            u, logdet = noisy, torch.zeros(noisy.shape[0], dtype=noisy.dtype, device=noisy.device)
        else:
            u, logdet, text = shape.unpack(self.input_tensor)
        b = u.shape[0]
        for i in self.block_range:
            if i < len(m.blocks) - 1:
                u, ld = m.shallow_forward(i, u)
            else:
                layout = m.deep_layout(shape.t, shape.h, shape.w)
                z, ld = m.deep_block(u.reshape(b, -1, shape.c), layout, text)
                u = z.reshape(u.shape)
            logdet = logdet + ld
        if not self.is_last:
            return shape.pack(u, logdet, text)
        dims = shape.t * shape.h * shape.w * shape.c
        return 0.5 * u.flatten(1).pow(2).mean(1) - logdet / dims


def _run_1f1b(stage: FlowPipelineStage, shape: ChainShape, microbatches: list[dict],
              group=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Non-interleaved 1F1B over the stages of ``group`` (megatron's PP group by default): stage s
    runs min(P-s-1, M) warm-up forwards, then alternates one forward and one backward, then drains
    the remaining backwards. Sends are non-blocking (their handles are waited at the end), receives
    blocking; every pair of stages sends and receives in the same order, so it cannot deadlock.
    Returns (noisy leaves of stage 0, per-microbatch losses of the last stage)."""
    from megatron.core import parallel_state

    group = group or parallel_state.get_pipeline_model_parallel_group()
    prev_rank = next_rank = None
    if not stage.is_first:
        prev_rank = dist.get_global_rank(group, stage.stage - 1)
    if not stage.is_last:
        next_rank = dist.get_global_rank(group, stage.stage + 1)
    num = len(microbatches)
    pending: list = []  # (request, tensor kept alive until the send completes)
    leaves, losses = [], []
    dtype = microbatches[0]["noisy"].dtype

    def carry_buffer(mb):
        return torch.empty(shape.width, mb["noisy"].shape[0], 1, dtype=dtype,
                           device=mb["noisy"].device)

    def forward(i):
        mb = microbatches[i]
        if stage.is_first:
            inp = mb["noisy"].detach().requires_grad_(True)
            leaves.append(inp)
            out = stage(shape, inp, mb["text"])
        else:
            inp = carry_buffer(mb)
            dist.recv(inp, prev_rank)
            inp.requires_grad_(True)
            stage.set_input_tensor(inp)
            out = stage(shape)
        if stage.is_last:
            loss = out.mean()
            losses.append(loss.detach())
            return inp, loss / num  # each microbatch's mean, so the sum is the batch mean
        sent = out.detach().contiguous()
        pending.append((dist.isend(sent, next_rank), sent))
        return inp, out

    def backward(inp, out):
        if stage.is_last:
            out.backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, next_rank)
            out.backward(grad)
        if not stage.is_first:
            sent = inp.grad.contiguous()
            pending.append((dist.isend(sent, prev_rank), sent))

    warmup = min(stage.stages - stage.stage - 1, num)
    queue = [forward(i) for i in range(warmup)]
    for i in range(warmup, num):
        queue.append(forward(i))
        backward(*queue.pop(0))
    while queue:
        backward(*queue.pop(0))
    for request, _ in pending:
        request.wait()
    return leaves, losses


def pipeline_flow_and_fsm_backward(stage: FlowPipelineStage, microbatches: list[dict],
                                   fsm_weight: float = 1.0, group=None) -> dict:
    """Pipelined counterpart of ``training.losses.flow_and_fsm_backward`` for one global batch
    split into equal ``microbatches`` (dicts with ``noisy`` [b,T,H,W,C] and ``text``; stages other
    than the first read only their shapes). 1F1B for the flow loss, then (stage 0) the denoiser on
    the target -sigma * grad. Grads accumulate into ``.grad``. Returns ``{"flow": batch-mean loss}``
    on the last stage and ``{"fsm": ...}`` on the first.

    Why not megatron's ``get_forward_backward_func``: in megatron-core 0.16 its schedules allocate
    ``torch.zeros(..., device="cuda")`` unconditionally (and its p2p layer synchronises CUDA), so
    they cannot run on CPU/gloo where this is tested. ``FlowPipelineStage`` keeps the interface
    those schedules drive (``config``, ``model_type``, ``set_input_tensor``), for GPU use."""
    first = microbatches[0]
    _, t, h, w, c = first["noisy"].shape
    shape = ChainShape(t, h, w, c, first["text"].shape[1], first["text"].shape[2])
    num = len(microbatches)
    leaves, losses = _run_1f1b(stage, shape, microbatches, group)
    result = {}
    if stage.is_last:
        result["flow"] = torch.stack(losses).mean()
    den = stage.model.learnable_self_denoiser
    if stage.is_first and den is not None:
        total_batch = sum(mb["noisy"].shape[0] for mb in microbatches)
        dims = t * h * w * c
        fsm_total = 0.0
        for mb, noisy in zip(microbatches, leaves):
            # Each microbatch's loss was divided by num: noisy.grad is the grad of the global-batch
            # mean, as in the one-process loss, so the one-process rescaling applies.
            target = (-stage.model.cfg.noise_std * noisy.grad * total_batch * dims).detach()
            pred = stage.model.denoise_score(noisy.detach(), mb["text"].detach())
            fsm = F.mse_loss(pred, target)
            (fsm_weight * fsm / num).backward()
            fsm_total += fsm.detach() / num
        result["fsm"] = fsm_total
    return result


@torch.no_grad()
def pipeline_forward(stage: FlowPipelineStage, microbatches: list[dict], group=None):
    """Forward only (held-out evaluation): each micro-batch flows through the stages in turn.
    Returns the per-sample NLL per dimension ``[sum of b]`` on the last stage, None elsewhere."""
    from megatron.core import parallel_state

    group = group or parallel_state.get_pipeline_model_parallel_group()
    first = microbatches[0]
    _, t, h, w, c = first["noisy"].shape
    shape = ChainShape(t, h, w, c, first["text"].shape[1], first["text"].shape[2])
    outputs = []
    for mb in microbatches:
        if stage.is_first:
            out = stage(shape, mb["noisy"], mb["text"])
        else:
            carry = torch.empty(shape.width, mb["noisy"].shape[0], 1, dtype=mb["noisy"].dtype,
                                device=mb["noisy"].device)
            dist.recv(carry, dist.get_global_rank(group, stage.stage - 1))
            stage.set_input_tensor(carry)
            out = stage(shape)
        if stage.is_last:
            outputs.append(out)
        else:
            dist.send(out.contiguous(), dist.get_global_rank(group, stage.stage + 1))
    return torch.cat(outputs) if outputs else None
