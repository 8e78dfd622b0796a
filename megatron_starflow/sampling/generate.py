"""Text-, image- and video-to-video generation: invert the flow, denoise, decode.

T2V samples every frame from noise. I2V / V2V encode the given frames exactly (METHOD.md section
6): the frames are turned into tokens, given the training noise sigma, and pushed through the
shallow blocks; the deep block's KV cache is filled with them in one pass, and sampling continues
from the next frame. The returned video repeats the given frames unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from megatron_starflow.models.noise import add_noise
from megatron_starflow.models.system import StarFlowSystem
from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions, SolverStats


@dataclass
class Generation:
    video: torch.Tensor  # uint8 [B, T, H, W, 3] on the CPU (what writers and analysers read)
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


@dataclass
class SamplingInputs:
    """What every sampler needs before inverting: noise, text, and the encoded given frames."""

    z: torch.Tensor  # [B, T', h, w, C']
    text: torch.Tensor
    uncond: torch.Tensor | None  # unconditional text (guidance only)
    grid: tuple[int, int, int]  # (T', h, w)
    train_t: int  # latent frames of the training length
    prefix_video: torch.Tensor | None  # uint8 [B or 1, F, H, W, 3]
    prefix_tokens: torch.Tensor | None  # noisy tokens of the given frames
    prefix_u: torch.Tensor | None  # their deep-block input [B, F*h*w, C'] (when asked for)
    given: int  # latent frames given
    t0: float  # start time


def prepare_inputs(system: StarFlowSystem, captions: list[str], frames: int | None, seed: int,
                   opts: SolverOptions, prefix_video: torch.Tensor | None, temperature: float,
                   with_prefix_u: bool = True) -> SamplingInputs:
    """Check the prompts, draw z (first from the seed's generator, then the prefix noise), encode
    the text (and the empty caption for guidance) and push given frames through the shallow
    blocks. The draw order is part of the sampler's contract: same seed, same video."""
    t0 = time.time()
    check_prompts(captions)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (1: the model's noise), "
                         f"got {temperature}")
    if prefix_video is not None and prefix_video.dim() == 4:  # one clip [F, H, W, 3]
        prefix_video = prefix_video[None]
    model, cfg = system.model, system.cfg
    system.eval()
    frames = frames or cfg.data.frames
    t, h, w = _token_grid(system, frames)
    b, c, hw = len(captions), cfg.model.token_channels, h * w
    # z is drawn on the CPU in float64 and then placed: a seed gives the same video on any device.
    gen = torch.Generator().manual_seed(seed)
    z = temperature * torch.randn((b, t, h, w, c), generator=gen, dtype=torch.float64)
    z = z.to(device=system.device, dtype=system.token_dtype)
    text = system.encode_text(captions)
    uncond = system.encode_text([""] * b) if opts.guidance else None
    prefix_tokens, prefix_u, given = None, None, 0
    if prefix_video is not None:
        prefix_tokens = prepare_prefix(system, prefix_video, b, frames, gen)
        given = prefix_tokens.shape[1]
        if with_prefix_u:
            prefix_u = prefix_tokens
            for i in range(len(model.blocks) - 1):
                prefix_u, _ = model.shallow_forward(i, prefix_u)
            prefix_u = prefix_u.reshape(b, given * hw, c)
    train_t = _token_grid(system, cfg.data.frames)[0]
    return SamplingInputs(z, text, uncond, (t, h, w), train_t, prefix_video, prefix_tokens,
                          prefix_u, given, t0)


def finish(system: StarFlowSystem, inputs: SamplingInputs, x: torch.Tensor, denoise: bool) -> tuple:
    """Generated tokens of the new frames -> (all tokens, uint8 video): prepend the given frames,
    denoise (Tweedie step with the FSM denoiser), decode, and repeat the given frames unchanged."""
    model = system.model
    if inputs.given:
        x = torch.cat([inputs.prefix_tokens, x], dim=1)
    tokens = x
    if denoise and model.learnable_self_denoiser is not None:
        x = windowed_denoise(model, x, inputs.text, inputs.train_t)
    video = system.tokens_to_video(x).cpu()
    if inputs.prefix_video is not None:
        given = inputs.prefix_video
        video[:, :given.shape[1]] = given.expand(video.shape[0], -1, -1, -1, -1)
    return tokens, video


@torch.no_grad()
def generate(system: StarFlowSystem, captions: list[str], frames: int | None = None, seed: int = 0,
             opts: SolverOptions | None = None, prefix_video: torch.Tensor | None = None,
             denoise: bool = True, temperature: float = 1.0, context_frames: int = 0) -> Generation:
    """``frames`` in pixel frames (default: the training length; more makes a long video with
    the sliding window, re-encoding ``context_frames`` latent frames per segment);
    ``prefix_video`` uint8 ``[B or 1, F, H, W, 3]`` for I2V (F = 1) and V2V."""
    opts = opts or SolverOptions()
    model = system.model
    inp = prepare_inputs(system, captions, frames, seed, opts, prefix_video, temperature)
    times = {"encode": time.time() - inp.t0}
    (t, h, w), given = inp.grid, inp.given
    b, c, hw = inp.z.shape[0], inp.z.shape[-1], h * w
    u, deep_stats = deep_inverse(model, inp.z.reshape(b, t * hw, c), inp.grid, opts, inp.text,
                                 inp.uncond, inp.prefix_u, inp.train_t, context_frames)
    x, shallow_stats = shallow_inverse(model, u[:, given * hw:].reshape(b * (t - given), hw, c), h, w, opts)
    times["invert"] = time.time() - inp.t0 - times["encode"]
    tokens, video = finish(system, inp, x.reshape(b, t - given, h, w, c), denoise)
    times["total"] = time.time() - inp.t0
    return Generation(video, tokens, deep_stats, shallow_stats, times)


def deep_inverse(model, z, grid, opts, text, uncond, prefix_u, train_t, context_frames=0):
    """Deep block: noise -> u for all frames. Up to the training length in one pass; beyond it
    (long videos), segment by segment: a fresh cache is re-encoded from the text and the last
    ``context_frames`` frames (positions restart at slot 0, as in the reference), then the next
    ``train_t - context_frames`` frames are sampled."""
    t, h, w = grid
    hw = h * w
    if t <= train_t:
        inv = BlockInverter(model.deep_block, model.deep_layout(t, h, w), opts, text, uncond,
                            name="deep block")
        return inv.run(z, prefix_u), inv.stats
    context = context_frames or max(1, train_t - max(1, train_t // 4))
    if not 0 < context < train_t:
        raise ValueError(f"context frames {context} must be between 1 and the training length "
                         f"{train_t - 1} latent frames")
    layout = model.deep_layout(train_t, h, w)
    stats = SolverStats()
    u = torch.zeros_like(z)
    done, prefix = 0, prefix_u
    if prefix is not None:  # given frames (I2V / V2V) open the first segment
        done = prefix.shape[1] // hw
        u[:, :prefix.shape[1]] = prefix
    while done < t:
        given = 0 if prefix is None else prefix.shape[1] // hw
        span = min(train_t, given + (t - done))
        inv = BlockInverter(model.deep_block, layout, opts, text, uncond,
                            name=f"deep block (long-video window from latent frame {done})")
        seg = inv.run(z[:, (done - given) * hw:(done - given + span) * hw], prefix)
        new = seg[:, given * hw:]
        u[:, done * hw:done * hw + new.shape[1]] = new
        done += new.shape[1] // hw
        stats.merge(inv.stats)
        keep = min(context, done)
        prefix = u[:, (done - keep) * hw:done * hw]
    return u, stats


def shallow_inverse(model, x, h, w, opts):
    """Shallow blocks, last to first: every frame is an independent one-frame sequence, and all
    frames of the batch are inverted at once."""
    # the same solver settings (tau, commit pass, ...), first-frame chunks, no video-aware guess
    shallow_opts = replace(opts, later_block=opts.first_block, video_aware=False, guidance=0.0)
    stats = SolverStats()
    for i in reversed(range(len(model.blocks) - 1)):
        if model.reverses(i):
            x = x.flip(1)
        inv = BlockInverter(model.blocks[i], model.shallow_layout(h, w), shallow_opts,
                            name=f"shallow block {i}")
        x = inv.run(x)
        if model.reverses(i):
            x = x.flip(1)
        stats.merge(inv.stats)
    return x, stats


def windowed_denoise(model, x, text, train_t):
    """Tweedie step with the FSM denoiser. Up to the training length in one pass (its mask gives
    frame n at most one frame of look-ahead, so this equals frame-by-frame streaming with one
    frame of latency); longer videos in overlapping chunks of the training length, keeping from
    each chunk the frames that had their look-ahead frame and enough look-back."""
    t = x.shape[1]
    if t <= train_t:
        return model.denoise(x, text)
    overlap = min(model.cfg.denoiser_window, train_t // 2)
    out = torch.empty_like(x)
    start, filled = 0, 0
    while filled < t:
        end = min(t, start + train_t)
        chunk = model.denoise(x[:, start:end], text)
        last = end if end == t else end - 1  # the chunk's final frame lacks its look-ahead
        out[:, filled:last] = chunk[:, filled - start:last - start]
        filled = last
        start = max(start + 1, last - overlap)
    return out


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
