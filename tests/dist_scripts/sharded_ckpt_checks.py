"""Sharded DCP checkpoints of ShardedAdamW + TP weights on 4 gloo ranks
(tests/test_sharded_checkpoint.py::test_reshard_4_ranks).

    torchrun --nproc_per_node 4 tests/dist_scripts/sharded_ckpt_checks.py OUT.json BASE_DIR

megatron parallel_state is initialised with tp=2 (TP groups {0,1} {2,3}, DP groups {0,2} {1,3}).
Layouts (each trained for K steps from the same full bf16 weights with the same synthetic full
gradients, no clipping, so every layout's state is bit-identical to the one-process state: AdamW is
elementwise and averaging identical bf16 gradients is exact):

    tp2dp1  megatron Column/RowParallelLinear, TP pairs, no sharding   (pairs save to two folders)
    tp1dp2  plain parameters, shard pairs {0,1} {2,3}                  (pairs save to two folders)
    tp2dp2  megatron layers, megatron TP and DP groups (world)
    tp1dp4  plain parameters, shard group = world (uneven and empty row shards)
    pp2     "stages": ranks {0,1} own the flow group, {2,3} the denoiser group, dp=2 each (world)

Writes {check: result or {"error": traceback}} (rank 0) and BASE_DIR/reference.pt: the one-process
full weights and optimizer state (for load_full_model in the pytest process).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from megatron_starflow.training import sharded_checkpoint as sc  # noqa: E402
from megatron_starflow.training.sharded_optimizer import ShardedAdamW  # noqa: E402

H, F = 128, 512
# name: (full shape, TP partition dim or None, group)
SPEC = {"col.weight": ((F, H), 0, "flow"), "col.bias": ((F,), 0, "flow"), "row.weight": ((H, F), 1, "flow"),
        "row.bias": ((H,), None, "flow"), "gain": ((), None, "flow"),
        "norm": ((H,), None, "denoiser"), "odd": ((5, 3), None, "denoiser")}
K = 2
LRS = {"flow": 1e-2, "denoiser": 3e-3}


def full_init() -> dict:
    g = torch.Generator().manual_seed(11)
    return {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, (shape, _, _) in SPEC.items()}


def full_grad(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(shape, generator=g) for k, (shape, _, _) in SPEC.items()}


def tp_slice(t: torch.Tensor, dim, tp: int, r: int) -> torch.Tensor:
    return t.chunk(tp, dim)[r] if dim is not None and tp > 1 else t


class Layout:
    def __init__(self, name, tp, tp_group, shard_group, group, names=None):
        self.name, self.tp, self.tp_group, self.shard_group, self.group = name, tp, tp_group, shard_group, group
        self.tp_rank = dist.get_rank(tp_group) if tp > 1 else 0
        self.names = names or list(SPEC)


def megatron_params() -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, use_cpu_initialization=True,
                            params_dtype=torch.bfloat16, bf16=True)
    col = ColumnParallelLinear(H, F, config=cfg, init_method=nn.init.zeros_, bias=True, gather_output=False)
    row = RowParallelLinear(F, H, config=cfg, init_method=nn.init.zeros_, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    assert col.weight.partition_dim == 0 and col.weight.tensor_model_parallel
    assert row.weight.partition_dim == 1 and row.weight.tensor_model_parallel
    assert not getattr(row.bias, "tensor_model_parallel", False)
    return {"col.weight": col.weight, "col.bias": col.bias, "row.weight": row.weight, "row.bias": row.bias}


def build(lay: Layout, init: bool = True):
    full = full_init()
    params = megatron_params() if lay.tp > 1 else {}
    named = []
    for k in lay.names:
        shape, dim, _ = SPEC[k]
        if k not in params:
            p = nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
            if dim is not None:  # what megatron's layers set (also at TP=1)
                p.tensor_model_parallel, p.partition_dim = True, dim
            params[k] = p
        p = params[k]
        with torch.no_grad():
            p.copy_(tp_slice(full[k], dim, lay.tp, lay.tp_rank) if init else torch.zeros_like(p))
        named.append((k, p))
    groups = []
    for gname in ("flow", "denoiser"):
        members = [(k, p) for k, p in named if SPEC[k][2] == gname]
        if members:
            groups.append({"name": gname, "params": members})
    opt = ShardedAdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, shard_group=lay.shard_group,
                       norm_group=lay.group, tp_group=lay.tp_group, main_dtype=torch.float32)
    return named, opt


def train(lay: Layout, named, opt, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        opt.zero_grad()
        grads = full_grad(s)
        for k, p in named:
            p.grad = tp_slice(grads[k], SPEC[k][1], lay.tp, lay.tp_rank).to(torch.bfloat16).reshape(p.shape)
        opt.reduce_grads()
        opt.step(LRS, None)


def snapshot(named, opt) -> dict:
    out = {}
    for k, p in named:
        st = opt.state_rows(k)
        out[k] = {"param": p.detach().clone(), **{n: st[n].clone() for n in ("master", "exp_avg", "exp_avg_sq")},
                  "rows": st["rows"]}
    out["steps"] = dict(opt.group_steps)
    return out


def tensors_of(opt) -> dict:
    t = opt.model_sharded_state_dict(prefix="model.")
    t.update(opt.sharded_state_dict())
    return t


def load_into(lay: Layout, path: str):
    named, opt = build(lay, init=False)
    loaded = sc.load(path, tensors_of(opt), group=lay.group)
    opt.load_sharded_state_dict(loaded)
    opt.load_model_sharded_state_dict(loaded, prefix="model.")
    return named, opt


def compare_with_reference(lay: Layout, named, opt, ref: dict) -> list[str]:
    """Bit-exact: this layout's local tensors against the matching pieces of the full reference."""
    bad = []
    for k, p in named:
        dim = SPEC[k][1]
        want_p = tp_slice(ref[k]["param"], dim, lay.tp, lay.tp_rank)
        if not torch.equal(p.detach(), want_p.reshape(p.shape)):
            bad.append(f"{k}.param")
        st = opt.state_rows(k)
        lo, hi = st["rows"]
        for n in ("master", "exp_avg", "exp_avg_sq"):
            full = ref[k][n].reshape(-1) if ref[k][n].dim() == 0 or SPEC[k][0] == () else ref[k][n]
            want = tp_slice(full, dim, lay.tp, lay.tp_rank)[lo:hi]
            if not torch.equal(st[n], want):
                bad.append(f"{k}.{n}")
    if opt.group_steps != {g: ref["steps"][g] for g in opt.group_steps}:
        bad.append(f"steps {opt.group_steps}")
    return bad


def all_ok(bad: list[str]) -> list[str]:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, bad)
    return sorted({b for part in out for b in part})


def main(out: str, base: str) -> None:
    from megatron_starflow.parallel import state
    from megatron.core import parallel_state as ps

    state.initialize(2, 1, backend="gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(4)]
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    me, pair = singles[rank], pairs[rank // 2]
    tpg, dpg = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    layouts = {
        "tp1dp1": Layout("tp1dp1", 1, me, me, me),
        "tp2dp1": Layout("tp2dp1", 2, tpg, me, tpg),
        "tp1dp2": Layout("tp1dp2", 1, me, pair, pair),
        "tp2dp2": Layout("tp2dp2", 2, tpg, dpg, dist.group.WORLD),
        "tp1dp4": Layout("tp1dp4", 1, me, dist.group.WORLD, dist.group.WORLD),
        "pp2": Layout("pp2", 1, me, pair, dist.group.WORLD,
                      names=[k for k in SPEC if SPEC[k][2] == ("flow" if rank < 2 else "denoiser")]),
    }
    # a folder per layout; layouts run by pairs write one folder per pair
    folder = {n: os.path.join(base, n + (f"_pair{rank // 2}" if n in ("tp2dp1", "tp1dp2") else "")) for n in layouts}
    results: dict = {}

    def check(name, fn):
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"error": f"rank {rank}: " + traceback.format_exc()}
        dist.barrier()

    # the one-process reference: K steps, then K + 1
    ref_lay = layouts["tp1dp1"]
    named, opt = build(ref_lay)
    train(ref_lay, named, opt, K)
    ref = snapshot(named, opt)
    train(ref_lay, named, opt, 1, start=K)
    ref_next = snapshot(named, opt)
    opt.close()
    if rank == 0:
        torch.save({"K": ref, "K+1": ref_next}, os.path.join(base, "reference.pt"))

    saved: dict = {}
    for name in ("tp2dp1", "tp1dp2", "tp2dp2", "tp1dp4", "pp2"):
        def save_and_roundtrip(name=name):
            lay = layouts[name]
            named, opt = build(lay)
            train(lay, named, opt, K)
            before = snapshot(named, opt)
            mismatch_vs_ref = compare_with_reference(lay, named, opt, ref)
            extras = {"rank": rank, "rng": torch.get_rng_state()}
            path = sc.save(folder[name], K, tensors_of(opt), extras, {"parallel": name}, {"layout": name},
                           keep=2, group=lay.group)
            saved[name] = path
            norms = opt.grad_norms()  # every rank knows every group's norm (pp2: other stage's too)
            opt.close()
            named2, opt2 = load_into(lay, path)
            after = snapshot(named2, opt2)
            diff = [f"{k}.{n}" for k in before if k != "steps" for n in ("param", "master", "exp_avg", "exp_avg_sq")
                    if not torch.equal(before[k][n], after[k][n])]
            if before["steps"] != after["steps"]:
                diff.append("steps")
            ex = sc.load_extras(path, dist.get_rank(lay.group))
            if ex["rank"] != rank or not torch.equal(ex["rng"], extras["rng"]):
                diff.append("extras")
            opt2.close()
            found, notes = sc.find_resumable(folder[name], group=lay.group)
            return {"path": path, "roundtrip_mismatch": all_ok(diff),
                    "train_vs_reference_mismatch": all_ok(mismatch_vs_ref),
                    "meta": sc.read_meta(path)["parallel"], "norm_groups": sorted(norms),
                    "find_resumable_ok": found == path and not notes}
        check(f"save_{name}", save_and_roundtrip)

    for name in ("tp2dp1", "tp1dp2", "tp2dp2", "tp1dp4", "pp2"):
        def to_one_process(name=name):
            named, opt = load_into(layouts["tp1dp1"], saved[name])
            bad = compare_with_reference(layouts["tp1dp1"], named, opt, ref)
            opt.close()
            return {"mismatch": all_ok(bad)}
        check(f"load_{name}_at_tp1dp1", to_one_process)

    for src, dst in (("tp1dp2", "tp2dp2"), ("tp1dp2", "tp2dp1"), ("tp2dp1", "tp1dp4"), ("tp1dp4", "tp2dp2"),
                     ("tp2dp2", "pp2")):
        def reshard(src=src, dst=dst):
            lay = layouts[dst]
            named, opt = load_into(lay, saved[src])
            bad = compare_with_reference(lay, named, opt, ref)
            train(lay, named, opt, 1, start=K)  # the continuation equals the one-process step K + 1
            bad_next = compare_with_reference(lay, named, opt, ref_next)
            opt.close()
            return {"mismatch": all_ok(bad), "next_step_mismatch": all_ok(bad_next)}
        check(f"reshard_{src}_to_{dst}", reshard)

    def nesting():
        """tp outer, shard inner: the DTensor offsets of col.weight (TP dim 0, rows dim 0) are
        tp_rank * F/2 + this rank's first row."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        lay = layouts["tp2dp2"]
        named, opt = build(lay)
        dt = opt.sharded_state_dict()["optim.flow.col.weight.master"]
        shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
        lo, hi = opt.owned_rows("col.weight")
        opt.close()
        want = (lay.tp_rank * (F // 2) + lo, 0)
        mine = {"rank": rank, "ok": tuple(offset) == want and tuple(shape) == (hi - lo, H),
                "offset": list(offset), "want": list(want), "placements": str(dt.placements)}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return {"ok": all(m["ok"] for m in every), "ranks": every}
    check("dtensor_nesting", nesting)

    def file_sizes():
        """DP=2 (tp1dp2): every DCP data file against the one-process optimizer state (fp32
        master + two moments = 12 bytes per parameter)."""
        n = sum(torch.Size(SPEC[k][0]).numel() for k in SPEC)
        optim_bytes = 12 * n
        path = saved["tp1dp2"]
        sizes = {}
        for part in ("model", "optim"):
            for f in sorted(os.listdir(os.path.join(path, part))):
                if f.endswith(".distcp"):
                    sizes[f"{part}/{f}"] = os.path.getsize(os.path.join(path, part, f))
        return {"one_process_optimizer_bytes": optim_bytes, "files": sizes,
                "fractions": {k: v / optim_bytes for k, v in sizes.items()}}
    check("file_sizes_dp2", file_sizes)

    def corrupt_distributed():
        """Hashes spread over 4 ranks: a changed byte (same size) in the newest checkpoint."""
        lay = layouts["tp2dp2"]
        named, opt = build(lay)
        run = os.path.join(base, "corrupt")
        train(lay, named, opt, 1)
        first = sc.save(run, 1, tensors_of(opt), {}, {}, {}, keep=3, group=lay.group)
        train(lay, named, opt, 1, start=1)
        second = sc.save(run, 2, tensors_of(opt), {}, {}, {}, keep=3, group=lay.group)
        opt.close()
        victim = "optim/__3_0.distcp"
        if rank == 0:
            with open(os.path.join(second, victim), "r+b") as f:
                f.seek(os.path.getsize(os.path.join(second, victim)) // 2)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0xFF]))
        dist.barrier()
        found, notes = sc.find_resumable(run, group=lay.group)
        return {"found_first": found == first, "notes": notes}
    check("corrupt_distributed", corrupt_distributed)

    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
