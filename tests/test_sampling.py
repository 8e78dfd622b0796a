"""METHOD.md section 8, invariants 4-6, on tiny float64 models with randomised flow heads:
Jacobi inversion = sequential inversion (any chunk sizes, any initialisation), guidance = the
normalised product p_c^(1+w) / p_u^w, I2V / V2V reproduce the given frames and are deterministic,
plus the sampling input errors and the sampling benchmark (tools/benchmark.py)."""

import importlib.util
import json
import os

import pytest
from helpers_system import TINY_SYSTEM
import torch

from megatron_starflow.models.transformer import KVCache
from megatron_starflow.sampling.guidance import guided_gaussian
from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions

EXACT_TOL = 1e-10  # two inverses of the same z (Jacobi vs sequential)
INV_TOL = 1e-9  # an inverse vs the x that the forward pass started from (as test_flow_invariants)
# Random flow-head std of the exactness tests. Larger values make the random deep block chaotic
# (at 0.3 a 1e-12 change of z moves the 24-token inverse by ~4e-5), and no two float64
# computations then agree to 1e-10; 0.2 amplifies rounding only ~100x.
HEAD_STD = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 4-frame video of 2 x 3 tokens (6 per frame, 24 in all) for the block-level tests.
FRAMES, HEIGHT, WIDTH = 4, 2, 3
HW = HEIGHT * WIDTH


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block_case(model, kind, seed=0):
    """-> (block, layout, text, x, z): a data sequence x and its noise z = forward(x)."""
    c = model.cfg.token_channels
    if kind == "deep":
        block, layout = model.deep_block, model.deep_layout(FRAMES, HEIGHT, WIDTH)
        text = _randn(2, model.cfg.text_length, model.cfg.text_width, seed=seed + 1)
        x = _randn(2, FRAMES * HW, c, seed=seed)
    else:  # a shallow block sees one frame at a time (a batch of frames), no text
        block, layout, text = model.blocks[0], model.shallow_layout(HEIGHT, WIDTH), None
        x = _randn(FRAMES, HW, c, seed=seed)
    with torch.no_grad():
        z, _ = block(x, layout, text)
    assert _maxdiff(z, x) > 1e-2  # the randomised block is far from the identity
    return block, layout, text, x, z


# ------------------------------------------------------------------------------ invariant 4

@pytest.mark.parametrize("kind", ["deep", "shallow"])
@pytest.mark.parametrize("video_aware", [True, False])
@pytest.mark.parametrize("blocks", [(1, 1), (3, 3), (7, 7), (3, 7), (5, 13), (40, 40)])
def test_jacobi_equals_sequential(make_model, kind, video_aware, blocks):
    model = make_model(head_std=HEAD_STD)
    block, layout, text, x, z = _block_case(model, kind)
    seq = block.inverse_sequential(z, layout, text)
    assert _maxdiff(seq, x) < INV_TOL
    opts = SolverOptions("jacobi", blocks[0], blocks[1], tau=0.0, video_aware=video_aware)
    inv = BlockInverter(block, layout, opts, text)
    jac = inv.run(z)
    assert _maxdiff(jac, seq) < EXACT_TOL
    assert _maxdiff(jac, x) < INV_TOL
    # Without early stop a chunk of S tokens costs exactly S passes (its commit pass included).
    assert inv.stats.network_evals == z.shape[1]
    assert len(inv.cache) == layout.total
    # The solver's own sequential mode is the same inverse.
    inv_seq = BlockInverter(block, layout, SolverOptions("sequential"), text)
    assert _maxdiff(inv_seq.run(z), seq) < EXACT_TOL
    assert inv_seq.stats.network_evals == z.shape[1]


@pytest.mark.parametrize("video_aware", [True, False])
def test_jacobi_early_stop(make_model, video_aware):
    # A smoother random flow (head std 0.05), as a trained model is: the iteration settles early.
    model = make_model(head_std=0.05)
    block, layout, text, _, z = _block_case(model, "deep", seed=3)
    seq = block.inverse_sequential(z, layout, text)
    opts = SolverOptions("jacobi", 7, 7, tau=1e-3, video_aware=video_aware)
    inv = BlockInverter(block, layout, opts, text)
    jac = inv.run(z)
    # Stated tolerance: |x_tau - x_seq| < 2e-2 for values up to ~3 (tau = 1e-3 bounds the squared
    # relative change of a chunk's last iteration; measured: 9e-3 video-aware, 7.5e-3 plain).
    assert _maxdiff(jac, seq) < 2e-2
    assert seq.abs().max() > 1.0
    assert inv.stats.network_evals < z.shape[1]
    assert any(it < size for it, size in zip(inv.stats.iterations, [7, 7, 7, 3]))


class _CustomInit(BlockInverter):
    """Chunks start from a caller-chosen guess instead of z / the previous frame."""

    def __init__(self, *args, guess_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.guess_fn = guess_fn

    def _initial_guess(self, x, z, start, size):
        return self.guess_fn(start, size).clone()


@pytest.mark.parametrize("blocks", [(3, 7), (6, 6), (40, 40)])
def test_jacobi_any_initialisation(make_model, blocks):
    model = make_model(head_std=HEAD_STD)
    block, layout, text, x, z = _block_case(model, "deep", seed=5)
    garbage = 10 * _randn(*z.shape, seed=9)
    opts = SolverOptions("jacobi", blocks[0], blocks[1], tau=0.0, video_aware=True)
    inv = _CustomInit(block, layout, opts, text, guess_fn=lambda s, n: garbage[:, s:s + n])
    seq = block.inverse_sequential(z, layout, text)
    assert _maxdiff(inv.run(z), seq) < EXACT_TOL
    assert inv.stats.network_evals == z.shape[1]
    # Starting at the answer, early stop fires after one iteration: 2 passes per chunk.
    opts = SolverOptions("jacobi", blocks[0], blocks[1], tau=1e-3, video_aware=True)
    inv = _CustomInit(block, layout, opts, text, guess_fn=lambda s, n: seq[:, s:s + n])
    assert _maxdiff(inv.run(z), seq) < EXACT_TOL
    sizes = _chunk_sizes(blocks, z.shape[1])
    assert inv.stats.iterations == [min(2, size) for size in sizes]


def _chunk_sizes(blocks, n):
    sizes, start = [], 0
    while start < n:
        size = min(blocks[0] if start < HW else blocks[1], n - start)
        sizes.append(size)
        start += size
    return sizes


@pytest.mark.parametrize("solver", ["sequential", "jacobi"])
@pytest.mark.parametrize("given", [HW, 2 * HW, 7])
def test_inverse_after_encoded_prefix(make_model, solver, given):
    """Given tokens are encoded into the cache in one pass; the rest is solved exactly after them
    (video-aware Jacobi then starts from the encoded frame)."""
    model = make_model(head_std=HEAD_STD)
    block, layout, text, x, z = _block_case(model, "deep", seed=7)
    opts = SolverOptions(solver, 4, 9, tau=0.0, video_aware=True)
    inv = BlockInverter(block, layout, opts, text)
    out = inv.run(z, prefix=x[:, :given])
    assert torch.equal(out[:, :given], x[:, :given])
    assert _maxdiff(out, x) < INV_TOL
    assert len(inv.cache) == layout.total


def test_video_aware_guess_uses_solved_frame(make_model):
    """The video-aware guess of a chunk reads only solved slots, at the same in-frame positions,
    even when the chunk is longer than a frame."""
    model = make_model()
    block, layout, text, x, z = _block_case(model, "deep")
    inv = BlockInverter(block, layout, SolverOptions("jacobi", 6, 15, video_aware=True), text)
    solved = x.clone()
    solved[:, 2 * HW:] = float("nan")  # frames 0, 1 solved
    guess = inv._initial_guess(solved, z, 2 * HW, 15)
    assert not guess.isnan().any()
    for k in range(15):
        assert torch.equal(guess[:, k], x[:, HW + k % HW])
    assert torch.equal(inv._initial_guess(solved, z, 3, 4), z[:, 3:7])  # frame 0: from z
    plain = BlockInverter(block, layout, SolverOptions("jacobi", 6, 15, video_aware=False), text)
    assert torch.equal(plain._initial_guess(solved, z, 2 * HW, 15), z[:, 2 * HW:2 * HW + 15])


# ------------------------------------------------------------------------------ invariant 5

def _gaussians(seed, shape=(4, 50)):
    g = torch.Generator().manual_seed(seed)
    b_c, b_u = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    l_c, l_u = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    return b_c, l_c, b_u, l_u


def test_guidance_zero_is_conditional():
    b_c, l_c, b_u, l_u = _gaussians(0)
    b, log_sigma = guided_gaussian(b_c, l_c, b_u, l_u, 0.0)
    assert torch.equal(b, b_c) and torch.equal(log_sigma, l_c)


@pytest.mark.parametrize("w", [0.5, 1.0, 3.5])
def test_guided_gaussian_is_normalised_product(w):
    """log N(b, s^2) + const = (1+w) log p_c - w log p_u', a quadratic in x: compare its x^2 and x
    coefficients. p_u' = p_u where sigma_c <= sigma_u; where sigma_c > sigma_u (s clamped to 1)
    the formula is the product with sigma_u raised to sigma_c."""
    b_c, l_c, b_u, l_u = _gaussians(1)
    clamped = l_c > l_u
    assert clamped.any() and (~clamped).any()
    b, log_sigma = guided_gaussian(b_c, l_c, b_u, l_u, w)
    var_c = torch.exp(2 * l_c)
    var_u = torch.exp(2 * torch.maximum(l_u, l_c))
    # -(1/2) x^2 coefficient (precision) and x coefficient of the log of the product
    precision = (1 + w) / var_c - w / var_u
    linear = (1 + w) * b_c / var_c - w * b_u / var_u
    assert (precision > 0).all()
    assert torch.allclose(torch.exp(-2 * log_sigma), precision, rtol=1e-12, atol=0)
    assert torch.allclose(b * torch.exp(-2 * log_sigma), linear, rtol=1e-10, atol=1e-10)
    # where sigma_c > sigma_u: sigma = sigma_c, b = (1+w) b_c - w b_u
    assert torch.allclose(log_sigma[clamped], l_c[clamped], rtol=0, atol=1e-12)
    assert torch.allclose(b[clamped], ((1 + w) * b_c - w * b_u)[clamped], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b_c,s_c,b_u,s_u,w", [(0.3, 0.7, -1.0, 1.2, 1.5), (2.0, 0.2, 1.0, 0.25, 3.0),
                                              (-1.0, 1.0, 0.5, 1.0, 0.7)])
def test_guided_gaussian_grid_integration(b_c, s_c, b_u, s_u, w):
    """Mean and variance of p_c^(1+w) / p_u^w normalised numerically on a grid."""
    import math

    x = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    dx = (x[1] - x[0]).item()

    def log_normal(mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - math.log(std)

    log_p = (1 + w) * log_normal(b_c, s_c) - w * log_normal(b_u, s_u)
    p = torch.exp(log_p - log_p.max())
    p = p / (p.sum() * dx)
    mean = (x * p).sum() * dx
    var = ((x - mean) ** 2 * p).sum() * dx
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    b, log_sigma = guided_gaussian(t(b_c), t(math.log(s_c)), t(b_u), t(math.log(s_u)), w)
    assert abs(mean.item() - b.item()) < 1e-6
    assert abs(var.item() - math.exp(2 * log_sigma.item())) < 1e-6


def _parallel_params(block, layout, text, x):
    """(b, log sigma) of every token from x_{<t} in one parallel pass on a fresh cache."""
    cache = KVCache()
    block.prefill_text(text, layout, cache)
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    with torch.no_grad():
        return block.predict(prev, 0, layout, cache, commit=False)


@pytest.mark.parametrize("solver", ["sequential", "jacobi"])
def test_guided_inverse(make_model, solver):
    model = make_model(head_std=HEAD_STD)
    block, layout, text, _, z = _block_case(model, "deep", seed=11)
    uncond = _randn(*text.shape, seed=1000)
    opts = dict(solver=solver, first_block=5, later_block=8, tau=0.0)
    plain = BlockInverter(block, layout, SolverOptions(**opts), text).run(z)
    # guidance 0 with an unconditional text is the conditional model, bit for bit
    inv0 = BlockInverter(block, layout, SolverOptions(**opts, guidance=0.0), text, uncond)
    assert not inv0.guided
    assert torch.equal(inv0.run(z), plain)
    # guidance w: x_t = b + sigma z_t with (b, sigma) the guided step of the cond/uncond heads at x
    w = 2.0
    x = BlockInverter(block, layout, SolverOptions(**opts, guidance=w), text, uncond).run(z)
    b_c, l_c = _parallel_params(block, layout, text, x)
    b_u, l_u = _parallel_params(block, layout, uncond, x)
    b, log_sigma = guided_gaussian(b_c, l_c, b_u, l_u, w)
    assert _maxdiff(x, b + torch.exp(log_sigma) * z) < EXACT_TOL
    assert _maxdiff(x, plain) > 1e-2
    if solver == "jacobi":
        seq = BlockInverter(block, layout, SolverOptions("sequential", guidance=w), text, uncond).run(z)
        assert _maxdiff(x, seq) < EXACT_TOL


# ------------------------------------------------------------------------------ invariant 6



def _randomize_system_heads(model, std=HEAD_STD, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = list(model.blocks) + [model.learnable_self_denoiser]
    with torch.no_grad():
        for module in modules:
            for p in (module.proj_out.weight, module.proj_out.bias, module.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


@pytest.fixture(scope="module")
def system_env(tmp_path_factory, megatron_ready):
    """A tiny float64 StarFlowSystem (4 frames of 8x8 pixels -> 4 x 4x4 tokens of 12 channels),
    its run folder and a saved step-0 checkpoint of it."""
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    run_dir = str(tmp_path_factory.mktemp("sampling_run"))
    cfg = load_config(None, TINY_SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, run_dir).double()
    _randomize_system_heads(system.model)
    system.eval()
    ckpt = save_system_checkpoint(run_dir, 0, cfg, system,
                           tokenizer_file=tokenizer_path(cfg, run_dir))
    return system, run_dir, ckpt


def _clip(system, frames):
    from megatron_starflow.data.synthetic import SyntheticCaptionedVideos

    d = system.cfg.data
    item = SyntheticCaptionedVideos("heldout", 1, d.frames, d.height, d.width)[0]
    return item["video"][None, :frames], item["caption"]


@pytest.mark.parametrize("given", [1, 2])  # I2V, V2V
def test_prefix_generation(system_env, given):
    from megatron_starflow.sampling.generate import generate, prepare_prefix

    system = system_env[0]
    prefix, caption = _clip(system, given)
    captions = [caption, "a blue square moves left on a white background"]
    opts = SolverOptions("jacobi", 5, 8, tau=0.0, video_aware=True)
    out = generate(system, captions, seed=3, opts=opts, prefix_video=prefix)
    b, t, h, w, c = out.tokens.shape
    assert (b, t) == (2, system.cfg.data.frames)
    # 1) the returned prefix tokens are the noisy encoding of the given frames, drawn from the
    #    seed's generator right after the sampling noise z
    gen = torch.Generator().manual_seed(3)
    z = torch.randn((b, t, h, w, c), generator=gen, dtype=torch.float64)
    expected = prepare_prefix(system, prefix, b, t, gen)
    assert torch.equal(out.tokens[:, :given], expected)
    # ... which is the clean encoding plus noise of the training sigma
    clean = system.video_to_tokens(prefix.expand(b, -1, -1, -1, -1), dequantize=False)
    eps = (out.tokens[:, :given] - clean) / system.cfg.model.noise_std
    assert 0.7 < eps.std().item() < 1.3 and abs(eps.mean().item()) < 0.3
    # 2) the sampled frames are the exact inverse of the seed's noise given the encoded prefix:
    #    the parallel forward of the whole output maps them back to z
    with torch.no_grad():
        flow = system.model(out.tokens, system.encode_text(captions))
    assert _maxdiff(flow.z[:, given:], z[:, given:]) < 1e-9
    # 3) the output video repeats the given frames
    assert out.video.shape == (2, system.cfg.data.frames, 8, 8, 3) and out.video.dtype == torch.uint8
    assert torch.equal(out.video[:, :given], prefix.expand(2, -1, -1, -1, -1))
    # 4) deterministic for a fixed seed, different for another seed
    again = generate(system, captions, seed=3, opts=opts, prefix_video=prefix)
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.video, out.video)
    other = generate(system, captions, seed=4, opts=opts, prefix_video=prefix)
    assert _maxdiff(other.tokens[:, given:], out.tokens[:, given:]) > 1e-2
    assert not torch.equal(other.video[:, given:], out.video[:, given:])
    assert torch.equal(other.video[:, :given], out.video[:, :given])


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_t2v_jacobi_equals_sequential(system_env, guidance):
    from megatron_starflow.sampling.generate import generate

    system = system_env[0]
    captions = ["a red circle moves up on a black background"]
    seq = generate(system, captions, seed=1, opts=SolverOptions("sequential", guidance=guidance))
    jac = generate(system, captions, seed=1,
                   opts=SolverOptions("jacobi", 3, 8, tau=0.0, video_aware=True, guidance=guidance))
    assert _maxdiff(jac.tokens, seq.tokens) < EXACT_TOL
    assert (jac.video.int() - seq.video.int()).abs().max().item() <= 1
    n = seq.tokens[0, ..., 0].numel()
    assert seq.deep.network_evals == n and jac.deep.network_evals == n


def test_long_video_segments(system_env):
    """Beyond the training length: the first window equals a plain T2V of the training length
    (same seed, batch 1: z's leading frames coincide), every later segment continues from the
    re-encoded context frames, and the denoised video has the requested length."""
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import BlockInverter

    system = system_env[0]
    t_train = system.cfg.data.frames
    captions = ["a red circle moves up on a black background"]
    opts = SolverOptions("jacobi", 5, 8, tau=0.0)
    short = generate(system, captions, seed=2, opts=opts)
    long = generate(system, captions, frames=t_train + 3, seed=2, opts=opts, context_frames=2)
    assert long.tokens.shape[1] == t_train + 3 and long.video.shape[1] == t_train + 3
    assert _maxdiff(long.tokens[:, :t_train], short.tokens) < EXACT_TOL
    # Re-derive the second segment by hand: deep input u of the last 2 frames as context.
    model = system.model
    b, t, h, w, c = long.tokens.shape
    hw = h * w
    u = long.tokens
    for i in range(len(model.blocks) - 1):
        u, _ = model.shallow_forward(i, u)
    u = u.reshape(b, t * hw, c)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn((b, t, h, w, c), generator=gen, dtype=torch.float64).reshape(b, t * hw, c)
    text = system.encode_text(captions)
    inv = BlockInverter(model.deep_block, model.deep_layout(t_train, h, w), opts, text)
    seg = inv.run(z[:, (t_train - 2) * hw:(t_train + 2) * hw], u[:, (t_train - 2) * hw:t_train * hw])
    assert _maxdiff(seg[:, 2 * hw:], u[:, t_train * hw:(t_train + 2) * hw]) < 1e-8
    # The windowed denoiser agrees with the one-pass denoiser on the first frames.
    from megatron_starflow.sampling.generate import windowed_denoise

    one = model.denoise(long.tokens[:, :t_train], text)
    win = windowed_denoise(model, long.tokens, text, t_train)
    assert _maxdiff(win[:, :t_train - 1], one[:, :t_train - 1]) < EXACT_TOL


# ------------------------------------------------------------------------------ input errors

def test_empty_prompt(system_env):
    from megatron_starflow.sampling.generate import generate

    with pytest.raises(ValueError, match="no prompt given"):
        generate(system_env[0], [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(system_env[0], ["a red circle", "  "])


def test_conditioning_frame_size(system_env):
    from megatron_starflow.sampling.generate import generate

    image = torch.zeros(1, 1, 6, 6, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="conditioning frames are 6x6 .* model makes 8x8"):
        generate(system_env[0], ["a red circle"], prefix_video=image)


def test_conditioning_video_too_long(system_env):
    from megatron_starflow.sampling.generate import generate

    video = torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be shorter than the 4 frames"):
        generate(system_env[0], ["a red circle"], frames=4, prefix_video=video)


def test_cli_not_a_checkpoint(tmp_path, capsys):
    from megatron_starflow.cli import main

    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    code = main(["sample", "--checkpoint", str(folder), "--prompt", "a red circle",
                 "--out", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a checkpoint" in err and str(folder) in err
    assert err.count("\n") == 1  # one line, no traceback


def test_cli_unreadable_image(system_env, tmp_path, capsys):
    from megatron_starflow.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    args = ["sample", "--checkpoint", system_env[2], "--task", "i2v", "--prompt", "a red circle",
            "--out", str(tmp_path / "out.mp4")]
    assert main(args + ["--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "broken.png" in err and err.count("\n") == 1
    assert main(args + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------------ benchmark

def _benchmark_module():
    spec = importlib.util.spec_from_file_location("starflow_benchmark",
                                                  os.path.join(REPO, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_benchmark(system_env, capsys):
    bench = _benchmark_module()
    code = bench.main(["sampling", "--checkpoint", system_env[2], "--prompts", "1", "--seed", "2",
                       "--tau", "0", "--block-size", "4", "8", "--warmup", "0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("checkpoint", "step", "prompts", "seed", "tau", "block_size", "torch_threads",
                "methods", "speedup_vs_sequential", "deep_eval_ratio_vs_sequential"):
        assert key in result
    assert result["tau"] == 0.0 and result["block_size"] == [4, 8] and result["step"] == 0
    assert result["torch_threads"] == torch.get_num_threads()
    methods = result["methods"]
    assert set(methods) == {"sequential", "jacobi", "jacobi_video_aware"}
    assert set(result["speedup_vs_sequential"]) == {"jacobi", "jacobi_video_aware"}
    n = 4 * 4 * 4  # deep tokens: 4 frames of 4x4
    for name, m in methods.items():
        for key in ("seconds", "deep_network_evals", "shallow_network_evals",
                    "max_abs_token_diff", "max_abs_video_diff"):
            assert key in m, (name, key)
        assert m["seconds"] > 0 and m["deep_network_evals"] == n
        # tau = 0: every solver gives the sequential answer (up to float32 rounding)
        assert m["max_abs_token_diff"] < 1e-3 and m["max_abs_video_diff"] <= 1
    assert methods["sequential"]["max_abs_token_diff"] == 0.0
    # a bad option is one clear error
    assert bench.main(["sampling", "--checkpoint", system_env[2], "--block-size", "0"]) == 2
    assert "--block-size" in capsys.readouterr().err
