"""Tests for the caption tokenizer, text encoders and caption utilities."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_text import build_sentencepiece, build_tiny_t5
from megatron_starflow.data.synthetic import all_captions
from megatron_starflow.models.text import (
    AUTHORS_TEMPLATE, SentencePieceTextEncoder, T5TextEncoder, build_text_encoder, drop_captions, format_caption,
)

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red circle moves left on a black background", "", "a cyan diamond moves up on a navy background"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return build_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, spm_model):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"), spm_model=spm_model)


def test_tokenizer_trains(spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    assert 16 < sp.get_piece_size() <= 256
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    pieces = sp.encode(CAPTIONS[0], out_type=str)
    assert sp.decode(sp.encode(CAPTIONS[0])) == CAPTIONS[0]
    assert len(pieces) <= 12  # roughly one piece per word


def test_tokenizer_tool(tmp_path):
    out = tmp_path / "tok"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--out", str(out), "--synthetic", "300"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    assert (out / "spm.model").is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for bad, why in ((empty, "one caption per line"), (tmp_path / "missing.txt", "does not exist")):
        r = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--out", str(tmp_path / "new"),
                            "--captions", str(bad)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and str(bad) in r.stderr and why in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    # the folder of an earlier run: refused without --overwrite, replaced with it
    r = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--out", str(out), "--synthetic", "300"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "holds spm.model; pass --overwrite" in r.stderr


def test_sentencepiece_encoder(spm_model):
    enc = SentencePieceTextEncoder(spm_model, width=32, layers=2, heads=4, max_length=16)
    assert enc.trainable and enc.width == 32 and enc.max_length == 16
    emb, mask = enc(CAPTIONS)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert torch.isfinite(emb).all()
    assert mask[0].sum() > 0 and not mask[1].any()
    assert (emb[~mask] == 0).all() and (emb[1] == 0).all()
    # Mask is a prefix (left-aligned tokens) and real tokens are non-zero.
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(16)[None] < lengths[:, None])
    assert (emb[mask].abs().sum(-1) > 0).all()
    # Truncation to max_length.
    long_emb, long_mask = enc([" ".join([CAPTIONS[0]] * 5)])
    assert long_emb.shape == (1, 16, 32) and long_mask.all()


def test_sentencepiece_gradients(spm_model):
    enc = SentencePieceTextEncoder(spm_model, width=32, layers=1, heads=2, max_length=16)
    emb, _ = enc(CAPTIONS)
    emb.square().sum().backward()
    assert enc.token_emb.weight.grad is not None and enc.token_emb.weight.grad.abs().sum() > 0
    assert enc.pos_emb.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_only_empty_captions(spm_model):
    enc = SentencePieceTextEncoder(spm_model, width=32, max_length=8)
    emb, mask = enc(["", ""])
    assert not mask.any() and (emb == 0).all() and torch.isfinite(emb).all()


def test_t5_encoder(t5_dir):
    enc = T5TextEncoder(t5_dir, max_length=24)
    assert not enc.trainable and enc.width == 32 and enc.max_length == 24
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training, "frozen encoder stays in eval mode"
    emb, mask = enc(CAPTIONS)
    assert emb.shape == (3, 24, 32) and mask.shape == (3, 24) and mask.dtype == torch.bool
    assert not emb.requires_grad and torch.isfinite(emb).all()
    assert (emb[~mask] == 0).all() and mask[0].sum() > mask[1].sum()


def test_t5_missing_dir(tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5.*config.json"):
        T5TextEncoder(missing)


def test_build_text_encoder(spm_model, t5_dir):
    assert isinstance(build_text_encoder("sentencepiece", model_path=spm_model, width=16, heads=2),
                      SentencePieceTextEncoder)
    assert isinstance(build_text_encoder("t5", path=t5_dir, max_length=8), T5TextEncoder)
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        build_text_encoder("clip")


def test_drop_captions():
    caps = all_captions("train", 10000)
    a = drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    b = drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    assert a == b
    frac = sum(c == "" for c in a) / len(a)
    assert 0.08 < frac < 0.12
    assert all(x == "" or x == c for x, c in zip(a, caps))
    assert drop_captions(caps[:10], 0.0, torch.Generator()) == caps[:10]
    assert drop_captions(caps[:10], 1.0, torch.Generator()) == [""] * 10


def test_format_caption():
    assert format_caption("a red circle") == "a red circle"
    out = format_caption("a red circle", AUTHORS_TEMPLATE, noise=0.3, fps=16)
    assert out == "Noise Level 0.3:\nA video with 16 fps:\na red circle\n"
