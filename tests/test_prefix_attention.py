"""Attention by runs of query rows over key prefixes (``models.prefix_attention``) against one
masked attention call, in float64: outputs and q / k / v gradients of the causal runs and of a
denoiser-like frame mask, the CPU-only choice of causal runs, and a causal stack pass (fast path
through the runs) against megatron's block."""

import pytest
import torch
import torch.nn.functional as F

from megatron_starflow.models.prefix_attention import CAUSAL_MIN_ROWS, CAUSAL_RUN_ROWS, PrefixRuns, prefix_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense(q, k, v, allowed, scale):
    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _frame_mask(text: int, frames: int, per_frame: int) -> torch.Tensor:
    """Text and frame 0 see frames 0-1, frame f sees frames up to f + 1 (the look-ahead shape)."""
    s = text + frames * per_frame
    ends = [min(s, text + 2 * per_frame)] * (text + per_frame)
    for f in range(1, frames):
        ends += [min(s, text + (f + 2) * per_frame)] * per_frame
    return torch.arange(s)[None, :] < torch.tensor(ends)[:, None]


@pytest.mark.parametrize("kind", ["causal", "frames"])
def test_runs_equal_one_masked_call_with_gradients(kind):
    s = 300 if kind == "causal" else 16 + 5 * 24
    allowed = (torch.ones(s, s, dtype=torch.bool).tril() if kind == "causal"
               else _frame_mask(16, 5, 24))
    runs = PrefixRuns.causal(s, torch.float64, "cpu") if kind == "causal" else PrefixRuns.of(allowed)
    assert runs is not None
    if kind == "causal":
        assert [r[:2] for r in runs.runs] == [(lo, min(s, lo + CAUSAL_RUN_ROWS))
                                              for lo in range(0, s, CAUSAL_RUN_ROWS)]
    # q, k, v as the stack makes them: strided views of one projection
    qkv = _rand(2, s, 3, 3, 8, seed=1)
    grad_out = _rand(2, 3, s, 8, seed=2)
    results = []
    for fn in (lambda q, k, v: prefix_attention(q, k, v, runs, 0.3),
               lambda q, k, v: _dense(q, k, v, allowed, 0.3)):
        leaf = qkv.clone().requires_grad_(True)
        q, k, v = (t.transpose(1, 2) for t in leaf.unbind(2))
        out = fn(q, k, v)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (o1, g1), (o2, g2) = results
    assert o1.shape == (2, 3, s, 8)
    assert (o1 - o2).abs().max() < 1e-12
    assert (g1 - g2).abs().max() < 1e-12
    with torch.no_grad():  # the plain per-run path (no gradients, or a device other than CPU)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        assert (prefix_attention(q, k, v, runs, 0.3) - o2).abs().max() < 1e-12


def test_causal_runs_only_on_cpu_and_long_passes():
    assert PrefixRuns.causal(CAUSAL_MIN_ROWS - 1, torch.float32, "cpu") is None
    assert PrefixRuns.causal(CAUSAL_MIN_ROWS, torch.float32, "meta") is None
    runs = PrefixRuns.causal(CAUSAL_MIN_ROWS + 1, torch.float32, "cpu")
    assert runs.runs[-1] == (CAUSAL_MIN_ROWS, CAUSAL_MIN_ROWS + 1, CAUSAL_MIN_ROWS + 1)
    last = runs.masks[-1]  # the last slot sees every key
    assert last.shape == (1, CAUSAL_MIN_ROWS + 1) and bool((last == 0).all())
    # inside a run, row i sees keys up to lo + i
    lo, hi, _ = runs.runs[1]
    seen = runs.masks[1] == 0
    assert torch.equal(seen.sum(1), torch.arange(lo + 1, hi + 1))


def test_causal_stack_pass_matches_megatron(megatron_ready):
    """A whole-sequence causal pass long enough for causal runs: the fast path (runs, CPU flash
    forward and backward per run) equals megatron's block, forward and every gradient."""
    from megatron_starflow.models.layout import SlotLayout
    from megatron_starflow.models.transformer import TransformerStack, _sdpa_mask

    torch.manual_seed(0)
    stack = TransformerStack(32, 2, 16).double().train()
    with torch.no_grad():
        for i, (name, p) in enumerate(stack.named_parameters()):
            p.add_(_rand(*p.shape, seed=i) * (0.3 if "bias" in name or "norm" in name else 0.05))
    layout = SlotLayout(0, 5, 8, 8, with_time=True, pt_seq_len=8.0)
    s = layout.total
    assert s >= CAUSAL_MIN_ROWS and isinstance(_sdpa_mask(None, s, 0, torch.float64, "cpu"), PrefixRuns)
    angles = layout.angles(16, 10000.0, 0.25)
    x = _rand(2, s, 32, seed=3)
    results = []
    for fast in (True, False):
        stack.fast = fast
        assert stack.uses_fast_path(x) == fast
        xi = x.clone().requires_grad_(True)
        out = stack(xi, None, angles)
        (out * _rand(*out.shape, seed=4)).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in stack.named_parameters()}))
        stack.zero_grad(set_to_none=True)
    stack.fast = True
    (o1, g1, p1), (o2, g2, p2) = results
    assert (o1 - o2).abs().max() < 1e-12
    assert (g1 - g2).abs().max() < 1e-10
    assert max((p1[n] - p2[n]).abs().max().item() for n in p1) < 1e-10
