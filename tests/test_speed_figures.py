"""Work and speed bookkeeping of the solvers: exact Jacobi evaluates at most S(S+1)/2 tokens per
S-token chunk (final tokens are committed after every pass), a tau = 0 chunk stops as soon as an
iteration changes nothing, and the equal-output speed-up search of sampling/speed.py (what
tools/benchmark.py sampling and benchmarks/train_throughput.py report)."""

import pytest
import torch
from helpers_system import TINY_SYSTEM

from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _deep_case(make_model, head_std=0.2):
    model = make_model(head_std=head_std)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, model.cfg.text_length, model.cfg.text_width, generator=g, dtype=torch.float64)
    z = torch.randn(2, 24, model.cfg.token_channels, generator=g, dtype=torch.float64)
    return model.deep_block, model.deep_layout(4, 2, 3), text, z


@pytest.mark.parametrize("blocks", [(6, 12), (24, 24), (5, 7)])
def test_exact_jacobi_token_work(make_model, blocks):
    block, layout, text, z = _deep_case(make_model)
    seq = block.inverse_sequential(z, layout, text)
    inv = BlockInverter(block, layout, SolverOptions("jacobi", *blocks, tau=0.0), text)
    out = inv.run(z)
    assert (out - seq).abs().max() < 1e-10
    sizes, start = [], 0
    while start < 24:
        sizes.append(min(blocks[0] if start < 6 else blocks[1], 24 - start))
        start += sizes[-1]
    # every pass commits at least its first token: S passes, S + (S-1) + ... + 1 token evaluations
    assert inv.stats.network_evals <= 24
    assert inv.stats.token_evals <= sum(s * (s + 1) // 2 for s in sizes)
    assert len(inv.cache) == layout.total


def test_tau_zero_stops_at_a_fixed_point(make_model):
    """The solver's bookkeeping on a map whose value does not depend on the inputs: the first pass
    commits its first token (the only one whose inputs were final), the second pass changes
    nothing, so every later token is final and the chunk stops (tau = 0, no commit pass)."""
    block, layout, text, z = _deep_case(make_model)

    class Constant(BlockInverter):
        def _step(self, prev, start, zc, commit):
            assert not commit  # no commit pass is needed
            self.stats.network_evals += 1
            self.stats.token_evals += prev.shape[1]
            return 2.0 + torch.arange(start, start + zc.shape[1], dtype=zc.dtype)[None, :, None] + 0 * zc

    inv = Constant(block, layout, SolverOptions("jacobi", 6, 12, tau=0.0, video_aware=False), text)
    x = inv.run(z)
    assert torch.equal(x, (2.0 + torch.arange(24, dtype=z.dtype))[None, :, None].expand_as(z))
    assert inv.stats.iterations == [2, 2, 2]  # chunks 0-5, 6-17, 18-23
    assert inv.stats.token_evals == (6 + 5) + (12 + 11) + (6 + 5)
    assert len(inv.cache) == layout.total


def test_commit_pass_option(make_model):
    """Without the commit pass a tau stop keeps the last iteration's keys: one pass less per
    chunk that stopped on tau, a result within the stated tolerance all the same."""
    block, layout, text, z = _deep_case(make_model, head_std=0.05)
    seq = block.inverse_sequential(z, layout, text)
    runs = {}
    for commit in (True, False):
        inv = BlockInverter(block, layout, SolverOptions("jacobi", 6, 6, tau=1e-3, commit_pass=commit), text)
        runs[commit] = (inv.run(z), inv.stats)
        assert (runs[commit][0] - seq).abs().max() < 2e-2
        assert len(inv.cache) == layout.total
    assert runs[False][1].network_evals < runs[True][1].network_evals


def test_equal_output_search(tmp_path, megatron_ready):
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.sampling.speed import equal_output_speedup, tau_ladder

    assert tau_ladder(1e-3) == [1e-3, 1e-4, 1e-5, 1e-6, 0.0] or len(tau_ladder(1e-3)) == 5
    assert tau_ladder(0.0) == [0.0]
    cfg = load_config(None, TINY_SYSTEM + [f"train.out_dir={tmp_path}"])
    ensure_tokenizer(cfg, str(tmp_path))
    torch.manual_seed(0)
    system = StarFlowSystem(cfg, str(tmp_path)).eval()
    res = equal_output_speedup(system, ["a red circle"], cfg.data.frames, 0, (4, 8), tau=1e-3)
    assert res["criterion"].startswith("max |video - sequential| <= 2")
    for key in ("commit_pass", "no_commit_pass"):
        ladder = res[key]["ladder"]
        assert ladder and ladder[-1]["max_abs_video_diff"] <= 2 and res[key]["tau"] == ladder[-1]["tau"]
        assert all(row["max_abs_video_diff"] > 2 for row in ladder[:-1])
        assert ladder[-1]["seconds_per_deep_token_eval"] > 0
    best = res["best"]
    assert best["speedup_vs_sequential"] == pytest.approx(res["sequential_seconds"] / best["seconds"])


def test_regression_benchmark_runs(tmp_path, megatron_ready):
    """benchmarks/regression.py: JSON figures per row (times, fast-vs-megatron ratio, work counts,
    accuracy), and the comparison with a baseline file (numbers, no verdict)."""
    from helpers_scripts import load_script

    regression = load_script("benchmarks/regression.py")
    out = tmp_path / "r.json"
    args = ["--models", "tiny", "--rows", "denoiser,jacobi", "--repeats", "1", "--out", str(out)]
    first = regression.main(args)
    rows = first["models"][0]["rows"]
    assert set(rows) == {"denoiser", "jacobi"}
    for row in rows.values():
        assert row["cpu_s"] > 0 and row["megatron_path_cpu_s"] > 0 and row["fast_vs_megatron"] > 0
    assert rows["jacobi"]["work"]["deep_passes"] > 0 and rows["jacobi"]["max_abs_vs_sequential"] < 1.0
    again = regression.main(args[:-2] + ["--baseline", str(out)])
    cmp = again["vs_baseline"]["tiny/jacobi"]
    assert cmp["work_changed"] is False and cmp["cpu_time_vs_baseline"] > 0


def test_kernel_split_counts_gemm_flops_and_attention():
    """compare_ml_starflow --profile: GEMM GFLOP from the operand shapes (mm, addmm, bmm), their
    time, attention time, the rest; and the floor ratio built from them."""
    from helpers_scripts import load_script

    compare = load_script("benchmarks/compare_ml_starflow.py")
    a, b, bias = torch.randn(48, 32), torch.randn(32, 16), torch.randn(16)
    x, y = torch.randn(3, 8, 4), torch.randn(3, 4, 5)
    q = torch.randn(1, 2, 16, 8)

    from megatron_starflow.models import cpu_linear

    big, weight = torch.randn(2, 100, 96), torch.randn(128, 96)
    onednn = cpu_linear.onednn_usable(big, weight)

    def fn():
        torch.mm(a, b)
        torch.addmm(bias, a, b)
        torch.bmm(x, y)
        cpu_linear.linear(big, weight)  # oneDNN's linear where the build has it, else addmm / mm
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (a * 2).sum()

    split = compare.kernel_split(fn)
    assert onednn == cpu_linear._BUILT_WITH_ONEDNN
    assert split["gemm_gflop"] == pytest.approx(
        2 * (2 * 48 * 32 * 16 + 3 * 8 * 4 * 5 + 2 * 100 * 96 * 128) / 1e9)
    assert split["gemm_ms"] > 0 and split["attention_ms"] > 0 and split["other_ms"] > 0
    assert split["total_ms"] == pytest.approx(split["gemm_ms"] + split["attention_ms"] + split["other_ms"])
    theirs = {**split, "total_ms": 2 * split["total_ms"]}
    assert compare.kernel_floor(split, theirs) == pytest.approx(
        (split["gemm_ms"] + split["attention_ms"]) / (2 * split["total_ms"]))
