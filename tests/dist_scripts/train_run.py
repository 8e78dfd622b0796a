"""One training run (``training.trainer.train``) on every rank of a gloo launch.

    torchrun --nproc_per_node N tests/dist_scripts/train_run.py OUT.json CONFIG.json RUN_DIR

Rank 0 writes ``{"run": {"steps": ...}}`` (or the traceback) to OUT.json."""

from __future__ import annotations

import json
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from megatron_starflow.config import config_from_dict  # noqa: E402
from megatron_starflow.training.trainer import train  # noqa: E402


def main(out: str, config: str, run_dir: str) -> None:
    with open(config) as f:
        cfg = config_from_dict(json.load(f))
    try:
        result = {"steps": train(cfg, run_dir, quiet=True).steps}
    except Exception:  # noqa: BLE001 - reported to the test
        result = {"error": traceback.format_exc()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"run": result}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
