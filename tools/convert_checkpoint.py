#!/usr/bin/env python
"""Convert between training checkpoints and inference folders.

    # training checkpoint (run folder, checkpoints folder or step folder) -> inference folder
    python tools/convert_checkpoint.py export --checkpoint runs/tiny --out exports/tiny \
        [--dtype fp32|bf16] [--max-shard-size 5GB] [--verify] [--only-ema]
    # training checkpoint or inference folder -> the authors' layout (apple/ml-starflow):
    # DIR/model.pth (their key names), DIR/config.yaml (their `arguments:`), DIR/export_notes.txt
    python tools/convert_checkpoint.py export --format ml-starflow --checkpoint runs/7b --out exports/theirs \
        [--dtype fp32|bf16] [--text-model google/flan-t5-xl] [--drop-denoiser] [--verify]
    # inference folder -> training checkpoint to fine-tune from (launch.py train --out RUN_DIR resumes it)
    python tools/convert_checkpoint.py import --inference exports/tiny --out runs/finetune [--tp N --pp N]

The inference folder (model.safetensors [+ shards and index], config.json, tokenizer/) is what
`launch.py sample --checkpoint DIR` and `launch.py eval --checkpoint DIR` load.
"""

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    from megatron_starflow.cli import checks

    parser = checks.ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="training checkpoint -> inference folder")
    ex.add_argument("--checkpoint", required=True, type=checks.input_path,
                    help="run folder, its checkpoints/ folder or a step folder")
    ex.add_argument("--out", required=True,
                    help="inference folder to write (an existing non-empty one needs --overwrite)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ex.add_argument("--format", default="inference", choices=["inference", "ml-starflow"],
                    help="inference: our inference folder (default); ml-starflow: the authors' .pth + YAML")
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    ex.add_argument("--max-shard-size", default="5GB", type=checks.size_bytes,
                    help="split model.safetensors into files of at most this size (e.g. 5GB, 200MB; 0 = one file)")
    ex.add_argument("--only-ema", action="store_true", help="export the EMA weights (if the checkpoint has them)")
    ex.add_argument("--verify", action="store_true",
                    help="reload the folder and compare z, log-det and denoiser output with the checkpoint "
                         "(ml-starflow: map the export back with the importer and compare the tensors)")
    ex.add_argument("--text-model", default=None,
                    help="ml-starflow: Hugging Face id of the T5 for their 'text' key (default: "
                         "google/<basename of text.path> when that is a known T5)")
    ex.add_argument("--drop-denoiser", action="store_true",
                    help="ml-starflow: leave the denoiser out (learnable_self_denoiser 0)")
    im = sub.add_parser("import", help="inference folder -> training checkpoint (fine-tuning)")
    im.add_argument("--inference", required=True, type=checks.input_folder, help="inference folder")
    im.add_argument("--out", required=True,
                    help="run folder to create (one that holds checkpoints/ needs --overwrite)")
    im.add_argument("--overwrite", action="store_true", help="write into an existing run folder")
    im.add_argument("--tp", type=checks.integer(1), default=1, help="parallel.tp of the fine-tuning run (>= 1)")
    im.add_argument("--pp", type=checks.integer(1), default=1, help="parallel.pp of the fine-tuning run (>= 1)")
    args, code = checks.parse(parser, argv)
    if args is None:
        return code
    if args.command == "export":
        checks.or_usage_error(parser, checks.check_output_folder, "--out", args.out, args.overwrite)
    else:
        checks.or_usage_error(parser, checks.check_output_folder, "--out", args.out, args.overwrite,
                              marker="checkpoints")

    from megatron_starflow.convert import training

    try:
        if args.command == "export" and args.format == "ml-starflow":
            from megatron_starflow.convert.ml_starflow_export import export_ml_starflow

            if args.only_ema:
                raise ValueError("--only-ema is not supported with --format ml-starflow (it exports "
                                 "the model weights); export without --only-ema")
            report = export_ml_starflow(args.checkpoint, args.out, args.dtype, args.text_model,
                                        args.drop_denoiser, args.verify)
            for warning in report["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
            for note in report["notes"]:
                print(f"note: {note}", file=sys.stderr)
        elif args.command == "export":
            report = training.export_checkpoint(args.checkpoint, args.out, args.dtype,
                                                args.max_shard_size, args.only_ema)
            if args.verify:
                report["verify"] = training.verify_export(args.checkpoint, args.out, args.only_ema)
                v = report["verify"]
                print("verify: max |diff| z {z_max_abs_diff:.3g}, log-det {logdet_max_abs_diff:.3g}".format(**v)
                      + (f", denoiser {v['denoiser_max_abs_diff']:.3g}" if "denoiser_max_abs_diff" in v else ""),
                      file=sys.stderr)
        else:
            step_dir = training.import_inference(args.inference, args.out, args.tp, args.pp)
            report = {"inference": os.path.abspath(args.inference), "checkpoint": step_dir,
                      "resume_with": f"python launch.py train --out {args.out} train.steps=N ..."}
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
