"""ShardedAdamW (training/sharded_optimizer.py): megatron's distributed-optimizer semantics on CPU.

One process: equals torch.optim.AdamW(foreach=False) + clip_grad_norm_ per group (float32 to 1e-6,
float64 to 1e-12), with bf16 parameters the fp32 master differs from the parameters only by
rounding and micro-batches accumulate in fp32, per-rank bytes follow the memory estimator.
Four gloo processes (slow, tests/dist_scripts/sharded_optim_checks.py): DP = 1, 2, 4 (sub-groups
of one launch) against the one-process reference with the same global batch, and the per-rank
bytes at DP = 1, 2, 4 against ``parallel.memory.static_bytes_per_param``.
"""

import json
import os

import pytest
import torch

from helpers_dist import run_checks
from helpers_sharded import Tiny, batch, groups_of, loss_fn, reference

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "sharded_optim_checks.py")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_world1_matches_torch_adamw(dtype, tol):
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    lrs, clip, steps = {"flow": 3e-2, "denoiser": 1e-2}, {"flow": 0.5, "denoiser": 100.0}, 6
    want, opts, want_norms = reference(dtype, steps, lrs, clip)
    model = Tiny(dtype)
    opt = ShardedAdamW(groups_of(model), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, shard_group=None,
                       norm_group=None, main_dtype=dtype)
    clipped = 0
    for s in range(steps):
        opt.zero_grad()
        x, y = batch(s, dtype)
        loss_fn(model, x, y).backward()
        assert all(p.grad is None for p in model.parameters())  # moved into main_grad by the hook
        opt.reduce_grads()
        norms = opt.grad_norms()
        for k in norms:
            assert abs(norms[k] - want_norms[s][k]) <= tol * max(1.0, want_norms[s][k]), (s, k)
        clipped += norms["flow"] > clip["flow"]
        opt.step(lrs, clip)
    assert clipped >= 3  # the flow group's clipping was active
    got, ref = dict(model.named_parameters()), dict(want.named_parameters())
    for k in ref:
        assert (got[k] - ref[k]).abs().max() <= tol * lrs["flow"] * 10, k
    for name, o in opts.items():
        for p in o.param_groups[0]["params"]:
            fqn = next(k for k, v in ref.items() if v is p)
            e = opt._entry(fqn)
            st = o.state[p]
            assert torch.allclose(opt._moment_rows(opt._exp_avg, e).view(p.shape), st["exp_avg"], rtol=0, atol=tol)
            assert torch.allclose(opt._moment_rows(opt._exp_avg_sq, e).view(p.shape), st["exp_avg_sq"], rtol=0,
                                  atol=tol)
    assert opt.group_steps == {"flow": steps, "denoiser": steps}
    if dtype == torch.float32:
        assert opt.local_bytes()["master"] == 0  # fp32 params: the master rows are the params
    opt.close()


def test_bf16_master_and_fp32_accumulation():
    from megatron_starflow.parallel.memory import static_bytes_per_param
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    model = Tiny(torch.bfloat16)
    opt = ShardedAdamW(groups_of(model), betas=(0.9, 0.95), weight_decay=0.1, main_dtype=torch.float32)
    named = dict(model.named_parameters())
    lrs = {"flow": 1e-2, "denoiser": 1e-2}
    for s in range(3):
        opt.zero_grad()
        grads = {}
        for micro in range(2):  # two micro-batches: the main grads add the bf16 grads in fp32
            x, y = batch(10 * s + micro, torch.bfloat16)
            loss_fn(model, x, y).backward()
            for k, p in named.items():
                assert p.grad is None
                grads.setdefault(k, []).append(p.main_grad.clone())
        for k, p in named.items():
            assert p.main_grad.dtype == torch.float32
            first, both = grads[k]
            assert not torch.equal(both, first)
        opt.reduce_grads()
        opt.step(lrs, {"flow": 1.0, "denoiser": 1.0})
        for k, p in named.items():
            master = opt.master_rows(k).view(p.shape)
            assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
            assert torch.equal(master.to(torch.bfloat16), p.detach())  # only rounding apart
    # the master carries what bf16 rounds away
    assert any(not torch.equal(opt.master_rows(k).view(p.shape), p.detach().float()) for k, p in named.items())
    b = opt.local_bytes()
    per = static_bytes_per_param(1, distributed_optimizer=True, bf16=True)
    assert b["params"] == per["params"] * b["numel"]
    assert b["main_grads"] == per["grads"] * b["numel"] and b["moments"] == per["optimizer"] * b["numel"]
    opt.close()


def test_manual_grads_and_zero_grad():
    """Grads set by hand are picked up by reduce_grads; zero_grad clears everything."""
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    model = Tiny()
    opt = ShardedAdamW(groups_of(model))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.reduce_grads()
    assert all(torch.equal(p.main_grad, torch.ones_like(p)) and p.grad is None for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    norms = opt.grad_norms()
    assert abs(norms["flow"] ** 2 + norms["denoiser"] ** 2 - n) < 1e-9
    opt.zero_grad()
    assert all(float(p.main_grad.abs().sum()) == 0 for p in model.parameters())
    with pytest.raises(KeyError):
        opt.step({"flow": 1e-3})
    opt.close()


@pytest.mark.slow
def test_dp_1_2_4_match_one_process(tmp_path):
    res = run_checks(SCRIPT, tmp_path / "out.json", [], world=4, timeout=400)
    print(json.dumps(res, indent=1))
    for dp in (2, 4):
        r = res[f"adamw_dp{dp}"]
        assert r["max_param_diff"] <= 1e-5, r
        assert r["max_norm_rel_diff"] <= 1e-5, r
        assert r["clipped_steps"] >= 2, r
        assert r["empty_shards"] >= 1 if dp == 4 else True, r
    for dp in (1, 2, 4):
        for dtype in ("bf16", "fp32"):
            r = res[f"memory_dp{dp}_{dtype}"]
            for k in ("params", "grads", "optimizer", "total"):
                assert abs(r["ratio"][k] - 1) <= 0.10, (dp, dtype, k, r)
    for dp in (2, 4):  # the tiny STARFlow-V: uneven rows, the first shard ranks hold a little more
        r = res[f"memory_starflow_dp{dp}_bf16"]
        assert abs(r["total_ratio_max_over_ranks"] - 1) <= 0.10, r
