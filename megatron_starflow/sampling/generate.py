"""Text-, image- and video-to-video generation: invert the flow, denoise, decode.

T2V samples every frame from noise. I2V / V2V encode the given frames exactly (METHOD.md section
6): the frames are turned into tokens, given the training noise sigma, and pushed through the
shallow blocks; the deep block's KV cache is filled with them in one pass, and sampling continues
from the next frame. The returned video repeats the given frames unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions, SolverStats
from megatron_starflow.training.builders import StarFlowSystem
from megatron_starflow.training.losses import add_noise


@dataclass
class Generation:
    video: torch.Tensor  # uint8 [B, T, H, W, 3]
    tokens: torch.Tensor  # noisy-space tokens before denoising [B, T', h, w, C']
    deep: SolverStats
    shallow: SolverStats
    seconds: dict = field(default_factory=dict)


def _token_grid(system: StarFlowSystem, frames: int) -> tuple[int, int, int]:
    d, p = system.cfg.data, system.cfg.model.patch_size
    t, h, w, _ = system.codec.latent_shape(frames, d.height, d.width)
    return t, h // p, w // p


def check_prompts(captions: list[str]) -> None:
    if not captions:
        raise ValueError("no prompt given: pass --prompt TEXT or --prompts FILE with one per line")
    for i, c in enumerate(captions):
        if not c.strip():
            raise ValueError(f"prompt {i} is empty; give a caption (guidance already uses the "
                             f"empty caption as its unconditional branch)")


@torch.no_grad()
def generate(system: StarFlowSystem, captions: list[str], frames: int | None = None, seed: int = 0,
             opts: SolverOptions | None = None, prefix_video: torch.Tensor | None = None,
             denoise: bool = True, temperature: float = 1.0) -> Generation:
    """``frames`` in pixel frames (default: the training length); ``prefix_video`` uint8
    ``[B or 1, F, H, W, 3]`` for I2V (F = 1) and V2V."""
    check_prompts(captions)
    opts = opts or SolverOptions()
    model, cfg = system.model, system.cfg
    system.eval()
    frames = frames or cfg.data.frames
    t, h, w = _token_grid(system, frames)
    b, c, hw = len(captions), cfg.model.token_channels, h * w
    gen = torch.Generator().manual_seed(seed)
    z = temperature * torch.randn((b, t, h, w, c), generator=gen, dtype=torch.float64).to(system.dtype)
    times = {}
    t0 = time.time()
    text = system.encode_text(captions)
    uncond = system.encode_text([""] * b) if opts.guidance else None

    prefix_tokens, prefix_u, given = None, None, 0
    if prefix_video is not None:
        prefix_tokens = prepare_prefix(system, prefix_video, b, frames, gen)
        given = prefix_tokens.shape[1]
        prefix_u = prefix_tokens
        for i in range(len(model.blocks) - 1):
            prefix_u, _ = model.shallow_forward(i, prefix_u)
        prefix_u = prefix_u.reshape(b, given * hw, c)
    times["encode"] = time.time() - t0

    deep = BlockInverter(model.deep_block, model.deep_layout(t, h, w), opts, text, uncond)
    u = deep.run(z.reshape(b, t * hw, c), prefix_u).reshape(b, t, h, w, c)

    # Shallow blocks: every new frame is an independent one-frame sequence, all in one batch.
    shallow_opts = SolverOptions(opts.solver, opts.first_block, opts.first_block, opts.tau,
                                 opts.max_iters, video_aware=False)
    shallow_stats = SolverStats()
    x = u[:, given:].reshape(b * (t - given), h * w, c)
    for i in reversed(range(len(model.blocks) - 1)):
        if model.reverses(i):
            x = x.flip(1)
        inv = BlockInverter(model.blocks[i], model.shallow_layout(h, w), shallow_opts)
        x = inv.run(x)
        if model.reverses(i):
            x = x.flip(1)
        shallow_stats.merge(inv.stats)
    x = x.reshape(b, t - given, h, w, c)
    if given:
        x = torch.cat([prefix_tokens, x], dim=1)
    times["invert"] = time.time() - t0 - times["encode"]
    tokens = x
    if denoise and model.learnable_self_denoiser is not None:
        x = model.denoise(x, text)
    video = system.tokens_to_video(x)
    if prefix_video is not None:
        video[:, :prefix_video.shape[1]] = prefix_video.expand(b, -1, -1, -1, -1)
    times["total"] = time.time() - t0
    return Generation(video, tokens, deep.stats, shallow_stats, times)


def prepare_prefix(system: StarFlowSystem, video: torch.Tensor, batch: int, frames: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Given frames -> noisy tokens (training sigma), checked against the model's frame size."""
    d = system.cfg.data
    if video.dim() == 4:
        video = video[None]
    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"conditioning video must be uint8 [B, F, H, W, 3], got {tuple(video.shape)} "
                         f"{video.dtype}")
    if tuple(video.shape[2:4]) != (d.height, d.width):
        raise ValueError(f"conditioning frames are {video.shape[3]}x{video.shape[2]} (WxH) but the "
                         f"model makes {d.width}x{d.height}; resize the image/video to that size")
    if video.shape[1] >= frames:
        raise ValueError(f"conditioning video has {video.shape[1]} frames; it must be shorter than "
                         f"the {frames} frames to generate (use --frames to ask for more)")
    try:
        system.codec.latent_shape(video.shape[1], d.height, d.width)
    except ValueError as exc:
        raise ValueError(f"conditioning video frame count: {exc}") from None
    if video.shape[0] not in (1, batch):
        raise ValueError(f"conditioning video batch {video.shape[0]} does not match {batch} prompts")
    tokens = system.video_to_tokens(video.expand(batch, -1, -1, -1, -1), dequantize=False)
    return add_noise(tokens, system.cfg.model.noise_std, gen)
