"""The fast path's CPU linears (``models.cpu_linear``): oneDNN's GEMM for large float32 products,
against a float64 reference (output and the gradients of input, weight and bias), the fused GELU,
and ``F.linear`` exactly where oneDNN is not taken (small products, float64)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_starflow.models import cpu_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _relative(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def test_large_float32_product_matches_float64_with_gradients():
    x64, w64, b64 = _rand(3, 200, 96, seed=1), _rand(128, 96, seed=2) * 0.1, _rand(128, seed=3)
    grad = _rand(3, 200, 128, seed=4)
    assert cpu_linear.onednn_usable(x64.float(), w64.float()) == cpu_linear._BUILT_WITH_ONEDNN
    leaves = [t.float().requires_grad_(True) for t in (x64, w64, b64)]
    out = cpu_linear.linear(*leaves)
    out.backward(grad.float())
    refs = [t.clone().requires_grad_(True) for t in (x64, w64, b64)]
    ref = F.linear(*refs)
    ref.backward(grad)
    assert _relative(out.detach(), ref.detach()) < 1e-5
    for leaf, r in zip(leaves, refs):
        assert leaf.grad.shape == r.grad.shape
        assert _relative(leaf.grad, r.grad) < 1e-5
    with torch.no_grad():  # the no-grad call (no autograd function) and the fused GELU
        assert _relative(cpu_linear.linear(*(t.float() for t in (x64, w64, b64))), ref.detach()) < 1e-5
        fused = cpu_linear.linear_gelu(x64.float(), w64.float(), b64.float(), F.gelu)
        assert _relative(fused, F.gelu(ref.detach())) < 1e-5


def test_small_products_and_float64_stay_on_f_linear():
    x, w, b = _rand(1, 4, 32, seed=5), _rand(16, 32, seed=6), _rand(16, seed=7)
    assert x.numel() * w.shape[0] < cpu_linear.MIN_MACS
    assert not cpu_linear.onednn_usable(x.float(), w.float())
    assert torch.equal(cpu_linear.linear(x.float(), w.float(), b.float()), F.linear(x.float(), w.float(), b.float()))
    big = _rand(3, 200, 96, seed=8)
    wide = _rand(128, 96, seed=9)
    assert big.numel() * wide.shape[0] >= cpu_linear.MIN_MACS
    assert not cpu_linear.onednn_usable(big, wide)  # float64: the invariant tests' dtype
    assert torch.equal(cpu_linear.linear(big, wide), F.linear(big, wide))
    assert not cpu_linear.onednn_usable(big.bfloat16(), wide.bfloat16())
    # an activation other than erf GELU is applied after the linear, not fused
    out = cpu_linear.linear_gelu(big.float(), wide.float(), None, torch.tanh)
    assert _relative(out, torch.tanh(F.linear(big, wide))) < 1e-5
