"""METHOD.md section 8, invariants 1-3 (float64, tiny models with randomised flow heads):
exact invertibility, log-det = brute-force log|det dz/dx|, causality of every block and of the
denoiser's one-frame look-ahead, KV-cached prediction = parallel forward, identity at init, and
text conditioning of the deep block only."""

import pytest
import torch

from megatron_starflow.models.starflow import patchify, unpatchify
from megatron_starflow.models.transformer import KVCache

INV_TOL = 1e-9
EXACT_TOL = 1e-12


def _text(model, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.cfg.text_length, model.cfg.text_width, generator=g,
                       dtype=torch.float64)


def _tokens(model, batch, t, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, t, h, w, model.cfg.token_channels, generator=g, dtype=torch.float64)


def _maxdiff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------ invariant 1

@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("num_blocks", [1, 3])
@pytest.mark.parametrize("attn_window", [0, 2])
def test_whole_model_inverse(make_model, patch_size, num_blocks, attn_window):
    model = make_model(patch_size=patch_size, num_blocks=num_blocks, attn_window=attn_window)
    c = model.cfg.latent_channels
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 2 * patch_size, 2 * patch_size, c, generator=g, dtype=torch.float64)
    tokens = patchify(latents, patch_size)
    assert tokens.shape == (2, 4, 2, 2, c * patch_size**2)
    text = _text(model, 2, 4)
    with torch.no_grad():
        out = model(tokens, text)
    assert len(out.logdets) == num_blocks
    assert _maxdiff(out.z, tokens) > 1e-3  # the randomised flow is not the identity
    back = model.inverse(out.z, text)
    assert _maxdiff(back, tokens) < INV_TOL
    assert _maxdiff(unpatchify(back, patch_size), latents) < INV_TOL


def test_patchify_channel_order():
    x = torch.arange(1 * 1 * 4 * 4 * 2, dtype=torch.float64).reshape(1, 1, 4, 4, 2)
    tok = patchify(x, 2)
    # token (0, 1) holds rows 0-1, cols 2-3, channel order (p1, p2, c)
    expected = torch.stack([x[0, 0, p1, 2 + p2, c] for p1 in range(2) for p2 in range(2)
                            for c in range(2)])
    assert torch.equal(tok[0, 0, 0, 1], expected)
    assert torch.equal(unpatchify(tok, 2), x)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_every_shallow_block_inverse(make_model, patch_size):
    model = make_model(patch_size=patch_size, num_blocks=3)
    c = model.cfg.token_channels
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, c, generator=g, dtype=torch.float64)  # 3 frames of a 2x3 grid
    layout = model.shallow_layout(2, 3)
    for block in model.shallow_blocks:
        with torch.no_grad():
            z, logdet = block(x, layout)
        assert _maxdiff(z, x) > 1e-3 and logdet.shape == (3,)
        assert _maxdiff(block.inverse_sequential(z, layout), x) < INV_TOL
    # ... and through the model's per-frame wrappers (with the in-frame reversal)
    tokens = x.reshape(1, 3, 2, 3, c)
    for i in range(len(model.shallow_blocks)):
        with torch.no_grad():
            z, _ = model.shallow_forward(i, tokens)
        assert _maxdiff(model.shallow_inverse(i, z), tokens) < INV_TOL


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("attn_window", [0, 1])
def test_deep_block_inverse_with_text(make_model, patch_size, attn_window):
    model = make_model(patch_size=patch_size, attn_window=attn_window)
    block = model.deep_block
    layout = model.deep_layout(3, 2, 2)
    assert layout.text_len == model.cfg.text_length and layout.window == attn_window
    x = _tokens(model, 2, 3, 2, 2, seed=6).reshape(2, 12, -1)
    text = _text(model, 2, 7)
    with torch.no_grad():
        z, _ = block(x, layout, text)
    assert _maxdiff(z, x) > 1e-3
    assert _maxdiff(block.inverse_sequential(z, layout, text), x) < INV_TOL


# ------------------------------------------------------------------------------ invariant 2

@pytest.mark.parametrize("attn_window", [0, 1])
def test_logdet_equals_jacobian_slogdet(make_model, attn_window):
    model = make_model(num_blocks=3, attn_window=attn_window)  # T=3, H=W=2, C=3: D = 36
    x = _tokens(model, 2, 3, 2, 2, seed=8)
    text = _text(model, 2, 9)
    with torch.no_grad():
        out = model(x, text)
    logdet = torch.stack(out.logdets).sum(0)
    for b in range(2):
        def f(xb, b=b):
            return model(xb[None], text[b:b + 1]).z.flatten()

        jac = torch.autograd.functional.jacobian(f, x[b])
        jac = jac.reshape(out.dims, out.dims)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        assert abs(logabs.item() - logdet[b].item()) < 1e-9, (logabs.item(), logdet[b].item())
    assert logdet.abs().min() > 0.1  # a non-trivial volume change was tested


# ------------------------------------------------------------------------------ invariant 3

@pytest.mark.parametrize("attn_window", [0, 2])
@pytest.mark.parametrize("num_blocks", [3, 4])
def test_model_is_causal_over_frames(make_model, attn_window, num_blocks):
    model = make_model(num_blocks=num_blocks, attn_window=attn_window)
    t = 4
    x = _tokens(model, 2, t, 2, 2, seed=10)
    text = _text(model, 2, 11)
    with torch.no_grad():
        z = model(x, text).z
        for n in range(t - 1):
            x2 = x.clone()
            x2[:, n + 1:] += torch.randn(x2[:, n + 1:].shape, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(n))
            z2 = model(x2, text).z
            assert _maxdiff(z2[:, :n + 1], z[:, :n + 1]) <= EXACT_TOL
            assert _maxdiff(z2[:, n + 1:], z[:, n + 1:]) > 1e-3


def test_shallow_blocks_are_per_frame(make_model):
    model = make_model(num_blocks=4)
    t = 4
    x = _tokens(model, 2, t, 2, 3, seed=12)
    with torch.no_grad():
        for i in range(len(model.shallow_blocks)):
            z, logdet = model.shallow_forward(i, x)
            for m in range(t):
                x2 = x.clone()
                x2[:, m] = torch.randn(x2[:, m].shape, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(100 + m))
                z2, logdet2 = model.shallow_forward(i, x2)
                others = [f for f in range(t) if f != m]
                assert _maxdiff(z2[:, others], z[:, others]) <= EXACT_TOL
                assert _maxdiff(z2[:, m], z[:, m]) > 1e-3
                assert logdet2.shape == logdet.shape == (2,)


def _check_token_causal(jac, order):
    """jac [N, C, N, C] of z wrt x in natural order; ``order`` = natural indices in block order."""
    pos = {tok: p for p, tok in enumerate(order)}
    n = jac.shape[0]
    for t in range(n):
        diag = jac[t, :, t, :]
        assert _maxdiff(diag, torch.diag(torch.diagonal(diag))) == 0.0  # affine per channel
        assert torch.diagonal(diag).abs().min() > 0
        past = [s for s in range(n) if pos[s] < pos[t]]
        future = [s for s in range(n) if pos[s] > pos[t]]
        for s in future:
            assert jac[t, :, s, :].abs().max() <= EXACT_TOL, (t, s)
        if past:
            assert jac[t, :, past, :].abs().max() > 1e-6, (t, past)


def test_token_causality_within_blocks(make_model):
    model = make_model(num_blocks=4)
    assert [model.reverses(i) for i in range(4)] == [True, False, True, False]
    h, w = 2, 3
    c = model.cfg.token_channels
    x = _tokens(model, 1, 1, h, w, seed=13)
    n = h * w
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: model.shallow_forward(i, v)[0], x)
        jac = jac.reshape(n, c, n, c)
        order = list(reversed(range(n))) if model.reverses(i) else list(range(n))
        _check_token_causal(jac, order)
    # deep block: natural order over all frames, text in front
    block, layout = model.deep_block, model.deep_layout(2, h, w)
    xs = _tokens(model, 1, 2, h, w, seed=14).reshape(1, 2 * n, c)
    text = _text(model, 1, 15)
    jac = torch.autograd.functional.jacobian(lambda v: block(v, layout, text)[0], xs)
    _check_token_causal(jac.reshape(2 * n, c, 2 * n, c), list(range(2 * n)))


def test_reverses_pattern(make_model):
    model = make_model(num_blocks=6)
    assert [model.reverses(i) for i in range(6)] == [True, False, True, False, True, False]
    assert [make_model(num_blocks=6, reverse_even_blocks=False).reverses(i)
            for i in range(6)] == [False] * 6
    # the deep block keeps the raster order whatever its index
    assert [make_model(num_blocks=3).reverses(i) for i in range(3)] == [True, False, False]
    assert make_model(num_blocks=1).reverses(0) is False


def _denoiser_dependence(model, t, seed):
    """dep[n][m]: does the denoiser output of frame n change when input frame m changes?"""
    x = _tokens(model, 1, t, 2, 2, seed=seed)
    text = _text(model, 1, seed + 1)
    dep = [[False] * t for _ in range(t)]
    with torch.no_grad():
        s = model.denoise_score(x, text)
        for m in range(t):
            x2 = x.clone()
            x2[:, m] += 1.0 + torch.randn(x2[:, m].shape, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(200 + m))
            s2 = model.denoise_score(x2, text)
            for n in range(t):
                d = _maxdiff(s2[:, n], s[:, n])
                assert d <= EXACT_TOL or d > 1e-8, d  # either exactly unchanged or clearly changed
                dep[n][m] = d > 1e-8
    return dep


@pytest.mark.parametrize("window", [2, 3, 10])
def test_denoiser_one_frame_lookahead_and_window(make_model, window):
    model = make_model(denoiser_layers=1, denoiser_window=window)
    t = 5
    dep = _denoiser_dependence(model, t, seed=16)
    for n in range(t):
        for m in range(t):
            assert dep[n][m] == (n - window + 1 <= m <= n + 1), (n, m, dep[n])


@pytest.mark.parametrize("layers", [2, 3])
def test_denoiser_sees_one_frame_ahead_with_many_layers(make_model, layers):
    """Default (first-layer look-ahead, later layers frame-causal): however many layers, frame n
    depends on frames <= n+1 only (METHOD.md invariant 3), and on frame n+1 indeed."""
    model = make_model(denoiser_layers=layers, denoiser_window=10)
    t = 5
    dep = _denoiser_dependence(model, t, seed=18)
    for n in range(t):
        for m in range(t):
            assert dep[n][m] == (m <= n + 1), (n, m, dep[n])


def test_denoiser_authors_mask_compounds_over_layers(make_model):
    """``denoiser_lookahead=every_layer`` (the reference's NonCausalBlock): the one-frame
    look-ahead is per layer, so 2 stacked layers see 2 frames ahead, never more."""
    model = make_model(denoiser_layers=2, denoiser_window=10, denoiser_lookahead="every_layer")
    t = 5
    dep = _denoiser_dependence(model, t, seed=18)
    for n in range(t):
        for m in range(t):
            assert dep[n][m] == (m <= n + 2), (n, m, dep[n])


# -------------------------------------------------------------------- KV-cached prediction

def _parallel_head(block, x, layout, text):
    """(b, log sigma) of the parallel forward, captured at the block's head."""
    captured = []
    original = block.head

    def spy(h):
        captured.append(original(h))
        return captured[-1]

    block.head = spy
    try:
        with torch.no_grad():
            block(x, layout, text)
    finally:
        del block.head
    assert len(captured) == 1
    return captured[0]


def _inputs(x, start, length):
    """Inputs x_{start-1} .. x_{start+length-2} of slots start..start+length-1 (row 0 is ignored
    by predict when start == 0, where the start token is used)."""
    if start == 0:
        return torch.cat([torch.full_like(x[:, :1], 7.0), x[:, :length - 1]], dim=1)
    return x[:, start - 1:start + length - 1]


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("attn_window", [0, 1])
def test_cached_predict_matches_parallel(make_model, deep, chunk, attn_window):
    model = make_model(attn_window=attn_window)
    if deep:
        block, layout = model.deep_block, model.deep_layout(3, 2, 2)
        text = _text(model, 2, 20)
    else:
        block, layout = model.blocks[0], model.shallow_layout(3, 4)
        text = None
    n = layout.video_len
    x = _tokens(model, 2, 1, 1, n, seed=21).reshape(2, n, -1)
    b_ref, ls_ref = _parallel_head(block, x, layout, text)
    assert ls_ref.abs().max() > 1e-3
    cache = KVCache()
    with torch.no_grad():
        if deep:
            block.prefill_text(text, layout, cache)
        assert len(cache) == layout.text_len
        start = 0
        while start < n:
            length = min(chunk, n - start)
            prev = _inputs(x, start, length)
            # a non-committing call (a Jacobi iteration) leaves the cache as it was ...
            b_try, ls_try = block.predict(prev, start, layout, cache, commit=False)
            assert len(cache) == layout.text_len + start
            b, ls = block.predict(prev, start, layout, cache, commit=True)
            assert len(cache) == layout.text_len + start + length
            # ... and gives the same answer as the committing call
            assert _maxdiff(b_try, b) <= EXACT_TOL and _maxdiff(ls_try, ls) <= EXACT_TOL
            assert _maxdiff(b, b_ref[:, start:start + length]) < 1e-10
            assert _maxdiff(ls, ls_ref[:, start:start + length]) < 1e-10
            start += length


def test_predict_rejects_wrong_cache_length(make_model):
    model = make_model()
    block, layout = model.blocks[1], model.shallow_layout(2, 2)
    x = _tokens(model, 1, 1, 2, 2, seed=22).reshape(1, 4, -1)
    cache = KVCache()
    with torch.no_grad():
        block.predict(_inputs(x, 0, 2), 0, layout, cache, commit=True)
        with pytest.raises(RuntimeError, match="KV cache"):
            block.predict(_inputs(x, 3, 1), 3, layout, cache, commit=True)


# ------------------------------------------------------------------------ identity at init

def test_fresh_model_is_identity(make_model):
    model = make_model(randomize=False, num_blocks=3)
    x = _tokens(model, 2, 3, 2, 2, seed=23)
    text = _text(model, 2, 24)
    with torch.no_grad():
        out = model(x, text)
        assert _maxdiff(out.z, x) <= EXACT_TOL
        for logdet in out.logdets:
            assert logdet.abs().max() <= EXACT_TOL
        assert model.denoise_score(x, text).abs().max() == 0.0
    assert _maxdiff(model.inverse(x, text), x) <= EXACT_TOL


# --------------------------------------------------------------------------- text conditioning

def test_text_reaches_only_the_deep_block(make_model):
    model = make_model(num_blocks=3)
    assert all(b.proj_txt is None for b in model.shallow_blocks)
    assert model.deep_block.proj_txt is not None
    x = _tokens(model, 2, 3, 2, 2, seed=25)
    text = _text(model, 2, 26)
    captured = {}
    hooks = [block.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
             for i, block in enumerate(model.blocks)]
    try:
        runs = []
        for txt in (text, _text(model, 2, 27), text.clone().index_fill_(1, torch.tensor([2]), 0.5)):
            with torch.no_grad():
                out = model(x, txt)
            runs.append(({i: (z.clone(), ld.clone()) for i, (z, ld) in captured.items()}, out))
    finally:
        for hook in hooks:
            hook.remove()
    (ref, ref_out), *others = runs
    for blocks, out in others:
        for i in range(len(model.shallow_blocks)):
            assert torch.equal(blocks[i][0], ref[i][0]) and torch.equal(blocks[i][1], ref[i][1])
            assert torch.equal(out.logdets[i], ref_out.logdets[i])
        deep = len(model.blocks) - 1
        assert _maxdiff(blocks[deep][0], ref[deep][0]) > 1e-4  # z of the deep block moved
        assert _maxdiff(out.z, ref_out.z) > 1e-4
