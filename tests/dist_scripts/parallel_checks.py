"""Multi-process checks of TP, TP+SP, DP (+ sharded optimizer) and PP against a one-process
reference, run under ``torchrun`` on gloo (see tests/test_parallel.py).

Every rank first computes the one-process reference itself (megatron initialised with tp=pp=1, the
same seed, the full batch): loss, FSM loss, gradients, and parameters after 3 AdamW steps. Then each
layout re-initialises megatron, builds its model, loads the reference's initial full weights
(sharded for TP) and repeats the same 3 steps. Differences (loss, grads: max |a-b| / max |b| per tensor;
params: max |a-b| / lr; max over tensors and ranks) are written by rank 0 as JSON to the path given as argv[1].

    torchrun --nproc_per_node 2 tests/dist_scripts/parallel_checks.py out.json tp tp_sp dp pp
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_starflow.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_starflow.models.starflow import StarFlowV  # noqa: E402
from megatron_starflow.parallel import state  # noqa: E402
from megatron_starflow.parallel.grads import (  # noqa: E402
    allreduce_data_parallel_grads, allreduce_sequence_parallel_grads)
from megatron_starflow.parallel.sharding import gather_full, load_full_state_dict  # noqa: E402
from megatron_starflow.training.losses import flow_and_fsm_backward  # noqa: E402

# Shallow sequences have 4 tokens (h*w), deep/denoiser 3 + 8 = 11: odd, so SP pads the deep stack.
MODEL = dict(latent_channels=3, patch_size=1, num_blocks=3, shallow_width=32, shallow_layers=1,
             deep_width=32, deep_layers=2, head_dim=16, text_width=8, text_length=3,
             denoiser_layers=1, denoiser_window=10, pt_seq_len=4.0, noise_std=0.3)
BATCH, T, H, W = 4, 2, 2, 2
STEPS, LR = 3, 1e-3
# Adam's eps: the key bias of every attention layer has an exactly-zero gradient in exact arithmetic
# (softmax is invariant to a shift shared by all keys), so its float32 gradient is round-off
# (~1e-9) whose sign differs between layouts; with the default eps (1e-8) Adam turns that noise into
# +-lr updates. eps = 1e-6 keeps such round-off below 1e-3 * lr and leaves real updates unchanged.
EPS = 1e-6
# No weight decay: megatron's optimizer exempts biases and norms from it, torch's AdamW does not.
WD = 0.0
SEED = 7


def build_model(full_state: dict | None = None, sp: bool = False) -> StarFlowV:
    torch.manual_seed(SEED)
    model = StarFlowV(ModelConfig(**MODEL), parallel=ParallelConfig(sp=sp))
    if full_state is None:
        # Flow and denoiser heads start at zero (identity): randomise them so grads are non-trivial.
        gen = torch.Generator().manual_seed(SEED + 1)
        mods = list(model.blocks) + [model.learnable_self_denoiser]
        with torch.no_grad():
            for m in mods:
                for p in (m.proj_out.weight, m.proj_out.bias, m.final_norm.weight):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    else:
        load_full_state_dict(model, full_state)
    return model


def make_batch():
    gen = torch.Generator().manual_seed(SEED + 2)
    noisy = torch.randn(BATCH, T, H, W, MODEL["latent_channels"], generator=gen)
    text = torch.randn(BATCH, MODEL["text_length"], MODEL["text_width"], generator=gen)
    return noisy, text


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def max_rel(got: dict, want: dict) -> float:
    if not got:
        return 0.0
    return max(rel(got[k], want[k]) for k in got)


def max_abs_in_lr(got: dict, want: dict) -> float:
    """Parameters after the AdamW steps: max |a-b| in units of the learning rate. Adam moves every
    element by about lr per step whatever its gradient's size, so round-off in an element's tiny
    gradient shows up at a fixed fraction of lr; a relative measure would blow it up for
    zero-initialised tensors (biases)."""
    if not got:
        return 0.0
    return max((got[k] - want[k]).abs().max().item() for k in got) / LR


def reference() -> dict:
    state.initialize(1, 1)
    model = build_model()
    init = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    noisy, text = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    out = {"init": init}
    for step in range(STEPS):
        opt.zero_grad()
        losses = flow_and_fsm_backward(model, noisy, text)
        if step == 0:
            out["flow"], out["fsm"] = losses.flow, losses.fsm
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                out["inverse"] = model.inverse(losses.output.z, text)
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def check_tp(ref: dict, sp: bool) -> dict:
    """TP=2 (optionally with SP) on the whole world: every rank sees the full batch."""
    state.initialize(dist.get_world_size(), 1)
    model = build_model(ref["init"], sp=sp)
    noisy, text = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    res = {}
    for step in range(STEPS):
        opt.zero_grad()
        losses = flow_and_fsm_backward(model, noisy, text)
        allreduce_sequence_parallel_grads(model)
        if step == 0:
            res["flow"] = rel(losses.flow, ref["flow"])
            res["fsm"] = rel(losses.fsm, ref["fsm"])
            res["grads"] = max_rel(gather_full(model, grads=True), ref["grads"])
            with torch.no_grad():  # KV-cached sequential inverse: per-head keys (and SP padding)
                res["inverse"] = rel(model.inverse(losses.output.z, text), ref["inverse"])
        opt.step()
    res["params"] = max_abs_in_lr(gather_full(model), ref["params"])
    return res


def check_dp(ref: dict, sharded_optimizer: bool) -> dict:
    """DP over the whole world: rank r takes its slice of the batch; grads averaged over DP."""
    state.initialize(1, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(ref["init"])
    noisy, text = make_batch()
    part = BATCH // world
    noisy, text = noisy[rank * part:(rank + 1) * part], text[rank * part:(rank + 1) * part]
    if sharded_optimizer:
        # ZeRO-1: each DP rank keeps Adam state for its share of the params (torch's counterpart of
        # megatron's distributed optimizer; ours is check_dp_sharded).
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(list(model.parameters()), torch.optim.AdamW, lr=LR, eps=EPS, weight_decay=WD)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    res = {}
    for step in range(STEPS):
        opt.zero_grad()
        losses = flow_and_fsm_backward(model, noisy, text)
        allreduce_data_parallel_grads(model.parameters())
        if step == 0:
            flow, fsm = losses.flow.clone(), losses.fsm.clone()
            dist.all_reduce(flow)
            dist.all_reduce(fsm)
            res["flow"] = rel(flow / world, ref["flow"])
            res["fsm"] = rel(fsm / world, ref["fsm"])
            res["grads"] = max_rel({n: p.grad for n, p in model.named_parameters()}, ref["grads"])
        opt.step()
    res["params"] = max_abs_in_lr({n: p.detach() for n, p in model.named_parameters()}, ref["params"])
    return res


def check_megatron_dp(ref: dict) -> dict:
    """DP with megatron's DistributedDataParallel (contiguous grad buffers, bucketed all-reduce
    averaging over DP) feeding torch's AdamW: megatron's own optimizers allocate on CUDA; the
    loop's optimizer is ShardedAdamW (``check_dp_sharded``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    state.initialize(1, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(ref["init"])
    ddp = DistributedDataParallel(model.blocks[0].transformer.config,
                                  DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    noisy, text = make_batch()
    part = BATCH // world
    noisy, text = noisy[rank * part:(rank + 1) * part], text[rank * part:(rank + 1) * part]
    res = {}
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        flow_and_fsm_backward(model, noisy, text)  # DDP's grad hooks fill param.main_grad
        ddp.finish_grad_sync()
        for p in model.parameters():
            p.grad = p.main_grad
        if step == 0:
            res["grads"] = max_rel({n: p.grad for n, p in model.named_parameters()}, ref["grads"])
        opt.step()
    res["params"] = max_abs_in_lr({n: p.detach() for n, p in model.named_parameters()},
                                  ref["params"])
    return res


def check_dp_sharded(ref: dict) -> dict:
    """DP over the whole world with the training loop's own optimizer, ShardedAdamW
    (training/sharded_optimizer.py: megatron's distributed-optimizer semantics on CPU): each rank
    reduce-scatters the averaged gradients, updates its rows of the fp32 master weights and Adam
    moments, and all-gathers the parameters. Clipping is set out of reach (the reference does not
    clip); the rows each rank owns must add up to the model."""
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    state.initialize(1, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(ref["init"])
    noisy, text = make_batch()
    part = BATCH // world
    noisy, text = noisy[rank * part:(rank + 1) * part], text[rank * part:(rank + 1) * part]
    opt = ShardedAdamW([{"name": "all", "params": list(model.named_parameters())}], betas=(0.9, 0.999),
                       eps=EPS, weight_decay=WD, shard_group=dist.group.WORLD, norm_group=None,
                       main_dtype=torch.float32)
    res = {}
    for step in range(STEPS):
        opt.zero_grad()
        flow_and_fsm_backward(model, noisy, text)
        opt.reduce_grads()
        opt.step({"all": LR}, {"all": 1e9})
    res["params"] = max_abs_in_lr({n: p.detach() for n, p in model.named_parameters()}, ref["params"])
    owned = torch.tensor([sum(e.own_numel for e in opt.entries)])
    dist.all_reduce(owned)
    res["owned_fraction"] = int(owned) / sum(p.numel() for p in model.parameters())
    res["largest_share"] = sum(e.own_numel for e in opt.entries) / sum(p.numel() for p in model.parameters())
    opt.close()
    return res


def check_pp(ref: dict, tp: int = 1, sp: bool = False) -> dict:
    """PP=world/tp stages over the chain of flow blocks (megatron 1F1B, 2 microbatches)."""
    from megatron.core import parallel_state

    from megatron_starflow.parallel.pipeline import (FlowPipelineStage,
                                                      pipeline_flow_and_fsm_backward, split_blocks)

    pp = dist.get_world_size() // tp
    state.initialize(tp, pp)
    stage_index = parallel_state.get_pipeline_model_parallel_rank()
    cfg = ModelConfig(**MODEL)
    blocks = split_blocks(cfg, pp)
    stage = FlowPipelineStage(build_model(ref["init"], sp=sp), blocks[stage_index], stage_index, pp)
    noisy, text = make_batch()
    half = BATCH // 2
    micro = [{"noisy": noisy[i:i + half], "text": text[i:i + half]} for i in (0, half)]
    opt = torch.optim.AdamW(stage.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    res = {"flow": 0.0, "fsm": 0.0}
    prefix = "model."
    for step in range(STEPS):
        opt.zero_grad()
        out = pipeline_flow_and_fsm_backward(stage, micro)
        allreduce_sequence_parallel_grads(stage)
        if step == 0:
            if "flow" in out:
                res["flow"] = rel(out["flow"], ref["flow"])
            if "fsm" in out:
                res["fsm"] = rel(out["fsm"], ref["fsm"])
            grads = gather_full(stage, grads=True)
            res["grads"] = max_rel({k[len(prefix):]: v for k, v in grads.items()}, ref["grads"])
            res["stage_params"] = sum(p.numel() for p in stage.parameters())
        opt.step()
    params = gather_full(stage)
    res["params"] = max_abs_in_lr({k[len(prefix):]: v for k, v in params.items()}, ref["params"])
    return res


def reduce_max(res: dict) -> dict:
    out = {}
    for key, value in res.items():
        if isinstance(value, float):
            t = torch.tensor(value, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[key] = t.item()
        elif isinstance(value, int):  # per-stage counts: summed over stages, once per TP rank
            t = torch.tensor(value)
            dist.all_reduce(t)
            out[key] = int(t)
        else:
            out[key] = value
    return out


CHECKS = {
    "tp": lambda ref: check_tp(ref, sp=False),
    "tp_sp": lambda ref: check_tp(ref, sp=True),
    "dp": lambda ref: check_dp(ref, sharded_optimizer=False),
    "dp_zero": lambda ref: check_dp(ref, sharded_optimizer=True),
    "dp_megatron": check_megatron_dp,
    "dp_sharded": check_dp_sharded,
    "pp": lambda ref: check_pp(ref),
    "pp_tp": lambda ref: check_pp(ref, tp=2),
    "pp_tp_sp": lambda ref: check_pp(ref, tp=2, sp=True),
}


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    state.initialize(1, 1)
    ref = reference()
    results = {"world_size": dist.get_world_size()}
    for name in names:
        try:
            results[name] = reduce_max(CHECKS[name](ref))
        except Exception:  # noqa: BLE001 - report and carry on with the other checks
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
