"""Parallel layouts against a one-process reference (float32, gloo, CPU), and the config checks.

Two launches of ``tests/dist_scripts/parallel_checks.py`` under torchrun run every check (see
that script for how the reference and the layouts start from identical full weights):
  world 2: TP=2, TP=2+SP (the deep stack's 11-token sequences exercise SP padding), DP=2 (grads
           all-reduced; + torch's ZeRO-1; + megatron's DistributedDataParallel; + the loop's own
           ShardedAdamW), PP=2 (1F1B over the flow blocks, 2 microbatches);
  world 4: PP=2 x TP=2, PP=2 x TP=2 + SP.
Tolerances (float32; a layout only changes summation order):
  loss, FSM loss, gradients, KV-cached inverse: max |a-b| / max |b| per tensor < 1e-5;
  parameters after 3 AdamW steps: max |a-b| < 0.05 * lr (Adam moves every element by ~lr per
  step, so round-off in an element's tiny gradient shows as a fraction of lr; observed <= 0.021).
"""

import os

import pytest
from helpers_dist import run_checks

from megatron_starflow.config import ConfigError, from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "parallel_checks.py")
REL_TOL = 1e-5
PARAM_TOL_IN_LR = 0.05


def _launch(tmp_path, world: int, checks: list[str]) -> dict:
    return run_checks(SCRIPT, tmp_path / f"world{world}.json", checks, world)


def _assert_matches(name: str, res: dict) -> None:
    for key in ("flow", "fsm", "grads", "inverse"):
        if key in res:
            assert res[key] < REL_TOL, f"{name}.{key}: relative difference {res[key]:.2e}"
    assert res["params"] < PARAM_TOL_IN_LR, f"{name}.params: {res['params']:.3f} lr"


@pytest.mark.slow
def test_two_processes_tp_sp_dp_pp(tmp_path):
    res = _launch(tmp_path, 2, ["tp", "tp_sp", "dp", "dp_zero", "dp_megatron", "pp", "dp_sharded"])
    for name in ("tp", "tp_sp", "dp", "dp_zero", "dp_megatron", "pp", "dp_sharded"):
        _assert_matches(name, res[name])
    for name in ("tp", "tp_sp"):
        assert "inverse" in res[name]  # KV-cached inverse under TP (and SP) was checked
    # The loop's optimizer (ShardedAdamW) at DP=2 on the STARFlow-V model: the reference's
    # parameters after 3 steps, and the two ranks own disjoint rows that add up to the model
    # (each about half: a rank holding everything would not be sharded).
    sharded = res["dp_sharded"]
    assert sharded["owned_fraction"] == 1.0 and 0.5 <= sharded["largest_share"] < 0.6


@pytest.mark.slow
def test_four_processes_pp_times_tp(tmp_path):
    res = _launch(tmp_path, 4, ["pp_tp", "pp_tp_sp"])
    for name in ("pp_tp", "pp_tp_sp"):
        _assert_matches(name, res[name])


# ------------------------------------------------------------------ config checks (one process)

def _cfg(**parallel):
    cfg = from_preset("tiny")
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_validate_parallel_derives_dp():
    from megatron_starflow.parallel.state import validate_parallel

    assert validate_parallel(_cfg(tp=2, pp=1), 8) == 4
    assert validate_parallel(_cfg(tp=2, pp=3), 6) == 1
    assert validate_parallel(_cfg(tp=2, pp=1, dp=2), 4) == 2


@pytest.mark.parametrize("parallel, world, key", [
    (dict(tp=4), 6, "world size 6"),
    (dict(tp=2, dp=3), 4, "parallel.dp=3"),
    (dict(tp=8), 8, "model.shallow_width=64"),  # 2 heads of 32
    (dict(tp=1, sp=True), 1, "parallel.sp=true needs parallel.tp"),
    (dict(pp=4), 4, "model.num_blocks=3"),
    (dict(pp=2, vpp=2), 4, "parallel.vpp"),
    (dict(cp=16), 16, "parallel.cp=16 splits latent frames"),  # 8 latent frames
    (dict(cp=2, pp=2), 4, "parallel.cp=2 with parallel.pp=2"),
])
def test_validate_parallel_names_the_key(parallel, world, key):
    from megatron_starflow.parallel.state import validate_parallel

    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("=", "=")):
        validate_parallel(_cfg(**parallel), world)


def test_validate_parallel_sequence_lengths_for_sp():
    from megatron_starflow.parallel.state import validate_parallel

    cfg = _cfg(tp=2, sp=True)
    validate_parallel(cfg, 2)  # 8x8 tokens per frame, 16 + 8*64 deep tokens: even
    cfg.model.text_length = 15
    with pytest.raises(ConfigError, match="deep block"):
        validate_parallel(cfg, 2)
    cfg = _cfg(tp=4)
    cfg.model.head_dim = 16  # shallow 4 heads, deep 8 heads, denoiser 4 heads: all divide 4
    validate_parallel(cfg, 4)
    cfg.model.denoiser_width = 48  # 3 heads
    with pytest.raises(ConfigError, match="model.denoiser_width=48"):
        validate_parallel(cfg, 4)


def test_split_blocks_balances_and_obeys_explicit_split():
    from megatron_starflow.parallel.pipeline import split_blocks

    cfg = from_preset("7b").model  # 5 shallow (2 x 3072^2 each) + deep (24 x 4096^2)
    assert [len(r) for r in split_blocks(cfg, 2)] == [5, 1]
    assert [list(r) for r in split_blocks(cfg, 3, "2,3,1")] == [[0, 1], [2, 3, 4], [5]]
    with pytest.raises(ValueError, match="sum to model.num_blocks"):
        split_blocks(cfg, 2, "2,2")
