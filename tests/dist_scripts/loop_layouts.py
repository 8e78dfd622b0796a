"""The real training loop (``training.trainer.train``) under several parallel layouts of one
4-process gloo launch, and resumes that change the layout (see tests/test_loop_parallel.py).

    torchrun --nproc_per_node 4 tests/dist_scripts/loop_layouts.py OUT.json WORK_DIR CONFIG.json

CONFIG.json holds the one-process config (global batch = data.batch_size). Each layout divides that
batch over its data-parallel replicas; per step, rank 0 records the logged loss. Runs:

* ``run/<layout>``: STEPS steps from scratch, a checkpoint every CKPT steps;
* ``resume/<from>-><to>``: the run of ``<from>`` rewound to step CKPT, resumed with ``<to>``.
Runs whose checkpoints the test process reads further (one-process resumes) stay in WORK_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from helpers_launch import last_losses, rewind  # noqa: E402
from megatron_starflow.config import config_from_dict  # noqa: E402
from megatron_starflow.parallel.state import initialize  # noqa: E402
from megatron_starflow.training.trainer import train  # noqa: E402

LAYOUTS = {  # name: (tp, pp, cp, sp)
    "dp4": (1, 1, 1, False),
    "tp2dp2": (2, 1, 1, False),
    "tp2sp_dp2": (2, 1, 1, True),
    "pp2dp2": (1, 2, 1, False),
    "cp2dp2": (1, 1, 2, False),
    "pp2tp2": (2, 2, 1, False),
    "cp2tp2sp": (2, 1, 2, True),
}
RESUMES = [("tp2dp2", "dp4"), ("dp4", "tp2dp2"), ("pp2dp2", "dp4"), ("dp4", "pp2dp2"),
           ("cp2dp2", "dp4"), ("dp4", "cp2dp2")]


def layout_config(base: dict, name: str, world: int):
    cfg = config_from_dict(json.loads(json.dumps(base)))
    tp, pp, cp, sp = LAYOUTS[name]
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.sp = tp, pp, cp, sp
    dp = world // (tp * pp * cp)
    cfg.data.batch_size = base["data"]["batch_size"] // dp
    return cfg


def main() -> None:
    out_path, work, config_path = sys.argv[1:4]
    base = json.load(open(config_path))
    ckpt = base["train"]["ckpt_every"]
    initialize()  # the default group (gloo), before the first layout
    rank, world = dist.get_rank(), dist.get_world_size()
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else None  # debugging: a subset of runs
    results = {}
    for name in LAYOUTS:
        if only and name not in only:
            continue
        key = f"run/{name}"
        try:
            run_dir = os.path.join(work, "run", name)
            train(layout_config(base, name, world), run_dir, quiet=True)
            results[key] = last_losses(run_dir) if rank == 0 else None
        except Exception:  # noqa: BLE001 - reported per check (every rank's in stderr)
            results[key] = {"error": traceback.format_exc()}
            print(f"rank {rank} {key}: {results[key]['error']}", file=sys.stderr)
    for src, dst in RESUMES:
        key = f"resume/{src}->{dst}"
        if only and key not in only:
            continue
        try:
            run_dir = os.path.join(work, "resume", f"{src}-{dst}")
            if rank == 0:
                rewind(os.path.join(work, "run", src), run_dir, ckpt, keep_metrics=False)
            dist.barrier()
            train(layout_config(base, dst, world), run_dir, quiet=True)
            results[key] = last_losses(run_dir) if rank == 0 else None
        except Exception:  # noqa: BLE001
            results[key] = {"error": traceback.format_exc()}
            print(f"rank {rank} {key}: {results[key]['error']}", file=sys.stderr)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
