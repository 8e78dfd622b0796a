"""Latent codecs: map videos to the latents the flow models (METHOD.md section 7).

Conventions shared by every codec:
  * video given to a codec: uint8 ``[B, T, H, W, 3]`` (channels last), or float in [-1, 1] of that shape;
  * latent: float ``[B, T', H', W', C]`` (channels last); the model flattens it to tokens itself;
  * ONE pixel <-> float convention project-wide: uint8 value x owns the bin
    ``[x/128 - 1, (x+1)/128 - 1)`` of width 2/256 in [-1, 1]; its centre is ``(x + 0.5)/128 - 1`` and
    ``to_uint8`` is ``floor((y + 1) * 128)``. Using bins (not ``x/127.5 - 1``) is what makes the
    lossless codec's likelihood an exact bound on the discrete pixel likelihood.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

PIXEL_LEVELS = 256
# Width of one uint8 bin in [-1, 1]-space.
BIN_WIDTH = 2.0 / PIXEL_LEVELS


def pixels_to_float(video: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> float in [-1, 1): bin centre if ``noise`` is None, else ``(x + u)/128 - 1``, u in [0, 1).

    The result is clamped to ``[lower, upper - 2**-24]`` inside the bin of x, so floating-point rounding
    of ``x + u`` (u close to 1) can never land on the next bin's edge; 2**-24 (not ``nextafter``, which
    gives a denormal next to 0 that ``y + 1`` swallows) keeps ``floor((y + 1) * 128)`` exact in float64,
    so ``to_uint8`` recovers x exactly. Use float32 or float64 here.
    """
    x = video.to(dtype)
    u = torch.full_like(x, 0.5) if noise is None else noise.to(dtype)
    scale = PIXEL_LEVELS / 2
    y = (x + u) / scale - 1.0
    lower = x / scale - 1.0            # exact: x is an integer <= 255, scale a power of two
    upper = (x + 1.0) / scale - 1.0    # exact, and excluded from the bin
    return torch.minimum(torch.maximum(y, lower), upper - 2.0 ** -24)  # both bounds exact in float32


def float_to_pixels(video: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 via the bin convention; computed in float64 so ``y + 1`` is exact."""
    y = video.detach().to(torch.float64).clamp(-1.0, 1.0)
    return torch.floor((y + 1.0) * (PIXEL_LEVELS / 2)).clamp(0, PIXEL_LEVELS - 1).to(torch.uint8)


def _check_video(video: torch.Tensor) -> None:
    if video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected a video [B, T, H, W, 3] (channels last), got shape {tuple(video.shape)}")
    if video.dtype != torch.uint8 and not video.is_floating_point():
        raise TypeError(f"video must be uint8 pixels or float in [-1, 1], got dtype {video.dtype}")


class LatentCodec(nn.Module):
    """Base class. Subclasses set ``channels``, ``lossless``, ``temporal_factor``, ``spatial_factor``."""

    channels: int
    lossless: bool
    temporal_factor: int
    spatial_factor: int

    def encode(self, video: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        raise NotImplementedError

    @staticmethod
    def to_uint8(video_float: torch.Tensor) -> torch.Tensor:
        return float_to_pixels(video_float)

    @staticmethod
    def _check_spatial(height: int, width: int, factor: int) -> Tuple[int, int]:
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % factor != 0:
                raise ValueError(f"{name}={size} is not allowed: it must be a positive multiple of the "
                                 f"spatial factor {factor} (e.g. {factor}, {2 * factor}, {3 * factor}, ...)")
        return height // factor, width // factor


class SpaceToDepthCodec(LatentCodec):
    """Lossless codec: fold ``patch x patch`` pixels and ``frames_per_token`` frames into channels.

    ``[B, T, H, W, 3] -> [B, T/k, H/p, W/p, k*p*p*3]`` with channel index
    ``((kt * p + p1) * p + p2) * 3 + rgb``: order (k, p1, p2, rgb), rgb fastest, then the column offset
    p2, then the row offset p1, then the frame offset kt. This matches the authors' (p1, p2, c) patch
    order (METHOD.md section 9), with the frame offset outermost.

    The fold is a permutation (|det| = 1), so the flow on latents is a flow on pixels.
    """

    lossless = True

    def __init__(self, patch: int = 2, frames_per_token: int = 1, dequantize: bool = True):
        super().__init__()
        if patch < 1 or frames_per_token < 1:
            raise ValueError(f"patch and frames_per_token must be >= 1, got {patch}, {frames_per_token}")
        self.patch = int(patch)
        self.frames_per_token = int(frames_per_token)
        self.dequantize = bool(dequantize)
        self.temporal_factor = self.frames_per_token
        self.spatial_factor = self.patch
        self.channels = 3 * self.patch * self.patch * self.frames_per_token

    def latent_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        k = self.frames_per_token
        if frames <= 0 or frames % k != 0:
            raise ValueError(f"frames={frames} is not allowed: it must be a positive multiple of "
                             f"frames_per_token={k} (e.g. {k}, {2 * k}, {3 * k}, ...)")
        h, w = self._check_spatial(height, width, self.patch)
        return frames // k, h, w, self.channels

    def encode(self, video: torch.Tensor, generator: Optional[torch.Generator] = None,
               dequantize: Optional[bool] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Video -> latent ``[B, T/k, H/p, W/p, C]``.

        uint8 input: ``y = (x + u)/128 - 1``. u ~ U[0, 1) (drawn from ``generator``, or taken from
        ``noise``) when dequantisation is on (``dequantize`` overrides the codec default per call);
        otherwise u = 0.5, the deterministic bin centre (use this for evaluation / conditioning
        frames). Float input is taken as already continuous in [-1, 1] and only folded.
        """
        _check_video(video)
        if video.dtype == torch.uint8:
            use_noise = self.dequantize if dequantize is None else dequantize
            # An explicit ``noise`` tensor always wins (caller-controlled dequantisation).
            if noise is None and use_noise:
                gen_device = video.device if generator is None else generator.device
                noise = torch.rand(video.shape, generator=generator, device=gen_device).to(video.device)
            y = pixels_to_float(video, noise)
        else:
            y = video
        return self._fold(y)

    def _fold(self, y: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = y.shape
        k, p = self.frames_per_token, self.patch
        tt, hh, ww, _ = self.latent_shape(t, h, w)
        y = y.reshape(b, tt, k, hh, p, ww, p, c)
        # -> [b, tt, hh, ww, k, p1, p2, c]: the channel group is (k, p1, p2, rgb) with rgb fastest.
        y = y.permute(0, 1, 3, 5, 2, 4, 6, 7)
        return y.reshape(b, tt, hh, ww, self.channels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Exact inverse of the fold; returns float in [-1, 1] (``to_uint8`` recovers the pixels)."""
        b, tt, hh, ww, ch = latent.shape
        if ch != self.channels:
            raise ValueError(f"latent has {ch} channels, this codec expects {self.channels}")
        k, p = self.frames_per_token, self.patch
        y = latent.reshape(b, tt, hh, ww, k, p, p, 3)
        y = y.permute(0, 1, 4, 2, 5, 3, 6, 7)
        return y.reshape(b, tt * k, hh * p, ww * p, 3)

    @staticmethod
    def bits_per_dim_offset() -> float:
        """Dequantisation correction, in bits per dimension: log2(256 / 2) = 7.

        A uint8 value x owns a bin of width 2/256 in y-space, so for a density p on y
        ``P(x) = integral_bin p(y) dy`` and by Jensen (u uniform on the bin)
        ``-log2 P(x) <= E_u[-log2 p(y)] - log2(2/256) = E_u[-log2 p(y)] + 7`` per dimension.
        So: discrete pixel NLL (bits/dim) <= continuous NLL of y (bits/dim) + ``bits_per_dim_offset()``.
        """
        return math.log2(PIXEL_LEVELS / 2)

    @staticmethod
    def log_det_per_dim() -> float:
        """log|d y / d v| per dimension (nats) of the affine map v = x + u in [0, 256) -> y in [-1, 1).

        Equal to -ln(128); ``-bits_per_dim_offset() * ln 2``. The fold itself contributes 0.
        """
        return -math.log(PIXEL_LEVELS / 2)


class WanVAECodec(LatentCodec):
    """Frozen diffusers ``AutoencoderKLWan`` (Wan2.1 16-ch or Wan2.2 48-ch with ``patch_size``).

    encode: video -> mean of the posterior (deterministic) -> per-channel ``(z - mean) / std`` with the
    config's ``latents_mean`` / ``latents_std`` (as the Wan pipelines do) -> channels last.
    decode undoes the normalisation and returns float video in [-1, 1], channels last.
    Frame count: diffusers encodes frame 0 alone then chunks of 4 frames, so T must be 1 mod 4 and
    ``T' = 1 + (T - 1) / temporal_factor``.
    """

    lossless = False
    FRAME_CHUNK = 4  # hard-coded chunk length of diffusers' Wan encoder loop

    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        path = self._resolve(path)
        from diffusers import AutoencoderKLWan  # lazy: s2d users need no diffusers import

        vae = AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        vae.requires_grad_(False)
        self.vae = vae.eval()
        self.dtype = dtype
        cfg = vae.config
        self.channels = int(cfg.z_dim)

        # Scale factors from the architecture itself (what the tensors really do); the config's
        # scale_factor_* fields are only cross-checked, as old configs may lack or mis-state them.
        n_down = len(cfg.dim_mult) - 1
        enc_t = 2 ** sum(bool(f) for f in list(cfg.temperal_downsample)[:n_down])
        dec_t = 2 ** sum(bool(f) for f in list(cfg.temperal_downsample)[::-1][:n_down])
        if enc_t != dec_t:
            raise ValueError(f"Wan VAE at {path}: temperal_downsample={cfg.temperal_downsample} gives "
                             f"encoder temporal factor {enc_t} but decoder {dec_t}; need one flag per "
                             f"downsample (len(dim_mult) - 1 = {n_down}) so they agree")
        if self.FRAME_CHUNK % enc_t != 0:
            raise ValueError(f"Wan VAE at {path}: temporal factor {enc_t} must divide the 4-frame chunk")
        self.temporal_factor = enc_t
        self.spatial_factor = (2 ** n_down) * int(cfg.patch_size or 1)
        for name, got, want in (("scale_factor_temporal", getattr(cfg, "scale_factor_temporal", None),
                                 self.temporal_factor),
                                ("scale_factor_spatial", getattr(cfg, "scale_factor_spatial", None),
                                 self.spatial_factor)):
            if got is not None and int(got) != want:
                warnings.warn(f"Wan VAE config {name}={got} disagrees with the architecture ({want}); "
                              f"using {want}")

        mean = cfg.latents_mean if cfg.latents_mean is not None else [0.0] * self.channels
        std = cfg.latents_std if cfg.latents_std is not None else [1.0] * self.channels
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"Wan VAE at {path}: latents_mean/latents_std must have z_dim={self.channels} "
                             f"entries, got {len(mean)}/{len(std)}")
        # Buffers so .to(device) moves them; broadcast over channels-last latents.
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @staticmethod
    def _resolve(path: str) -> str:
        what = ("a diffusers AutoencoderKLWan folder containing config.json and "
                "diffusion_pytorch_model.safetensors (e.g. the 'vae' subfolder of a Wan2.x Diffusers checkpoint)")
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(f"Wan VAE directory not found: {path!r}; expected {what}")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        # Accept the root of a full pipeline checkpoint too.
        sub = os.path.join(path, "vae")
        if os.path.isfile(os.path.join(sub, "config.json")):
            return sub
        raise FileNotFoundError(f"no config.json in Wan VAE directory {path!r} (nor in {sub!r}); expected {what}")

    def train(self, mode: bool = True):
        # The VAE is frozen: keep it in eval mode whatever the parent module does.
        super().train(mode)
        self.vae.eval()
        return self

    def latent_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        if frames <= 0 or (frames - 1) % self.FRAME_CHUNK != 0:
            raise ValueError(f"frames={frames} is not allowed for the Wan VAE: it must be 1 mod 4 "
                             f"(1, 5, 9, 13, ..., 4k+1)")
        h, w = self._check_spatial(height, width, self.spatial_factor)
        return 1 + (frames - 1) // self.temporal_factor, h, w, self.channels

    @torch.no_grad()
    def encode(self, video: torch.Tensor, **unused) -> torch.Tensor:
        """Video (uint8 or float [-1, 1]) ``[B, T, H, W, 3]`` -> normalised latent ``[B, T', H', W', C]`` (float32)."""
        _check_video(video)
        b, t, h, w, _ = video.shape
        self.latent_shape(t, h, w)  # clear error before diffusers fails obscurely
        device = self.latents_mean.device
        y = pixels_to_float(video) if video.dtype == torch.uint8 else video
        x = y.to(device=device, dtype=self.dtype).permute(0, 4, 1, 2, 3)  # -> [B, 3, T, H, W]
        z = self.vae.encode(x).latent_dist.mean.float().permute(0, 2, 3, 4, 1)
        return (z - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``[B, T', H', W', C]`` -> float video in [-1, 1] ``[B, T, H, W, 3]`` (float32)."""
        if latent.dim() != 5 or latent.shape[-1] != self.channels:
            raise ValueError(f"expected latent [B, T', H', W', {self.channels}], got {tuple(latent.shape)}")
        z = latent.to(self.latents_mean.device).float() * self.latents_std + self.latents_mean
        z = z.permute(0, 4, 1, 2, 3).to(self.dtype)
        out = self.vae.decode(z).sample
        return out.float().clamp(-1.0, 1.0).permute(0, 2, 3, 4, 1)


def build_codec(kind: str, **kwargs) -> LatentCodec:
    """Factory: ``"s2d"`` -> SpaceToDepthCodec(**kwargs); ``"wan"`` -> WanVAECodec(**kwargs)."""
    kinds = {"s2d": SpaceToDepthCodec, "wan": WanVAECodec}
    if kind not in kinds:
        raise ValueError(f"unknown codec kind {kind!r}; allowed: {sorted(kinds)}")
    return kinds[kind](**kwargs)
