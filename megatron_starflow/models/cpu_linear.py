"""Linear layers of the fast path on CPU through oneDNN's GEMM instead of the BLAS behind F.linear.

Torch's CPU ``F.linear`` / ``addmm`` in float32 call MKL's SGEMM. On AMD CPUs MKL runs its
generic code path: on this AVX-512 EPYC (Zen 5) about 100 GFLOP/s on one core, while oneDNN's
GEMM (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses for frozen linears) runs
the same float32 products at 180-200 GFLOP/s, for all three GEMMs of a linear (output, input
gradient, weight gradient: oneDNN takes the transposed operands as strided views). Same math in
float32 (accumulation order differs at the 1e-7 relative level, as between any two GEMMs).

oneDNN pays a fixed cost per call (~10-20 us here), so only products of at least
``MIN_MACS`` multiply-adds take it (measured break-even: 1-3 M; the one-token steps of sequential
sampling stay on ``F.linear``). Only float32 CPU tensors take this path, and only where torch was
built with oneDNN; float64 (the invariant tests), bfloat16 and other devices keep ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


MIN_MACS = 2_000_000
# a property of the torch build, looked up once: the checks below run on every linear call
_BUILT_WITH_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through oneDNN's GEMM: a product large enough to pay for the
    call, float32 CPU tensors, oneDNN built in."""
    return (x.numel() * weight.shape[0] >= MIN_MACS and x.dtype == torch.float32
            and x.device.type == "cpu" and _BUILT_WITH_ONEDNN)


def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """FlopCounterMode's count of a oneDNN linear (it knows addmm / mm, not this op), so that
    measured FLOPs (MFU, tests/test_flops_memory.py) see the fast path's GEMMs."""
    macs = w_shape[0]
    for n in x_shape:
        macs *= n
    return 2 * macs


if _BUILT_WITH_ONEDNN:
    from torch.utils import flop_counter

    if torch.ops.mkldnn._linear_pointwise not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_flops)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
    """x @ weight.T (+ bias) (then GELU with activation="gelu") by oneDNN; weight [out, in]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none")


def _records_grad(*tensors) -> bool:
    """Whether autograd would record an op on ``tensors`` (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN for float32 CPU tensors (with gradients)."""
    if not onednn_usable(x, weight):
        return F.linear(x, weight, bias)
    if _records_grad(x, weight, bias):
        return _OneDnnLinear.apply(x, weight, bias)
    return _gemm(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation):
    """``activation(F.linear(x, weight, bias))``; without gradients and with ``F.gelu`` (erf) the
    GELU is fused into oneDNN's GEMM."""
    if activation is F.gelu and onednn_usable(x, weight) and not _records_grad(x, weight, bias):
        return _gemm(x, weight, bias, "gelu")
    return activation(linear(x, weight, bias))


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _gemm(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(grad, weight.t(), None)  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # grad.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b
