#!/usr/bin/env python
"""Training throughput: tokens/s, step time, model FLOPs per step, achieved TFLOP/s and MFU.

    python benchmarks/train_throughput.py --preset tiny [--steps 5] [--peak-tflops 1.0] [section.key=value ...]
    python benchmarks/train_throughput.py --gpu-deep-7b [--frames 21] [--recompute] [--steps 5]
    python benchmarks/train_throughput.py --gpu-deep-7b --shape-override width=64,layers=2,head_dim=32,frames=2,height=4,width=4,text=8

``--preset`` runs whole training steps of the one-process loop (synthetic clips, text encoder,
flow NLL + FSM backward, AdamW) on whatever device torch uses here (CPU on the dev machine). It
also reports, per run, the deep block's forward + backward time per deep-block token evaluation
(``deep_block``) and, on the model after the timed steps, sequential vs video-aware Jacobi
sampling: the time per deep-block token evaluation of each and the Jacobi speed-up at equal
output, i.e. at the first tau whose video is within 2/255 of the sequential one (``sampling``;
``--no-sampling`` skips it).

``--gpu-deep-7b`` builds only the deep block's transformer stack at the 7 B shapes (width 4096,
24 layers, head dim 64, MLP ratio 4; sequence = 256 text + 21 x 30 x 52 latent tokens = 33016, the
deep block's causal mask) in bf16 on one CUDA GPU and times forward + backward of the stack
(megatron TransformerBlock, local spec, SDPA attention). ``--frames N`` shortens the clip (S = 256 +
N*1560). ``--spec te [--fp8 hybrid|e4m3]`` builds the same stack from Transformer Engine linears
(FP8 GEMMs under TE's autocast, entered by megatron's block; MFU stays relative to the bf16
peak). Without CUDA it stops with a message, unless ``--shape-override`` shrinks the shapes, in
which case it runs wherever it is (CPU) to check the code path.

FLOPs: ``megatron_starflow.training.flops`` (matmuls with the actual mask density; step = 3 x
forward; MFU from model FLOPs; ``hfu`` adds the recomputed forward). ``--peak-tflops``: dense peak
per device (default 989 = H100 SXM bf16 on CUDA, none on CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

H100_BF16_DENSE_TFLOPS = 989.0
DEEP_7B = dict(width=4096, layers=24, head_dim=64, mlp_ratio=4, frames=21, height=30, width_tokens=52,
               text=256)


def _timed(fn, steps: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run_preset(preset: str, steps: int, warmup: int, overrides: list[str], peak_tflops: float,
               threads: int = 0, sampling: bool = True) -> dict:
    import torch

    from megatron_starflow.config import load_config
    from megatron_starflow.data.collate import collate
    from megatron_starflow.data.synthetic import SyntheticCaptionedVideos
    from megatron_starflow.data.tokenizer import ensure_tokenizer
    from megatron_starflow.models.noise import add_noise
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.training.flops import model_flops, step_metrics
    from megatron_starflow.training.losses import flow_and_fsm_backward

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, overrides, preset=preset)
    ensure_single_process()
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        if cfg.text.encoder == "sentencepiece":
            ensure_tokenizer(cfg, run_dir)
        system = StarFlowSystem(cfg, run_dir)
    system.train()
    d = cfg.data
    data = SyntheticCaptionedVideos("train", max(d.batch_size, 8), d.frames, d.height, d.width)
    batch = collate([data[i] for i in range(d.batch_size)])
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens = system.video_to_tokens(batch["video"], dequantize=True, generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")

    def step():
        noisy = add_noise(tokens, cfg.model.noise_std, gen)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            text = system.encode_text(batch["caption"])
            flow_and_fsm_backward(system.model, noisy, text, cfg.model.fsm_weight)
        optimizer.step()

    times = _timed(step, steps, warmup, lambda: None)
    flops = model_flops(cfg, tokens.shape[0], tuple(tokens.shape[1:4]))
    dt = statistics.median(times)
    n_tokens = tokens.shape[0] * tokens[0, ..., 0].numel()
    out = {"benchmark": "train_step", "preset": preset, "overrides": overrides, "device": "cpu",
           "threads": torch.get_num_threads(), "dtype": cfg.train.dtype, "batch": tokens.shape[0],
           "grid": list(tokens.shape[1:4]), "steps": steps, "warmup": warmup,
           "step_time_s": dt, "step_times_s": times, "tokens_per_step": n_tokens,
           "tokens_per_s": n_tokens / dt, "hardware_flops_per_step": flops.hardware_flops_per_step,
           "peak_tflops": peak_tflops or None, **step_metrics(flops, dt, peak_tflops)}
    out["deep_block"] = _deep_block_timing(system, tokens, batch["caption"], cfg, steps, warmup,
                                           autocast)
    if sampling:
        out["sampling"] = _sampling_speed(system, batch["caption"][:1], cfg)
    return out


def _deep_block_timing(system, tokens, captions, cfg, steps, warmup, autocast) -> dict:
    """Forward + backward of the deep block alone on this batch's deep-block inputs (the shallow
    blocks' output and the text): seconds per deep-block token evaluation (slot, text included)."""
    import torch

    from megatron_starflow.models.noise import add_noise

    model = system.model
    b, t, h, w, c = tokens.shape
    layout = model.deep_layout(t, h, w)
    with torch.no_grad(), autocast:
        u = add_noise(tokens, cfg.model.noise_std, torch.Generator().manual_seed(1))
        for i in range(len(model.blocks) - 1):
            u, _ = model.shallow_forward(i, u)
        text = system.encode_text(captions)
    u = u.reshape(b, t * h * w, c)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with autocast:
            z, logdet = model.deep_block(u, layout, text)
            (0.5 * z.float().pow(2).mean() - logdet.float().mean() / z[0].numel()).backward()

    times = _timed(fwd_bwd, steps, warmup, lambda: None)
    dt = statistics.median(times)
    evals = b * layout.total
    model.zero_grad(set_to_none=True)
    return {"fwd_bwd_s": dt, "token_evals": evals, "seconds_per_deep_token_eval": dt / evals}


def _sampling_speed(system, captions, cfg) -> dict:
    """Sequential vs video-aware Jacobi on this (briefly trained) model: time per deep-block token
    evaluation of each, and the Jacobi speed-up at equal output (``sampling.speed``)."""
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.speed import equal_output_speedup

    system.eval()
    blocks = (SolverOptions.first_block, SolverOptions.later_block)
    result = equal_output_speedup(system, list(captions), cfg.data.frames, 0, blocks)
    system.train()
    return {"prompts": len(captions), "block_size": list(blocks), **result}


def run_gpu_deep(steps: int, warmup: int, frames: int | None, recompute: bool, peak_tflops: float,
                 shape_override: str = "", micro_batch: int = 1, spec: str = "local",
                 fp8: str = "none", fp8_recipe: str = "delayed") -> dict:
    import torch

    from megatron_starflow.models.layout import SlotLayout
    from megatron_starflow.models.transformer import TransformerStack
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.training.flops import StackFlops, causal_pairs

    cuda = torch.cuda.is_available()
    if not cuda and not shape_override:
        raise SystemExit("--gpu-deep-7b needs a CUDA GPU (it runs the 7B deep block in bf16 on one "
                         "H100); on CPU pass --shape-override with small shapes to check the code path")
    shapes = dict(DEEP_7B)
    if shape_override:
        # "width" names the model width; a second "width" (or width_tokens) the latent grid width.
        for item in filter(None, (s.strip() for s in shape_override.split(","))):
            key, value = item.split("=", 1)
            key = {"grid_width": "width_tokens", "tokens_width": "width_tokens"}.get(key, key)
            if key not in shapes:
                raise SystemExit(f"--shape-override: unknown key {key!r}; valid: {', '.join(shapes)} "
                                 f"(grid_width for the latent grid width)")
            shapes[key] = int(value)
    if frames:
        shapes["frames"] = frames
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    ensure_single_process()
    torch.manual_seed(0)
    w, layers, d = shapes["width"], shapes["layers"], shapes["head_dim"]
    layout = SlotLayout(shapes["text"], shapes["frames"], shapes["height"], shapes["width_tokens"],
                        with_time=True, pt_seq_len=32.0)
    stack = TransformerStack(w, layers, d, shapes["mlp_ratio"], recompute=recompute, spec=spec,
                             fp8=fp8, fp8_recipe=fp8_recipe).to(device, dtype)
    seq = layout.total
    mask = layout.causal_mask().to(device)
    angles = layout.angles(d, 10000.0, 0.25).to(device)
    x = torch.randn(micro_batch, seq, w, device=device, dtype=dtype, requires_grad=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = stack(x, mask, angles)
        out.float().pow(2).mean().backward()
        stack.zero_grad(set_to_none=True)
        x.grad = None

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = _timed(step, steps, warmup, sync)
    dt = statistics.median(times)
    pairs = causal_pairs(layout.text_len, layout.frames, layout.tokens_per_frame)
    sf = StackFlops("deep", w, layers, seq, micro_batch, pairs, shapes["mlp_ratio"])
    model = 3 * sf.total
    hardware = model + (sf.total if recompute else 0)
    peak = peak_tflops or (H100_BF16_DENSE_TFLOPS if cuda else 0.0)
    achieved = model / dt / 1e12
    out = {"benchmark": "gpu_deep_7b", "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": "bfloat16", "spec": spec, "fp8": fp8,
           "fp8_recipe": fp8_recipe if fp8 != "none" else None, "shapes": shapes, "seq_len": seq, "micro_batch": micro_batch,
           "recompute": recompute, "steps": steps, "warmup": warmup, "step_time_s": dt,
           "step_times_s": times, "tokens_per_s": micro_batch * seq / dt,
           "model_flops_per_step": model, "hardware_flops_per_step": hardware,
           "attention_share": sf.attention / sf.total, "tflops_per_s": achieved,
           "peak_tflops": peak or None}
    if peak:
        out["mfu"] = achieved / peak
        out["hfu"] = hardware / dt / 1e12 / peak
    if cuda:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-sampling", action="store_true",
                        help="--preset: skip the sampling figures (sequential vs video-aware Jacobi "
                             "at equal output on the model after the timed steps)")
    parser.add_argument("--gpu-deep-7b", action="store_true")
    parser.add_argument("--frames", type=int, default=0, help="--gpu-deep-7b: latent frames (default 21)")
    parser.add_argument("--recompute", action="store_true", help="--gpu-deep-7b: full per-layer recompute")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--spec", choices=["local", "te"], default="local",
                        help="--gpu-deep-7b: layer spec (te: Transformer Engine linears)")
    parser.add_argument("--fp8", choices=["none", "hybrid", "e4m3"], default="none",
                        help="--gpu-deep-7b: TE FP8 GEMMs (needs --spec te)")
    parser.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"],
                        default="delayed")
    parser.add_argument("--shape-override", default="",
                        help="--gpu-deep-7b: e.g. width=64,layers=2,head_dim=32,frames=2,height=4,grid_width=4,text=8")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (--preset)")
    args = parser.parse_args(argv)
    if args.gpu_deep_7b:
        result = run_gpu_deep(args.steps, args.warmup, args.frames or None, args.recompute,
                              args.peak_tflops, args.shape_override, args.micro_batch, args.spec,
                              args.fp8, args.fp8_recipe)
    else:
        result = run_preset(args.preset, args.steps, args.warmup, args.overrides, args.peak_tflops,
                            args.threads, sampling=not args.no_sampling)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
