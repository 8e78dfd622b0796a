"""RoPE and attention masks: megatron's interleaved rotary application = our reference rotation;
a TransformerStack layer = an independent re-implementation (pre-LN, RoPE on q/k, SDPA, GELU MLP);
the angle table's [row | col | time] layout, frequencies and coordinates; the layout's causal,
windowed and look-ahead masks against masks built by explicit loops (METHOD.md sections 3, 9)."""

import math

import pytest
import torch

from megatron_starflow.models import rope
from megatron_starflow.models.layout import SlotLayout


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _video_and_text_coords(frames=2, h=3, w=4, text=5, pt=8.0):
    return torch.cat([rope.text_coords(text, pt), rope.video_coords(frames, h, w, pt)])


# --------------------------------------------------------------------------- rotation

def test_apply_rope_matches_complex_rotation():
    """Independent of megatron: pair (x0, x1) as x0 + i x1, multiplied by exp(i angle)."""
    coords = _video_and_text_coords()
    angles = rope.rope_angles(coords, 16)
    x = _rand(2, coords.shape[0], 16, seed=1)
    as_complex = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.exp(1j * angles[..., 0::2])
    expected = torch.stack([as_complex.real, as_complex.imag], dim=-1).flatten(-2)
    assert (rope.apply_rope(x, angles) - expected).abs().max() < 1e-12
    # interleaved layout: both members of a pair carry the same angle
    assert torch.equal(angles[:, 0::2], angles[:, 1::2])


@pytest.mark.parametrize("head_dim,fraction", [(64, 0.25), (32, 0.5), (16, 0.25)])
def test_megatron_rotary_matches_reference(head_dim, fraction):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    coords = _video_and_text_coords()
    s = coords.shape[0]
    angles = rope.rope_angles(coords, head_dim, 10000.0, fraction)
    q = _rand(s, 2, 3, head_dim, seed=2)  # megatron layout [S, B, heads, d]
    ours = rope.apply_rope(q.permute(1, 2, 0, 3), angles).permute(2, 0, 1, 3)
    theirs = _apply_rotary_pos_emb_bshd(q, angles[:, None, None, :], rotary_interleaved=True)
    assert (ours - theirs).abs().max() < 1e-12
    # the non-interleaved convention differs: the test can tell them apart
    other = _apply_rotary_pos_emb_bshd(q, angles[:, None, None, :], rotary_interleaved=False)
    assert (ours - other).abs().max() > 1e-3


def _reference_layer(layer, x, allowed, angles, head_dim):
    """One pre-LN transformer layer written from scratch with the stack's weights.
    x [S, B, W]; megatron's qkv rows are grouped per head as [q_h, k_h, v_h]."""
    def layer_norm(v, norm):
        mu = v.mean(-1, keepdim=True)
        var = (v - mu).pow(2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias

    att = layer.self_attention
    s, b, width = x.shape
    heads = width // head_dim
    qkv = layer_norm(x, layer.input_layernorm) @ att.linear_qkv.weight.T + att.linear_qkv.bias
    qkv = qkv.reshape(s, b, heads, 3, head_dim)
    q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))  # [B, H, S, d]
    q, k = rope.apply_rope(q, angles), rope.apply_rope(k, angles)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    ctx = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(s, b, width)
    h = x + ctx @ att.linear_proj.weight.T + att.linear_proj.bias
    mlp = layer.mlp
    u = layer_norm(h, layer.pre_mlp_layernorm) @ mlp.linear_fc1.weight.T + mlp.linear_fc1.bias
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    return h + u @ mlp.linear_fc2.weight.T + mlp.linear_fc2.bias


def test_transformer_stack_matches_independent_layer(megatron_ready):
    from megatron_starflow.models.transformer import TransformerStack

    torch.manual_seed(0)
    head_dim = 16
    stack = TransformerStack(32, 2, head_dim).double()
    with torch.no_grad():  # biases and norms start at 0/1: randomise so each one is exercised
        for name, p in stack.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(_rand(*p.shape, seed=len(name)) * 0.3)
    layout = SlotLayout(3, 2, 2, 3, with_time=True, pt_seq_len=4.0, window=1)
    angles = layout.angles(head_dim, 10000.0, 0.25)
    allowed = layout.causal_mask()
    x = _rand(2, layout.total, 32, seed=3)
    with torch.no_grad():
        out = stack(x, allowed, angles)
        h = x.transpose(0, 1)
        for layer in stack.block.layers:
            h = _reference_layer(layer, h, allowed, angles, head_dim)
    assert (out - h.transpose(0, 1)).abs().max() < 1e-10
    # RoPE is really applied: other angles give another answer
    with torch.no_grad():
        moved = stack(x, allowed, angles * 1.5)
    assert (moved - out).abs().max() > 1e-4


# ------------------------------------------------------------------------ angle table

def test_rope_angle_layout_head_dim_64():
    assert rope.axis_dims(64, 0.25) == (24, 24, 16)
    coords = _rand(7, 3, seed=4) * 5
    angles = rope.rope_angles(coords, 64, 10000.0, 0.25)
    assert angles.shape == (7, 64)
    start = 0
    for axis, dims in enumerate((24, 24, 16)):
        n = dims // 2
        for j in range(n):
            freq = 10000.0 ** (-j / n)
            for col in (start + 2 * j, start + 2 * j + 1):
                assert torch.allclose(angles[:, col], coords[:, axis] * freq, rtol=1e-13, atol=0)
        start += dims
    # each block of columns depends on its own coordinate only
    moved = coords.clone()
    moved[:, 2] += 1.0
    changed = (rope.rope_angles(moved, 64, 10000.0, 0.25) != angles).any(0)
    assert not changed[:48].any() and changed[48:].all()


def test_coordinates():
    pt = 8.0
    v = rope.video_coords(2, 3, 4, pt)
    scale = pt / math.sqrt(12)
    assert v.shape == (24, 3)
    for j in range(24):
        f, r, c = j // 12, (j % 12) // 4, j % 4  # raster order, w fastest
        assert torch.allclose(v[j], torch.tensor([r * scale, c * scale, float(f)], dtype=v.dtype))
    assert torch.equal(rope.video_coords(2, 3, 4, pt, with_time=False)[:, 2], torch.zeros(24, dtype=torch.float64))
    t = rope.text_coords(5, pt)
    expected = torch.tensor([[0.0, 0.0, l * pt / 5] for l in range(5)], dtype=t.dtype)
    assert torch.allclose(t, expected, rtol=0, atol=1e-15)


def test_layout_angles_text_first_not_permuted():
    layout = SlotLayout(5, 2, 3, 4, with_time=True, pt_seq_len=8.0)
    angles = layout.angles(16, 10000.0, 0.25)
    expected = rope.rope_angles(_video_and_text_coords(2, 3, 4, 5, 8.0), 16, 10000.0, 0.25)
    assert torch.equal(angles, expected)
    shallow = SlotLayout(0, 1, 3, 4, with_time=False, pt_seq_len=8.0).angles(16, 10000.0, 0.25)
    assert torch.equal(shallow[:, 12:], torch.zeros(12, 4, dtype=shallow.dtype))  # time 0


@pytest.mark.parametrize("head_dim,fraction", [(8, 0.25), (12, 0.25), (64, 0.0), (64, 1.0),
                                                (30, 0.5)])
def test_axis_dims_errors(head_dim, fraction):
    with pytest.raises(ValueError, match="head_dim"):
        rope.axis_dims(head_dim, fraction)


def test_axis_dims_valid():
    assert rope.axis_dims(64, 0.5) == (16, 16, 32)
    assert rope.axis_dims(16, 0.25) == (6, 6, 4)
    assert rope.axis_dims(128, 0.25) == (48, 48, 32)


# ---------------------------------------------------------------------------- masks

def _slot_info(layout):
    """(is_text, frame) of every slot, by explicit enumeration."""
    info = [(True, None)] * layout.text_len
    for f in range(layout.frames):
        info += [(False, f)] * (layout.height * layout.width)
    return info


@pytest.mark.parametrize("window", [0, 1, 2])
def test_causal_mask_with_window(window):
    layout = SlotLayout(3, 4, 2, 2, with_time=True, pt_seq_len=4.0, window=window)
    info = _slot_info(layout)
    expected = torch.zeros(layout.total, layout.total, dtype=torch.bool)
    for q, (q_text, qf) in enumerate(info):
        for k, (k_text, kf) in enumerate(info):
            if k > q:
                continue
            if k_text or q_text or window == 0:
                expected[q, k] = True
            else:
                expected[q, k] = qf - window + 1 <= kf <= qf
    mask = layout.causal_mask()
    assert torch.equal(mask, expected)
    if window:  # frame f sees all text and frames f-W+1 .. f only
        q = layout.text_len + 3 * 4  # first token of frame 3
        seen = {info[k][1] for k in range(layout.total) if mask[q, k] and not info[k][0]}
        assert seen == set(range(max(0, 3 - window + 1), 4))
        assert mask[q, :layout.text_len].all()
    # rectangular masks of cached steps are the matching rows of the full mask
    for start, length in [(0, 3), (3, 1), (5, 4), (10, 9)]:
        assert torch.equal(layout.causal_mask(start, length),
                           expected[start:start + length, :start + length])


@pytest.mark.parametrize("window", [1, 2, 10])
def test_lookahead_mask_matches_reference_denoiser_mask(window):
    layout = SlotLayout(3, 5, 2, 2, with_time=True, pt_seq_len=4.0, window=window)
    info = _slot_info(layout)
    expected = torch.zeros(layout.total, layout.total, dtype=torch.bool)
    for q, (q_text, qf) in enumerate(info):
        for k, (k_text, kf) in enumerate(info):
            if k_text:
                expected[q, k] = True  # every query sees all text
            elif q_text:
                expected[q, k] = kf <= 1  # text queries see frames 0 .. 1
            else:
                expected[q, k] = qf - window + 1 <= kf <= qf + 1
    assert torch.equal(layout.lookahead_mask(), expected)
