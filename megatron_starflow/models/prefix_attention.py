"""Attention over runs of query rows that each see a prefix of the keys, skipping masked blocks.

Two masks of the model have this shape:

* the denoiser's frame-causal / look-ahead masks: every query row of a frame sees the same key
  prefix (one run per frame, no mask inside a run);
* the causal mask of a whole sequence (the flow blocks' training and likelihood passes): rows
  ``[lo, hi)`` see keys ``[0, hi)`` with a causal triangle over their own keys.

Torch's CPU flash kernel splits keys into blocks of up to 512 and computes every block a query
block touches in full, so on a 528-token causal pass it skips almost nothing; cutting the rows
into runs of ``CAUSAL_RUN_ROWS`` and handing each run only its key prefix computes about half the
score matrix instead (measured: forward 0.68x, forward + backward 0.80x of one causal call at the
tiny and 25 M deep-block shapes). GPU kernels skip causal blocks themselves, so the causal runs are
built only for CPU tensors (``PrefixRuns.causal``); the math is the same either way.

With gradients on CPU, the runs go through one autograd function that calls the flash kernel's
forward and backward per run and adds the key / value gradients of each run into one buffer in
place (autograd's slice backward would allocate and add a full-size zero tensor per run and
operand). Elsewhere the runs are plain ``scaled_dot_product_attention`` calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _register_flop_formulas() -> None:
    """FlopCounterMode counts SDPA through the kernels it dispatches to, and has no formula for the
    CPU flash kernel that ``_CpuFlashRuns`` calls directly: give it the same count as for any
    other SDPA kernel, so measured FLOPs (MFU, tests/test_flops_memory.py) see these runs."""
    from torch.utils import flop_counter

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(forward)(
            lambda query, key, value, *args, **kwargs: flop_counter.sdpa_flop_count(query, key, value))
    if backward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out, query, key, value))


_register_flop_formulas()

CAUSAL_RUN_ROWS = 64  # query rows per run of a causal pass (best of 32 / 64 / 128 measured)
CAUSAL_MIN_ROWS = 256  # shorter causal passes: one causal call is as fast


class PrefixRuns:
    """Query rows in runs ``(first row, end row, keys)``, each seeing keys ``[0, keys)``; ``masks``
    per run an additive mask over those keys (None: the whole prefix)."""

    MAX_RUNS = 64
    MIN_ROWS = 8  # per run on average: short runs cost more in calls than they save
    MIN_SAVING = 0.2  # of the mask's area; otherwise one masked call is faster

    def __init__(self, runs, masks=None):
        self.runs = runs
        self.masks = list(masks) if masks is not None else [None] * len(runs)

    @classmethod
    def of(cls, allowed: torch.Tensor) -> "PrefixRuns | None":
        """The runs of a boolean mask (True = attend) whose rows each allow a key prefix, or None
        when it has no such shape or splitting would not pay."""
        if allowed.dim() != 2:
            return None
        rows, keys = allowed.shape
        lengths = allowed.sum(1)
        if (lengths == 0).any():
            return None
        if not torch.equal(allowed, torch.arange(keys, device=allowed.device)[None, :] < lengths[:, None]):
            return None
        change = torch.nonzero(lengths[1:] != lengths[:-1]).flatten().tolist()
        if len(change) + 1 > min(cls.MAX_RUNS, rows // cls.MIN_ROWS):
            return None
        bounds = [0] + [c + 1 for c in change] + [rows]
        runs = [(lo, hi, int(lengths[lo])) for lo, hi in zip(bounds[:-1], bounds[1:])]
        if sum((hi - lo) * n for lo, hi, n in runs) > (1 - cls.MIN_SAVING) * rows * keys:
            return None
        return cls(runs)

    @classmethod
    def causal(cls, s: int, dtype: torch.dtype, device) -> "PrefixRuns | None":
        """Runs of a causal pass over ``s`` slots (no cache), or None where one causal kernel call
        is the faster choice (short passes; devices whose kernels skip masked blocks)."""
        if torch.device(device).type != "cpu" or s < CAUSAL_MIN_ROWS:
            return None
        runs, masks = [], []
        for lo in range(0, s, CAUSAL_RUN_ROWS):
            hi = min(s, lo + CAUSAL_RUN_ROWS)
            runs.append((lo, hi, hi))
            # row i (slot lo + i) sees keys up to its own slot
            masks.append(torch.full((hi - lo, hi), float("-inf"), dtype=dtype, device=device).triu_(lo + 1))
        return cls(runs, masks)


def prefix_attention(q, k, v, runs: PrefixRuns, scale: float | None) -> torch.Tensor:
    """Attention of ``q`` [B, H, S, d] over ``k``, ``v`` [B, H, S_k, d] by runs -> [B, H, S, d]."""
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grads and q.device.type == "cpu":
        return _CpuFlashRuns.apply(q, k, v, runs, scale)
    out = _heads_last(q)
    for (lo, hi, keys), mask in zip(runs.runs, runs.masks):
        out[:, :, lo:hi] = F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, :keys],
                                                          v[:, :, :keys], attn_mask=mask, scale=scale)
    return out


def _heads_last(q: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, d] output laid out as [B, S, H, d] (as the flash kernel lays out its
    own), so that the caller's merge of the heads into [B, S, H * d] is a view, not a copy."""
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


class _CpuFlashRuns(torch.autograd.Function):
    """Per run the CPU flash kernel's forward (keeping its log-sum-exp) and backward; key and
    value gradients of the runs summed in place."""

    @staticmethod
    def forward(ctx, q, k, v, runs: PrefixRuns, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out = _heads_last(q)
        lses = []
        for (lo, hi, keys), mask in zip(runs.runs, runs.masks):
            o, lse = flash(q[:, :, lo:hi], k[:, :, :keys], v[:, :, :keys], 0.0, False,
                           attn_mask=mask, scale=scale)
            out[:, :, lo:hi] = o
            lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.runs, ctx.scale = runs, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, out, *lses = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i, ((lo, hi, keys), mask) in enumerate(zip(ctx.runs.runs, ctx.runs.masks)):
            gq, gk, gv = flash_backward(grad[:, :, lo:hi], q[:, :, lo:hi],
                                        k[:, :, :keys], v[:, :, :keys], out[:, :, lo:hi], lses[i],
                                        0.0, False, attn_mask=mask, scale=ctx.scale)
            dq[:, :, lo:hi] = gq
            dk[:, :, :keys] += gk
            dv[:, :, :keys] += gv
        return dq, dk, dv, None, None
