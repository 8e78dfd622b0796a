"""Text encoders behind one interface.

Every encoder maps a list of captions to (emb [B, L, width], mask [B, L] bool)
with a fixed L = max_length (pad / truncate), so the flow model can rely on a
static text-sequence length. As in the authors' code, embeddings are multiplied
by the mask, so padding rows are exactly zero.

Two implementations:
  * SentencePieceTextEncoder: tiny trainable encoder for CPU tests / synthetic data.
  * T5TextEncoder: frozen HF T5 encoder loaded from a local directory (paper setup).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# The authors prepend noise level and frame rate to each caption; keep the
# template a plain str.format string so configs can carry it verbatim.
AUTHORS_TEMPLATE = "Noise Level {noise}:\nA video with {fps} fps:\n{caption}\n"
DEFAULT_TEMPLATE = "{caption}"


def format_caption(caption: str, template: str = DEFAULT_TEMPLATE, noise: float | str = 0.0, fps: int | str = 8) -> str:
    """Fill `template`'s {caption}, {noise} and {fps} fields (unused fields are ignored)."""
    return template.format(caption=caption, noise=noise, fps=fps)


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (classifier-free guidance).

    Draws exactly one uniform per caption from `generator`, so the result is a
    deterministic function of the generator state and the batch size.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    if not captions:
        return []
    drop = torch.rand(len(captions), generator=generator, device=generator.device) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


class TextEncoder(nn.Module):
    """Interface: forward(captions) -> (emb [B, L, width] float, mask [B, L] bool)."""

    width: int
    max_length: int
    trainable: bool

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def count_tokens(self, caption: str) -> int:  # pragma: no cover
        """Tokens of ``caption`` before truncation to ``max_length`` (EOS included)."""
        raise NotImplementedError


class SentencePieceTextEncoder(TextEncoder):
    """sentencepiece tokens -> learned embeddings + positions -> small pre-norm transformer.

    Bidirectional (no causal mask); padding is excluded via key_padding_mask.
    Non-empty captions get an EOS appended; the empty caption (caption dropout)
    has no tokens at all, so its mask is all False and its output all zeros.
    """

    trainable = True

    def __init__(self, model_path: str | os.PathLike, width: int = 64, layers: int = 2, heads: int = 4,
                 max_length: int = 16):
        super().__init__()
        import sentencepiece as spm

        if not Path(model_path).is_file():
            raise FileNotFoundError(
                f"sentencepiece model {model_path} not found: train one with "
                f"`python tools/train_tokenizer.py --out DIR --synthetic N` and pass DIR/spm.model"
            )
        self.model_path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = max(self.sp.pad_id(), 0)
        self.eos_id = self.sp.eos_id()
        self.width, self.max_length = int(width), int(max_length)

        self.token_emb = nn.Embedding(self.vocab_size, self.width)
        self.pos_emb = nn.Parameter(torch.zeros(self.max_length, self.width))
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=self.width, nhead=heads, dim_feedforward=4 * self.width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor only applies to post-norm layers; disable to avoid the warning.
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(self.width)  # pre-norm stacks need a closing norm

    def count_tokens(self, caption: str) -> int:
        toks = len(self.sp.encode(caption)) if caption else 0
        return toks + (1 if toks and self.eos_id >= 0 else 0)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] long, mask [B, L] bool (on CPU)."""
        ids = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), self.max_length), dtype=torch.bool)
        for i, caption in enumerate(captions):
            toks = self.sp.encode(caption) if caption else []
            if toks and self.eos_id >= 0:
                toks = toks + [self.eos_id]
            toks = toks[: self.max_length]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids, mask

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.token_emb.weight.device
        ids, mask = self.tokenize(list(captions))
        ids, mask = ids.to(device), mask.to(device)
        x = self.token_emb(ids) + self.pos_emb[None]
        # A row with every key masked makes softmax NaN; let such rows attend to
        # slot 0 only. Their output is zeroed by the mask below anyway.
        key_padding = ~mask
        key_padding[:, 0] &= mask.any(dim=1)
        x = self.encoder(x, src_key_padding_mask=key_padding)
        x = self.final_norm(x)
        return x * mask[..., None].to(x.dtype), mask


class T5TextEncoder(TextEncoder):
    """Frozen HF T5 encoder (last hidden state) loaded offline from a local directory."""

    trainable = False

    def __init__(self, path: str | os.PathLike, max_length: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        path = Path(path)
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise FileNotFoundError(
                f"T5 text encoder directory {path} is missing or incomplete: it must be a local folder "
                f"containing a T5 encoder (config.json + model.safetensors, as written by "
                f"T5EncoderModel.save_pretrained) and its tokenizer files (tokenizer.json / spiece.model "
                f"+ tokenizer_config.json). No download is attempted."
            )
        from transformers import AutoTokenizer, T5EncoderModel

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(self.path, local_files_only=True, dtype=dtype)
        self.model.requires_grad_(False)
        self.model.eval()
        self.width = int(self.model.config.d_model)
        self.max_length = int(max_length)

    def train(self, mode: bool = True) -> "T5TextEncoder":
        # Frozen: stay in eval mode (no dropout) even when the parent model trains.
        super().train(mode)
        self.model.eval()
        return self

    def count_tokens(self, caption: str) -> int:
        return len(self.tokenizer(caption)["input_ids"])

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return emb * mask[..., None].to(emb.dtype), mask


_ENCODERS = {"sentencepiece": SentencePieceTextEncoder, "t5": T5TextEncoder}


def build_text_encoder(kind: str, **kwargs) -> TextEncoder:
    """Factory: kind in {"sentencepiece", "t5"}; kwargs go to the constructor."""
    try:
        cls = _ENCODERS[kind]
    except KeyError:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {sorted(_ENCODERS)}") from None
    return cls(**kwargs)
