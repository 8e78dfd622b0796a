#!/usr/bin/env python
"""Build a preset (or YAML config) on the meta device and print its parameter count by part.

    python tools/count_params.py --preset 7b
    python tools/count_params.py --config examples/configs/tiny_cpu.yaml
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def _load(args) -> None:
    from megatron_starflow.config import load_config

    load_config(args.config, args.overrides, preset=args.preset)


def main(argv=None) -> None:
    import torch

    from megatron_starflow.config import load_config
    from megatron_starflow.models.starflow import StarFlowV, count_parameters
    from megatron_starflow.parallel.state import ensure_single_process

    from megatron_starflow.cli import checks
    from megatron_starflow.config import PRESETS

    parser = checks.ArgumentParser(prog="tools/count_params.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS))
    parser.add_argument("--config", type=checks.input_file)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    checks.or_usage_error(parser, _load, args)
    cfg = load_config(args.config, args.overrides, preset=args.preset)
    ensure_single_process()
    with torch.device("meta"):  # shapes only: a 7B model costs no memory
        model = StarFlowV(cfg.model)
    parts = count_parameters(model)
    print(json.dumps({"preset": cfg.preset, **{k: v for k, v in parts.items()},
                      **{f"{k}_billions": round(v / 1e9, 4) for k, v in parts.items()}}, indent=2))


if __name__ == "__main__":
    main()
