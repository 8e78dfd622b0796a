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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="their .pth (torch.save of the model state_dict)")
    parser.add_argument("--config", required=True, help="their YAML (configs/starflow-v_7B_t2v_caus_480p.yaml)")
    parser.add_argument("--out", required=True, help="inference folder to write")
    parser.add_argument("--t5", default="", help="local T5 encoder folder (text.path)")
    parser.add_argument("--vae", default="", help="local Wan VAE folder (data.codec_path)")
    parser.add_argument("--aspect-ratio", default="16:9",
                        help="aspect ratio of the videos to sample (caption suffix and frame size, as their sample.py)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                        help="stored dtype (bf16 halves the size; loading casts to fp32)")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)

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
