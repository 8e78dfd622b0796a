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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vocab-size", type=int, default=256)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", type=Path, help="text file, one caption per line")
    src.add_argument("--synthetic", type=int, metavar="N", help="use captions of the first N synthetic train clips")
    p.add_argument("--split", default="train", help="synthetic split to draw captions from")
    args = p.parse_args(argv)

    if args.captions is not None:
        try:
            captions = read_captions_file(args.captions)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        from megatron_starflow.data.synthetic import all_captions

        if args.synthetic < 1:
            raise SystemExit(f"error: --synthetic must be >= 1, got {args.synthetic}")
        captions = all_captions(args.split, args.synthetic)
    path = train_sentencepiece(captions, args.out, args.vocab_size)
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    print(f"wrote {path} ({size} pieces from {len(captions)} captions)")


if __name__ == "__main__":
    main()
