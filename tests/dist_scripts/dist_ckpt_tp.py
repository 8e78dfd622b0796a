"""Save a tiny STARFlow-V from two tensor-parallel gloo ranks with megatron dist_checkpointing
(tests/test_dist_checkpoint.py::test_tp2_save_loads_at_tp1).

    torchrun --nproc_per_node 2 tests/dist_scripts/dist_ckpt_tp.py CKPT_DIR FULL.pt OUT.json

Writes the sharded checkpoint to CKPT_DIR, the TP-gathered full weights (what a TP=1 load must
reproduce) to FULL.pt, and to OUT.json the max |a-b| of a TP=2 -> TP=2 reload (fresh model).
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(ckpt_dir: str, full_path: str, out: str) -> None:
    from conftest import TINY_MODEL, randomize_heads

    from megatron_starflow.config import ModelConfig
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel import state
    from megatron_starflow.parallel.sharding import gather_full
    from megatron_starflow.training.dist_checkpoint import load_dist, save_dist

    state.initialize(2, 1, backend="gloo")
    torch.manual_seed(3)
    model = StarFlowV(ModelConfig(**TINY_MODEL))
    randomize_heads(model, seed=5)
    full = gather_full(model)
    save_dist(model, ckpt_dir)

    torch.manual_seed(4)  # different weights, then reload at TP=2
    fresh = StarFlowV(ModelConfig(**TINY_MODEL))
    load_dist(fresh, ckpt_dir)
    want, got = model.state_dict(), fresh.state_dict()
    diff = max(float((want[k] - got[k]).abs().max()) for k in want if torch.is_tensor(want[k]))
    diffs = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(diffs, torch.tensor([diff]))
    if dist.get_rank() == 0:
        torch.save(full, full_path)
        with open(out, "w") as f:
            json.dump({"tp2_reload_maxdiff": max(float(d) for d in diffs),
                       "sharded_qkv_rows": int(model.blocks[0].transformer.block.layers[0]
                                               .self_attention.linear_qkv.weight.shape[0])}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron's writer starts a spawn-context Manager: keep this guard
    main(*sys.argv[1:4])
