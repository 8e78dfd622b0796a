#!/usr/bin/env python
"""Build a preset (or YAML config) on the meta device and print its parameter count by part.

    python tools/count_params.py --preset 7b
    python tools/count_params.py --config examples/configs/tiny_cpu.yaml
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    import torch

    from megatron_starflow.config import load_config
    from megatron_starflow.models.starflow import StarFlowV, count_parameters
    from megatron_starflow.parallel.state import ensure_single_process

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, preset=args.preset)
    ensure_single_process()
    with torch.device("meta"):  # shapes only: a 7B model costs no memory
        model = StarFlowV(cfg.model)
    parts = count_parameters(model)
    print(json.dumps({"preset": cfg.preset, **{k: v for k, v in parts.items()},
                      **{f"{k}_billions": round(v / 1e9, 4) for k, v in parts.items()}}, indent=2))


if __name__ == "__main__":
    main()
