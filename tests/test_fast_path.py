"""The stack's fast path (``TransformerStack._fast_forward``: the local-spec layers computed from
their parameters) against megatron's TransformerBlock on the same weights, in float64: forward,
parameter and input gradients, recompute, KV-cached passes (committed or not), windowed and
first-layer masks, and the static KV cache's bookkeeping."""

import pytest
import torch

from megatron_starflow.models.layout import SlotLayout
from megatron_starflow.models.transformer import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-12


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _stack(megatron_ready, recompute=False, layers=2, width=32, head_dim=16):
    from megatron_starflow.models.transformer import TransformerStack

    torch.manual_seed(0)
    stack = TransformerStack(width, layers, head_dim, recompute=recompute).double()
    with torch.no_grad():  # biases and norms start at 0/1: randomise so each one is exercised
        for i, (name, p) in enumerate(stack.named_parameters()):
            p.add_(_rand(*p.shape, seed=i) * (0.3 if "bias" in name or "norm" in name else 0.05))
    return stack


def _both(stack, *args, **kwargs):
    """(fast path output, megatron output) of the same call."""
    assert stack.uses_fast_path(args[0])
    fast = stack(*args, **kwargs)
    stack.fast = False
    try:
        assert not stack.uses_fast_path(args[0])
        slow = stack(*args, **kwargs)
    finally:
        stack.fast = True
    return fast, slow


@pytest.mark.parametrize("window", [0, 1])
def test_forward_and_grads_match_megatron(megatron_ready, window):
    stack = _stack(megatron_ready).train()
    layout = SlotLayout(3, 3, 2, 2, with_time=True, pt_seq_len=4.0, window=window)
    angles = layout.angles(16, 10000.0, 0.25)
    x = _rand(2, layout.total, 32, seed=1)
    grads = []
    for fast in (True, False):
        stack.fast = fast
        xi = x.clone().requires_grad_(True)
        out = stack(xi, layout.attention_mask(), angles)
        (out * _rand(*out.shape, seed=2)).sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in stack.named_parameters()}))
        stack.zero_grad(set_to_none=True)
    stack.fast = True
    (o1, g1, p1), (o2, g2, p2) = grads
    assert (o1 - o2).abs().max() < TOL
    assert (g1 - g2).abs().max() < TOL
    assert max((p1[n] - p2[n]).abs().max().item() for n in p1) < TOL
    # None = causal; the megatron path builds the same mask the layout gives
    if window == 0:
        with torch.no_grad():
            a = stack(x, None, angles)
            b = stack(x, layout.causal_mask(), angles)
        assert (a - b).abs().max() < TOL


def test_recompute_matches(megatron_ready):
    plain, recomputed = _stack(megatron_ready), _stack(megatron_ready, recompute=True)
    plain.train(), recomputed.train()
    layout = SlotLayout(0, 2, 2, 3, with_time=False, pt_seq_len=4.0)
    angles = layout.angles(16, 10000.0, 0.25)
    out = []
    for stack in (plain, recomputed):
        x = _rand(2, layout.total, 32, seed=3).requires_grad_(True)
        stack(x, None, angles).pow(2).sum().backward()
        out.append((x.grad, [p.grad for p in stack.parameters()]))
    assert (out[0][0] - out[1][0]).abs().max() < TOL
    assert max((a - b).abs().max().item() for a, b in zip(out[0][1], out[1][1])) < TOL


def test_first_layer_mask(megatron_ready):
    stack = _stack(megatron_ready)
    layout = SlotLayout(2, 3, 2, 2, with_time=True, pt_seq_len=4.0, window=2)
    angles = layout.angles(16, 10000.0, 0.25)
    x = _rand(1, layout.total, 32, seed=4)
    with torch.no_grad():
        fast, slow = _both(stack, x, layout.lookahead_mask(0), angles,
                           first_layer_allowed=layout.lookahead_mask(1))
    assert (fast - slow).abs().max() < TOL


@pytest.mark.parametrize("window", [0, 1])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_passes_match_megatron(megatron_ready, window, chunk):
    """Text prefill, then chunks: a non-committed pass, then the committing one; both paths write
    the same cache (and may share it), and the outputs equal a full parallel pass."""
    stack = _stack(megatron_ready)
    layout = SlotLayout(2, 3, 2, 2, with_time=True, pt_seq_len=4.0, window=window)
    angles = layout.angles(16, 10000.0, 0.25)
    x = _rand(2, layout.total, 32, seed=5)
    with torch.no_grad():
        full = stack(x, layout.attention_mask(), angles)
        caches = [KVCache(), KVCache(capacity=layout.total)]
        for fast, cache in zip((True, False), caches):
            stack.fast = fast
            stack(x[:, :2], layout.attention_mask(0, 2), angles[:2], cache, commit=True)
            start = 2
            while start < layout.total:
                n = min(chunk, layout.total - start)
                part = slice(start, start + n)
                args = (x[:, part], layout.attention_mask(start, n), angles[part], cache)
                try_out = stack(*args, commit=False)
                assert len(cache) == start and cache.written == n
                out = stack(*args, commit=True)
                assert len(cache) == start + n
                assert (try_out - out).abs().max() < TOL
                assert (out - full[:, part]).abs().max() < 1e-10
                start += n
        stack.fast = True
    for layer in caches[0].layers:
        for a, b in zip(caches[0].get(layer), caches[1].get(layer)):
            assert a.shape == (2, 2, layout.total, 16) and (a - b).abs().max() < TOL


def test_kv_cache_bookkeeping():
    cache = KVCache(capacity=2)
    k = _rand(1, 2, 3, 4, seed=6)
    kk, vv = cache.write(1, k, -k)  # grows past the capacity hint
    assert kk.shape == (1, 2, 3, 4) and len(cache) == 0 and cache.written == 3
    cache.commit_written()
    assert len(cache) == 3
    k2 = _rand(1, 2, 5, 4, seed=7)
    kk, vv = cache.write(1, k2, -k2)  # doubles (and keeps the committed slots)
    assert torch.equal(kk[:, :, :3], k) and torch.equal(vv[:, :, 3:], -k2)
    copy = cache.clone()
    cache.advance(5)
    assert len(copy) == 3 and len(cache) == 8
    copy.write(1, k, k)  # the copy's buffer is its own
    assert torch.equal(cache.get(1)[0][:, :, 3:], k2)
    cache.truncate(4)
    assert len(cache) == 4 and cache.get(1)[0].shape[2] == 4


def test_prefix_runs_of_the_denoiser_masks(megatron_ready):
    """Frame-causal / look-ahead masks without a binding window: every query row sees a prefix of
    the keys, so attention runs once per frame on its prefix (no mask), equal to the masked call."""
    from megatron_starflow.models.prefix_attention import PrefixRuns
    from megatron_starflow.models.transformer import _sdpa_mask

    stack = _stack(megatron_ready).train()
    layout = SlotLayout(16, 4, 4, 4, with_time=True, pt_seq_len=4.0, window=10)
    runs = _sdpa_mask(layout.lookahead_mask(1), layout.total, 0, torch.float64, "cpu")
    assert isinstance(runs, PrefixRuns)
    # text and frame 0 see frames 0-1, frame 1 frames 0-2, frames 2 and 3 everything
    assert runs.runs == [(0, 32, 48), (32, 48, 64), (48, 80, 80)]
    assert PrefixRuns.of(SlotLayout(2, 3, 2, 2, True, 4.0, window=1).lookahead_mask(1)) is None
    assert PrefixRuns.of(torch.ones(8, 8, dtype=torch.bool).tril()) is None  # causal: 8 runs of 1
    angles = layout.angles(16, 10000.0, 0.25)
    x = _rand(2, layout.total, 32, seed=8)
    grads = []
    for fast in (True, False):
        stack.fast = fast
        xi = x.clone().requires_grad_(True)
        out = stack(xi, layout.lookahead_mask(0), angles, first_layer_allowed=layout.lookahead_mask(1))
        out.pow(2).sum().backward()
        grads.append((out.detach(), xi.grad))
    stack.fast = True
    assert (grads[0][0] - grads[1][0]).abs().max() < TOL
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-10


def test_cached_parameters_follow_updates_and_conversions(megatron_ready):
    """The fast path gathers each layer's parameters once: in-place updates show through, and a
    dtype conversion (which may replace them) is picked up."""
    from megatron_starflow.models.transformer import TransformerStack

    torch.manual_seed(0)
    stack = TransformerStack(32, 2, 16)
    layout = SlotLayout(0, 2, 2, 2, with_time=False, pt_seq_len=4.0)
    angles = layout.angles(16, 10000.0, 0.25)
    with torch.no_grad():
        stack(_rand(1, layout.total, 32).float(), None, angles)  # gathers float32 parameters
        stack.double()
        for p in stack.parameters():
            p.add_(_rand(*p.shape, seed=9) * 0.1)
        fast, slow = _both(stack, _rand(1, layout.total, 32), None, angles)
    assert fast.dtype == torch.float64 and (fast - slow).abs().max() < TOL


def test_bfloat16_parameters(megatron_ready):
    """bf16 parameters (inference in bf16): the real-valued RoPE rotation (complex bf16 does not
    exist) with cos / sin of the bf16 angles, as megatron computes them."""
    stack = _stack(megatron_ready).to(torch.bfloat16)
    layout = SlotLayout(2, 2, 2, 2, with_time=True, pt_seq_len=4.0)
    angles = layout.angles(16, 10000.0, 0.25)
    with torch.no_grad():
        fast, slow = _both(stack, _rand(2, layout.total, 32, seed=10).to(torch.bfloat16), None, angles)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - slow.float()).abs().max() < 0.05 * slow.float().abs().max()
