"""The model system: STARFlow-V + text encoder + codec, built from a config.

Videos and captions go in, tokens and text embeddings go to the flow, tokens come back out as
videos. Training, evaluation, sampling and the converters all build this one object from a saved
config, so they see exactly the same model.

The system loads an existing sentencepiece tokenizer (``text.path``, or ``<run>/tokenizer/spm.model``);
preparing one from a run's captions is ``megatron_starflow.data.tokenizer.ensure_tokenizer``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from megatron_starflow.config import Config, ConfigError
from megatron_starflow.models.codecs import LatentCodec, build_codec
from megatron_starflow.models.starflow import StarFlowV, patchify, unpatchify
from megatron_starflow.models.text import TextEncoder, build_text_encoder, format_caption


def tokenizer_path(cfg: Config, run_dir: str) -> str:
    """Where the run's sentencepiece model is: ``text.path``, else inside the run folder (so that
    checkpoints carry it)."""
    return cfg.text.path or os.path.join(run_dir, "tokenizer", "spm.model")


def format_captions(cfg: Config, captions: list[str]) -> list[str]:
    """Captions as the text encoder reads them: the configured template with the noise level (in
    thousandths of ``model.noise_std``) and fps. Dropped captions ("") go through it as well, as
    in the reference: the unconditional text still states the noise level and fps."""
    noise = int(round(1000 * cfg.model.noise_std))
    return [format_caption(c, cfg.text.template, noise=noise, fps=cfg.data.fps) for c in captions]


def make_codec(cfg: Config) -> LatentCodec:
    if cfg.data.codec == "s2d":
        return build_codec("s2d", patch=cfg.data.s2d_patch, frames_per_token=cfg.data.s2d_frames)
    if not cfg.data.codec_path:
        raise ConfigError("data.codec=wan needs data.codec_path: a local diffusers AutoencoderKLWan "
                          "folder (config.json + weights)")
    return build_codec("wan", path=cfg.data.codec_path)


def make_text_encoder(cfg: Config, run_dir: str) -> TextEncoder:
    if cfg.text.encoder == "sentencepiece":
        path = tokenizer_path(cfg, run_dir)
        if not os.path.isfile(path):
            if cfg.text.path:
                raise ConfigError(f"text.path={cfg.text.path!r} does not exist; train one with "
                                  f"`python tools/train_tokenizer.py` or leave text.path empty")
            raise ConfigError(f"text.path is empty and the run folder has no tokenizer ({path}); "
                              f"set text.path to a sentencepiece model, or prepare the run's own "
                              f"with megatron_starflow.data.tokenizer.ensure_tokenizer")
        return build_text_encoder("sentencepiece", model_path=path, width=cfg.text.width,
                                  layers=cfg.text.layers, heads=cfg.text.heads,
                                  max_length=cfg.model.text_length)
    encoder = build_text_encoder("t5", path=cfg.text.path, max_length=cfg.model.text_length)
    if encoder.width != cfg.model.text_width:
        raise ConfigError(f"model.text_width={cfg.model.text_width} but the T5 encoder at "
                          f"{cfg.text.path} outputs width {encoder.width}; set model.text_width="
                          f"{encoder.width}")
    return encoder


class StarFlowSystem(nn.Module):
    """Model + text encoder + codec: videos and captions in, tokens, text embeddings, videos out.

    ``with_codec=False`` / ``with_text_encoder=False`` build the system without them (training
    and evaluating from stored latents and text embeddings, ``data.source=latent_shards``):
    ``codec`` / ``text_encoder`` are then None, and the batch helpers take the stored tensors."""

    def __init__(self, cfg: Config, run_dir: str, with_codec: bool = True,
                 with_text_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = StarFlowV(cfg.model, parallel=cfg.parallel)
        self.text_encoder = make_text_encoder(cfg, run_dir) if with_text_encoder else None
        self.codec = make_codec(cfg) if with_codec else None

    @property
    def text_trainable(self) -> bool:
        return self.text_encoder is not None and self.text_encoder.trainable

    def trainable_state_dict(self) -> dict:
        """What a checkpoint must hold: the flow (+ denoiser) and a trainable text encoder."""
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.text_trainable:
            state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        if self.text_trainable:
            self.text_encoder.load_state_dict(
                {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})

    def _missing(self, what: str) -> RuntimeError:
        return RuntimeError(f"this system was built without its {what} (data.source=latent_shards "
                            f"reads stored latents and text embeddings); build StarFlowSystem with "
                            f"the {what} to encode videos or captions")

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise self._missing("text encoder")
        emb, _ = self.text_encoder(format_captions(self.cfg, captions))
        return emb.to(self.dtype)

    def batch_text(self, batch: dict) -> torch.Tensor:
        """Text embeddings of a batch: its stored ``text`` (latent shards) or its encoded captions."""
        if "text" in batch:
            return batch["text"].to(device=self.device, dtype=self.dtype)
        return self.encode_text(batch["caption"])

    def batch_tokens(self, batch: dict, dequantize: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Model tokens of a batch: from its stored codec ``latent`` or by encoding its ``video``."""
        if "latent" in batch:
            return self.latent_to_tokens(batch["latent"])
        return self.video_to_tokens(batch["video"], dequantize=dequantize, generator=generator)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (bf16 under ``train.dtype=bfloat16``); a pipeline stage holds
        only some blocks, so read any parameter of the flow."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def token_dtype(self) -> torch.dtype:
        """Tokens, z and log-dets are at least fp32 (only the transformers compute in bf16)."""
        return torch.promote_types(self.dtype, torch.float32)

    def video_to_tokens(self, video: torch.Tensor, dequantize: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` (any device) -> model tokens ``[B, T', h, w, C']`` on the
        system's device."""
        if self.codec is None:
            raise self._missing("codec")
        video = video.to(self.device)
        kwargs = {"generator": generator, "dequantize": dequantize} if self.cfg.data.codec == "s2d" else {}
        latent = self._scale_later_frames(self.codec.encode(video, **kwargs), self.cfg.data.later_frames_scale)
        return patchify(latent.to(self.token_dtype), self.cfg.model.patch_size)

    def latent_to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """A stored, normalised codec latent ``[B, T', H', W', C]`` (what ``codec.encode`` returns)
        -> model tokens on the system's device: the same later-frame scaling and patchify as
        :meth:`video_to_tokens`, without the codec."""
        latent = self._scale_later_frames(latent.to(device=self.device, dtype=torch.float32),
                                          self.cfg.data.later_frames_scale)
        return patchify(latent.to(self.token_dtype), self.cfg.model.patch_size)

    @staticmethod
    def _scale_later_frames(latent: torch.Tensor, factor: float) -> torch.Tensor:
        """Multiply latent frames 1.. by ``factor`` (data.later_frames_scale; 1.0 = unchanged)."""
        if factor == 1.0 or latent.shape[1] < 2:
            return latent
        scale = torch.full((latent.shape[1],), factor, dtype=latent.dtype, device=latent.device)
        scale[0] = 1.0
        return latent * scale.view(1, -1, *([1] * (latent.dim() - 2)))

    def tokens_to_video_float(self, tokens: torch.Tensor) -> torch.Tensor:
        """Model tokens -> float video ``[B, T, H, W, 3]`` in [-1, 1]."""
        if self.codec is None:
            raise self._missing("codec")
        latent = unpatchify(tokens, self.cfg.model.patch_size).float()
        latent = self._scale_later_frames(latent, 1.0 / self.cfg.data.later_frames_scale)
        return self.codec.decode(latent).clamp(-1, 1)

    def tokens_to_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """Model tokens -> uint8 video ``[B, T, H, W, 3]``."""
        return self.codec.to_uint8(self.tokens_to_video_float(tokens))


def param_groups(system: StarFlowSystem) -> tuple[list, list]:
    """(flow + text encoder params, denoiser params): clipped and skip-tested separately, as the
    reference gives the denoiser its own optimizer."""
    den = system.model.learnable_self_denoiser
    den_ids = {id(p) for p in den.parameters()} if den is not None else set()
    flow = [p for p in system.parameters() if p.requires_grad and id(p) not in den_ids]
    return flow, [p for p in den.parameters()] if den is not None else []
