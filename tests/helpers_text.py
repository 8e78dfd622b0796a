"""Shared fixtures for text-encoder tests: a sentencepiece model and a tiny random T5.

Everything is built offline from synthetic captions, so tests never need the
network or real checkpoints.
"""
from __future__ import annotations

from pathlib import Path

from megatron_starflow.data.synthetic import all_captions
from megatron_starflow.data.tokenizer import train_sentencepiece


def build_sentencepiece(out_dir: str | Path, num_captions: int = 500, vocab_size: int = 256) -> str:
    """Train the caption tokenizer on synthetic captions; returns the .model path."""
    return train_sentencepiece(all_captions("train", num_captions), out_dir, vocab_size)


def build_tiny_t5(out_dir: str | Path, spm_model: str | None = None, d_model: int = 32) -> Path:
    """Write a randomly initialised 2-layer T5 encoder + tokenizer into out_dir.

    transformers 5.x tokenizers are `tokenizers`-backed; T5Tokenizer accepts the
    vocabulary directly as (piece, score) pairs, so we lift it from our own
    sentencepiece model (whose pad/eos/unk ids 0/1/2 match T5's layout).
    """
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spm_model is None:
        spm_model = build_sentencepiece(out_dir / "spm")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=2, d_kv=16,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(out_dir)
    return out_dir
