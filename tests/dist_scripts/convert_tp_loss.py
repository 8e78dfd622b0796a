"""Load an imported (full-weight) training checkpoint on two tensor-parallel gloo ranks and write
the flow loss of a fixed batch (tests/test_convert.py::test_import_tp2_same_loss).

    torchrun --nproc_per_node 2 tests/dist_scripts/convert_tp_loss.py RUN_DIR OUT.json
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_starflow.parallel import state  # noqa: E402
from megatron_starflow.parallel.sharding import load_full_state_dict  # noqa: E402
from megatron_starflow.models.system import StarFlowSystem  # noqa: E402
from megatron_starflow.training.checkpoint import load_checkpoint  # noqa: E402


def main(run_dir: str, out: str) -> None:
    cfg, weights, _, step_dir = load_checkpoint(run_dir)
    state.initialize_from_config(cfg, backend="gloo")
    system = StarFlowSystem(cfg, step_dir)  # stacks built with tp from parallel_state
    load_full_state_dict(system.model, {k[6:]: v for k, v in weights.items() if k.startswith("model.")})
    system.text_encoder.load_state_dict(
        {k[13:]: v for k, v in weights.items() if k.startswith("text_encoder.")})
    system.eval()
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(2, 4, 4, 4, 12, generator=g)
    with torch.no_grad():
        text = system.encode_text(["a red circle moves right", ""])
        loss = system.model(tokens, text).nll_per_dim().mean().item()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"loss": loss, "tp": cfg.parallel.tp}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
