#!/usr/bin/env python
"""Train the sentencepiece caption tokenizer.

    python tools/train_tokenizer.py --out data/tok --vocab-size 256 --synthetic 5000
    python tools/train_tokenizer.py --out data/tok --captions captions.txt

Writes <out>/spm.model and <out>/spm.vocab. --vocab-size is an upper bound:
small caption sets yield fewer pieces (sentencepiece hard_vocab_limit=False).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_starflow.data.tokenizer import read_captions_file, train_sentencepiece


def main(argv: list[str] | None = None) -> None:
    from megatron_starflow.cli import checks

    p = checks.ArgumentParser(prog="tools/train_tokenizer.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (one that holds spm.model needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing spm.model")
    p.add_argument("--vocab-size", type=checks.integer(8, 1 << 20), default=256,
                   help="upper bound on pieces, in [8, 2^20]")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", type=checks.input_file, help="UTF-8 text file, one caption per line")
    src.add_argument("--synthetic", type=checks.integer(1), metavar="N",
                     help="use captions of the first N synthetic train clips (>= 1)")
    p.add_argument("--split", default="train", help="synthetic split to draw captions from")
    args = p.parse_args(argv)
    checks.or_usage_error(p, checks.check_output_folder, "--out", str(args.out), args.overwrite,
                          marker="spm.model")

    if args.captions is not None:
        try:
            captions = read_captions_file(args.captions)
        except ValueError as e:
            p.error(f"--captions: {e}")
    else:
        from megatron_starflow.data.synthetic import all_captions

        captions = all_captions(args.split, args.synthetic)
    path = train_sentencepiece(captions, args.out, args.vocab_size)
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    print(f"wrote {path} ({size} pieces from {len(captions)} captions)")


if __name__ == "__main__":
    main()
