#!/usr/bin/env python
"""Import the authors' published STARFlow-V checkpoint (apple/ml-starflow) as an inference folder.

    python tools/import_ml_starflow.py --checkpoint ckpts/starflow-v_7B_t2v_caus_480p_v3.pth \
        --config configs/starflow-v_7B_t2v_caus_480p.yaml --out exports/starflow-v-7b \
        --t5 /models/flan-t5-xl --vae /models/Wan2.2-TI2V-5B-Diffusers/vae [--aspect-ratio 16:9] [--dtype bf16]

then `python launch.py sample --checkpoint exports/starflow-v-7b --prompt "..." --cfg 3.5`.
--t5: local T5 encoder folder (config.json, weights, tokenizer files); --vae: local diffusers
AutoencoderKLWan folder of Wan2.2. Both are only recorded in config.json (text.path,
data.codec_path) and may be given later by editing it.
"""

import argparse
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def _optional_folder(text: str) -> str:
    from megatron_starflow.cli import checks

    return checks.input_folder(text) if text else text


def _aspect_ratio(text: str) -> str:
    """W:H with two positive integers, e.g. 16:9."""
    w, _, h = text.partition(":")
    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise argparse.ArgumentTypeError(f"must be W:H with positive integers, e.g. 16:9, got {text!r}")
    return text


def main(argv=None) -> int:
    from megatron_starflow.cli import checks

    parser = checks.ArgumentParser(prog="tools/import_ml_starflow.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=checks.input_file,
                        help="their .pth (torch.save of the model state_dict)")
    parser.add_argument("--config", required=True, type=checks.input_file,
                        help="their YAML (configs/starflow-v_7B_t2v_caus_480p.yaml)")
    parser.add_argument("--out", required=True,
                        help="inference folder to write (an existing non-empty one needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--t5", default="", type=_optional_folder, help="local T5 encoder folder (text.path)")
    parser.add_argument("--vae", default="", type=_optional_folder, help="local Wan VAE folder (data.codec_path)")
    parser.add_argument("--aspect-ratio", default="16:9", type=_aspect_ratio,
                        help="aspect ratio of the videos to sample (caption suffix and frame size, as their sample.py)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                        help="stored dtype (bf16 halves the size; loading casts to fp32)")
    parser.add_argument("--max-shard-size", default="5GB", type=checks.size_bytes)
    args, code = checks.parse(parser, argv)
    if args is None:
        return code
    checks.or_usage_error(parser, checks.check_output_folder, "--out", args.out, args.overwrite)

    from megatron_starflow.convert.ml_starflow import import_ml_starflow

    try:
        report = import_ml_starflow(args.checkpoint, args.config, args.out, args.t5, args.vae,
                                    args.aspect_ratio, args.dtype, args.max_shard_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in report.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    report["dropped_constants"] = len(report["dropped_constants"])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
