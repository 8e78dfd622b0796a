"""Train a small sentencepiece model on captions, and prepare a run's tokenizer.

The special-token ids follow T5's layout (pad=0, eos=1, unk=2) so the same
model file can back both SentencePieceTextEncoder and a tiny test T5 tokenizer;
bos=3 is reserved as well.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from megatron_starflow.config import Config, ConfigError
from megatron_starflow.models.system import format_captions, tokenizer_path

__all__ = ["ensure_tokenizer", "read_captions_file", "tokenizer_path", "train_sentencepiece"]

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4


def train_sentencepiece(
    captions: list[str], out_dir: str | os.PathLike, vocab_size: int = 256, model_prefix: str = "spm"
) -> str:
    """Train a BPE sentencepiece model; returns the path of `<out_dir>/<model_prefix>.model`.

    `vocab_size` is a soft upper bound (hard_vocab_limit=False): the synthetic
    captions only contain a few dozen distinct words, and sentencepiece would
    otherwise abort when it cannot find `vocab_size` distinct pieces (256 gives
    ~233 pieces on synthetic captions). It is also raised to the minimum
    sentencepiece accepts (every character + specials).

    BPE rather than unigram: on this tiny, highly repetitive corpus unigram
    training collapses to ~47 mostly single-character pieces, while BPE learns
    one piece per word.
    """
    import sentencepiece as spm

    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("train_sentencepiece: no non-empty captions to train on")
    chars = {ch for c in captions for ch in c if not ch.isspace()}
    minimum = len(chars) + NUM_SPECIAL + 1  # +1 for the word-boundary piece
    if vocab_size < minimum:
        warnings.warn(f"vocab_size={vocab_size} is below the {minimum} pieces the captions need; using {minimum}")
        vocab_size = minimum

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Train into a scratch dir and move the finished files in, so a crash never
    # leaves a truncated .model next to a stale .vocab.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        prefix = os.path.join(tmp, model_prefix)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            num_threads=1,  # deterministic output
            minloglevel=2,  # quiet
        )
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, out_dir / f"{model_prefix}{ext}")
    return str(out_dir / f"{model_prefix}.model")


def read_captions_file(path: str | os.PathLike) -> list[str]:
    """One caption per line; a missing or empty file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption file {path} does not exist: pass a text file with one caption per line, "
                         f"or use --synthetic N to generate captions")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"caption file {path} has no captions: it must contain one caption per line, "
                         f"or use --synthetic N to generate captions")
    return captions


def ensure_tokenizer(cfg: Config, run_dir: str) -> str:
    """The sentencepiece model of a run (``text.encoder=sentencepiece``): the configured one
    (``text.path``), or one trained on the training split's captions (deterministic) and kept in
    the run folder so checkpoints carry it. Returns its path (``tokenizer_path(cfg, run_dir)``)."""
    path = tokenizer_path(cfg, run_dir)
    if os.path.isfile(path):
        return path
    if cfg.text.path:
        raise ConfigError(f"text.path={cfg.text.path!r} does not exist; train one with "
                          f"`python tools/train_tokenizer.py` or leave text.path empty")
    if cfg.data.source == "shards":  # the captions the run will actually train on
        from megatron_starflow.data.loader import shard_captions

        raw = shard_captions(cfg.data.shards)
    else:
        from megatron_starflow.data.synthetic import all_captions

        raw = all_captions("train", cfg.data.num_train_clips)
    train_sentencepiece(format_captions(cfg, raw), os.path.dirname(path), cfg.text.vocab_size)
    return path
