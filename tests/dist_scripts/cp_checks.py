"""Multi-process checks of context-parallel (CP) sampling and CP training attention against one
process, run under ``torchrun`` on gloo (see tests/test_context_parallel.py).

    torchrun --nproc_per_node 2 tests/dist_scripts/cp_checks.py out.json CHECKPOINT t2v i2v train

Sampling checks load the tiny float64 checkpoint given as argv[2]; every rank computes the
one-rank references itself (same seed, same noise), rank 0 compares them with the CP result.
Training checks build a tiny float64 StarFlowV (random flow heads) and compare the CP flow loss
and every gradient with the one-process ``model(x, text).nll_per_dim().mean()``.
Results (max |a-b| per quantity; max |a-b| / max |b| for gradients) go to argv[1] as JSON.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_starflow.parallel import state  # noqa: E402
from megatron_starflow.sampling.jacobi import SolverOptions  # noqa: E402

CAPTIONS = ["a red circle moves up on a black background",
            "a blue square moves left on a white background"]
TRAIN_MODEL = dict(latent_channels=3, patch_size=1, num_blocks=3, shallow_width=32,
                   shallow_layers=1, deep_width=32, deep_layers=2, head_dim=16, text_width=8,
                   text_length=3, denoiser_layers=1, denoiser_window=10, pt_seq_len=4.0,
                   noise_std=0.3)
_SYSTEM = {}


def system(path: str, smooth: bool = False):
    """The checkpoint's system in float64; ``smooth``: a copy with its flow heads scaled by 1/4
    (head std 0.05, as a trained model: the tau checks need an iteration that settles; the
    checkpoint's std-0.2 heads make the random deep block chaotic, tokens up to ~24)."""
    key = "smooth" if smooth else "plain"
    if key not in _SYSTEM:
        from megatron_starflow.convert.loading import load_system

        sys_, _, _ = load_system(path)
        sys_ = sys_.double().eval()
        if smooth:
            with torch.no_grad():
                for m in sys_.model.blocks:
                    for p in (m.proj_out.weight, m.proj_out.bias, m.final_norm.weight):
                        p.mul_(0.25)
        _SYSTEM[key] = sys_
    return _SYSTEM[key]


def maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _sample_check(path: str, opts: SolverOptions, given: int = 0, seed: int = 3) -> dict:
    """CP sampling vs one-rank sampling (the given opts) and vs the sequential inverse."""
    from megatron_starflow.data.synthetic import SyntheticCaptionedVideos
    from megatron_starflow.sampling.cp_jacobi import cp_generate
    from megatron_starflow.sampling.generate import generate

    s = system(path, smooth=opts.tau > 0)
    prefix = None
    if given:
        d = s.cfg.data
        prefix = SyntheticCaptionedVideos("heldout", 1, d.frames, d.height, d.width)[0]["video"][None, :given]
    seq_opts = SolverOptions("sequential", guidance=opts.guidance)
    one = generate(s, CAPTIONS, seed=seed, opts=opts, prefix_video=prefix)
    seq = generate(s, CAPTIONS, seed=seed, opts=seq_opts, prefix_video=prefix)
    dist.barrier()
    cp = cp_generate(s, CAPTIONS, seed=seed, opts=opts, prefix_video=prefix)
    if dist.get_rank() != 0:
        return {}
    return {
        "token_diff_vs_one_rank": maxdiff(cp.tokens, one.tokens),
        "token_diff_vs_sequential": maxdiff(cp.tokens, seq.tokens),
        "one_rank_token_diff_vs_sequential": maxdiff(one.tokens, seq.tokens),
        "video_diff_vs_one_rank": maxdiff(cp.video, one.video),
        "video_equal_one_rank": bool(torch.equal(cp.video, one.video)),
        "prefix_video_kept": bool(prefix is None or torch.equal(cp.video[:, :given], prefix.expand(2, -1, -1, -1, -1))),
        "token_scale": float(seq.tokens.abs().max()),
        "cp_deep_network_evals": cp.deep.network_evals,
        "one_rank_deep_network_evals": one.deep.network_evals,
        "ranges": cp.ranges,
        "ranks": [{k: r[k] for k in ("network_evals", "speculative_passes", "context_passes",
                                      "final_passes", "iterations", "idle_seconds",
                                      "communication_seconds", "wall_seconds")} for r in cp.ranks],
    }


# ------------------------------------------------------------------------------ training

def _train_model(window: int, sp: bool = False):
    from megatron_starflow.config import ModelConfig, ParallelConfig
    from megatron_starflow.models.starflow import StarFlowV

    torch.manual_seed(0)
    model = StarFlowV(ModelConfig(**TRAIN_MODEL, attn_window=window),
                      parallel=ParallelConfig(sp=sp)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in list(model.blocks):
            for p in (m.proj_out.weight, m.proj_out.bias, m.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model


def _train_batch(frames: int):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, frames, 2, 3, 3, generator=gen, dtype=torch.float64)
    text = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    return x, text


def train_check(window: int = 0, frames: int = 4, tp: int = 1, sp: bool = False) -> dict:
    """CP flow loss and gradients vs one process (float64). With tp > 1 the world is tp x cp: the
    model is built TP-sharded from the one-process weights and K/V are gathered over megatron's
    context-parallel group."""
    from megatron_starflow.parallel.context_parallel import (allreduce_cp_grads,
                                                             context_parallel_group, cp_flow_nll)
    from megatron_starflow.parallel.grads import allreduce_sequence_parallel_grads
    from megatron_starflow.parallel.sharding import gather_full, load_full_state_dict

    state.initialize(1, 1)
    ref_model = _train_model(window)
    flow_params = [n for n, _ in ref_model.named_parameters()
                   if not n.startswith("learnable_self_denoiser")]
    x, text = _train_batch(frames)
    ref_loss = ref_model(x, text).nll_per_dim().mean()
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if n in flow_params}
    full = {k: v.clone() if torch.is_tensor(v) else v for k, v in ref_model.state_dict().items()}

    cp = dist.get_world_size() // tp
    state.initialize(tp, 1, cp=cp)
    model = _train_model(window, sp=sp)
    if tp > 1:
        load_full_state_dict(model, full)
    group = context_parallel_group()
    local, total = cp_flow_nll(model, x, text, group)
    local.backward()
    allreduce_cp_grads(model.parameters(), group)
    allreduce_sequence_parallel_grads(model)
    grads = gather_full(model, grads=True) if tp > 1 else {n: p.grad for n, p in model.named_parameters()}
    rel = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30))
              for n in flow_params)
    out = {"loss_diff": float((total - ref_loss.detach()).abs()), "loss": float(ref_loss),
           "grad_rel_diff": rel, "params_checked": len(flow_params)}
    state.initialize(1, 1)
    return out


CHECKS = {
    "t2v": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=0.0)),
    "t2v_guided": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=0.0, guidance=1.5)),
    "i2v": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=0.0), given=1),
    "i2v_guided": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=0.0, guidance=1.0), given=1),
    "t2v_tau": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=1e-3)),
    "i2v_tau": lambda p: _sample_check(p, SolverOptions("jacobi", 5, 8, tau=1e-3), given=1),
    "train": lambda p: train_check(0),
    "train_window": lambda p: train_check(2),
    "train_tp": lambda p: train_check(0, tp=2),
    "train_tp_sp": lambda p: train_check(2, tp=2, sp=True),
}


def main() -> None:
    out_path, ckpt, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    state.initialize(1, 1)
    results = {"world_size": dist.get_world_size()}
    for name in names:
        try:
            results[name] = CHECKS[name](ckpt)
        except Exception:  # noqa: BLE001 - report and carry on
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
