#!/usr/bin/env python
"""Ours vs the authors' implementation (apple/ml-starflow) on the same weights, side by side.

    python benchmarks/compare_ml_starflow.py --theirs /path/to/ml-starflow [--models tiny,25m]
        [--rows train,denoiser,sequential,jacobi,jacobi_exact,jacobi_cfg] [--repeats 5]
        [--threads 1] [--profile] [--out result.json]

``--theirs`` is a checkout of https://github.com/apple/ml-starflow (its ``transformer_flow.py``
and ``misc/`` are imported from that folder at run time; nothing of theirs is in this
repository). Both models are built in one process: ours (``StarFlowV``, float32), randomised
with a fixed seed, and theirs (``transformer_flow.Model`` with the arguments our exporter writes
for this config), loaded with our weights through the exporter's name map
(``convert.ml_starflow_export.their_state_dict``). Every row first checks that both compute the
same thing (max abs difference, printed), then times the two interleaved (ours, theirs, ours,
...; ``--repeats`` pairs, medians, ``--threads`` torch threads), so that load on a shared machine
hits both alike. Rows:

* ``train``: one training step's forward + backward of the flow NLL and of the FSM denoiser loss on
  its score target (ours: ``training.losses.flow_and_fsm_backward``; theirs: the two forward /
  backward calls of their train.py), on the same noisy tokens and text embeddings (no optimizer,
  no text encoder). Checked: z, log-dets, and the deep block's proj_in weight gradient.
* ``denoiser``: the FSM denoiser forward (no grad). Checked: their D = -our s (the exporter's head
  sign for a caption without the noise level).
* ``sequential``: the whole inverse (deep block with its text prefix, then the shallow blocks),
  one token at a time with a KV cache (ours: ``sampling.generate.deep_inverse`` +
  ``shallow_inverse``; theirs: ``Model.reverse(jacobi=False)``).
* ``jacobi``: video-aware block Jacobi, chunks of ``--block`` tokens in the first frame and 4x
  after it (their rule), tau = ``--tau`` (their ``jacobi_th``), at most as many iterations as
  tokens in a chunk (their ``jacobi_max_iter`` = 4 x block). Ours runs without its commit pass
  after a tau stop (their rule; ``--commit-pass`` for ours with it). The row reports both sides'
  deep and shallow passes and token evaluations, the ratio per token evaluation, and each side's
  max difference to its own sequential inverse.
* ``jacobi_exact``: the same with tau = 0 (both exact; theirs runs every chunk to its iteration
  cap, ours stops a chunk when an iteration changes nothing).
* ``jacobi_cfg``: ``jacobi`` with classifier-free guidance w = ``--cfg`` (unconditional text: a
  second random embedding).

``--profile`` adds per row one profiled call of each side: milliseconds in GEMMs (and their
GFLOP), in attention kernels and in everything else, and ``kernel_floor_ratio``: our GEMM +
attention time over their whole time, the ratio we would reach if everything else of ours cost
nothing (where both do the same GEMM work, the lowest ratio the same math allows).

Their block Jacobi calls ``torch.distributed.all_reduce`` once per iteration (a multi-GPU stop
vote); here it runs on a one-process gloo group. ``ratio`` = ours / theirs median seconds.
Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

# Model shapes: 8 latent frames of 8 x 8 tokens of 12 channels, 16 text tokens of width 64, four
# flow blocks (their L2R block order needs an even count), their 8-layer denoiser.
MODELS = {
    "tiny": dict(shallow_width=64, shallow_layers=2, deep_width=128, deep_layers=4, head_dim=32,
                 batch_train=8, batch_sample=2),
    "25m": dict(shallow_width=256, shallow_layers=2, deep_width=384, deep_layers=8, head_dim=64,
                batch_train=2, batch_sample=1),
}
FRAMES, HEIGHT, WIDTH, CHANNELS, TEXT_LEN, TEXT_WIDTH = 8, 8, 8, 12, 16, 64
ROWS = ("train", "denoiser", "sequential", "jacobi", "jacobi_exact", "jacobi_cfg")


def build_config(name: str):
    from megatron_starflow.config import from_preset

    shape = MODELS[name]
    cfg = from_preset("tiny")
    m = cfg.model
    m.latent_channels, m.patch_size, m.num_blocks = CHANNELS, 1, 4
    m.shallow_width, m.shallow_layers = shape["shallow_width"], shape["shallow_layers"]
    m.deep_width, m.deep_layers, m.head_dim = shape["deep_width"], shape["deep_layers"], shape["head_dim"]
    m.rope_time_fraction = 16 / shape["head_dim"]  # their RoPE: 16 time dims
    m.text_width, m.text_length = TEXT_WIDTH, TEXT_LEN
    m.denoiser_layers, m.denoiser_width, m.denoiser_lookahead = 8, 0, "every_layer"
    m.denoiser_window, m.pt_seq_len, m.noise_std, m.attn_window = 10, 8.0, 0.1, 0
    cfg.data.frames, cfg.data.height, cfg.data.width = FRAMES, HEIGHT, WIDTH
    return cfg


def randomize(model, seed: int = 0, head: float = 0.5) -> None:
    """Every parameter random at a scale that keeps activations O(1); flow heads at ``head`` x
    the fan-in scale (a smooth flow whose Jacobi settles in a few iterations, as a trained one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "layernorm" in name:
                value = (1 if name.endswith("weight") else 0) + 0.1 * noise
            elif p.dim() == 2:
                value = noise * p.shape[1] ** -0.5 * (head if ".proj_out." in name else 1.0)
            elif name.endswith("sos_embed"):
                value = noise
            else:
                value = 0.05 * noise
            p.copy_(value.to(p.dtype))


def their_model(theirs: str, cfg, our_state: dict):
    """Their transformer_flow.Model with the arguments our exporter writes, holding our weights."""
    import torch

    from megatron_starflow.convert.ml_starflow_export import their_state_dict

    if theirs not in sys.path:
        sys.path.insert(0, theirs)
    tf = importlib.import_module("transformer_flow")
    m = cfg.model
    layers = [m.shallow_layers] * (m.num_blocks - 1) + [m.deep_layers]
    model = tf.Model(
        in_channels=m.latent_channels, img_size=HEIGHT, patch_size=1, channels=m.shallow_width,
        top_block_channels=m.deep_width, num_blocks=m.num_blocks, layers_per_block=layers,
        head_dim=m.head_dim, rope=1, pt_seq_len=int(m.pt_seq_len), sos=1, txt_size=m.text_length,
        txt_dim=m.text_width, cond_top_only=1, use_softplus=1, use_final_norm=1,
        soft_clip=m.soft_clip, seq_order="L2R", learnable_self_denoiser=1, conditional_denoiser=1,
        temporal_causal=2, shallow_block_local=1, denoiser_window=m.denoiser_window)
    args = [("learnable_self_denoiser", 1), ("noise_std", m.noise_std), ("cond_noise_level", 0)]
    state, _ = their_state_dict(cfg, our_state, args, "fp32")
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    if [k for k in missing if k not in buffers] or unexpected:
        raise RuntimeError(f"their model did not take our weights: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.float(), tf


GEMM_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}
ONEDNN_LINEAR = "mkldnn::_linear_pointwise"  # x [..., K] @ weight [N, K].T (models/cpu_linear.py)


def kernel_split(fn) -> dict:
    """One profiled call of ``fn``: self CPU milliseconds in GEMMs (with their GFLOP, from the
    operand shapes), in attention kernels, and in everything else (the profiler's own per-op cost
    lands there too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    gemm = attention = total = flop = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3
        total += ms
        if event.key in GEMM_OPS:
            gemm += ms
            a, b = (event.input_shapes[i] for i in GEMM_OPS[event.key])
            flop += 2.0 * event.count * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]
        elif event.key == ONEDNN_LINEAR:
            gemm += ms
            x, w = event.input_shapes[:2]
            flop += 2.0 * event.count * math.prod(x) * w[0]
        elif "scaled_dot_product" in event.key or "flash_attention" in event.key:
            attention += ms
    return {"gemm_ms": gemm, "gemm_gflop": flop / 1e9, "attention_ms": attention,
            "other_ms": total - gemm - attention, "total_ms": total}


def kernel_floor(ours: dict, theirs: dict) -> float:
    """Our time / theirs if everything of ours outside GEMMs and attention cost nothing: the
    lowest ratio our GEMM and attention work allows."""
    return (ours["gemm_ms"] + ours["attention_ms"]) / theirs["total_ms"]


def interleaved(ours, theirs, repeats: int, profile: bool = False) -> dict:
    """Alternate the two (order swapped every pair) -> medians of wall-clock and of this thread's
    CPU time (with one torch thread the computation runs on this thread; CPU time does not count
    the time other processes of a shared machine hold the core), their ratios, and the median of
    the per-pair ratios."""
    times = {"ours": [], "theirs": []}
    cpu = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = (("ours", ours), ("theirs", theirs)) if r % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for name, fn in order:
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    kernels = {}
    if profile:
        split = {"ours": kernel_split(ours), "theirs": kernel_split(theirs)}
        kernels = {"kernels": split, "kernel_floor_ratio": kernel_floor(split["ours"], split["theirs"])}
    return {**kernels, "ours_s": med["ours"], "theirs_s": med["theirs"], "ratio": med["ours"] / med["theirs"],
            "ours_cpu_s": cmed["ours"], "theirs_cpu_s": cmed["theirs"],
            "ratio_cpu": cmed["ours"] / cmed["theirs"],
            "ratio_pairs_median": statistics.median(a / b for a, b in zip(times["ours"], times["theirs"])),
            "ours_times_s": times["ours"], "theirs_times_s": times["theirs"]}


@contextlib.contextmanager
def count_passes(their_model):
    """Count their flow-block passes over video tokens (a hook on each block's first layer)."""
    counts = {"deep_passes": 0, "deep_tokens": 0, "shallow_passes": 0, "shallow_tokens": 0}
    handles = []
    for i, block in enumerate(their_model.blocks):
        kind = "deep" if i == len(their_model.blocks) - 1 else "shallow"

        def hook(module, args, kwargs, kind=kind):
            x = args[0] if args else kwargs.get("x")
            if x is not None:
                counts[f"{kind}_passes"] += 1
                counts[f"{kind}_tokens"] += x.shape[1]

        handles.append(block.attn_blocks[0].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def run_model(name: str, theirs: str, rows, repeats: int, block: int, tau: float, cfg_w: float,
              head: float, commit_pass: bool = False, profile: bool = False) -> dict:
    import torch

    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.sampling.generate import deep_inverse, shallow_inverse
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.training.losses import flow_and_fsm_backward

    cfg = build_config(name)
    m = cfg.model
    torch.manual_seed(0)
    ours = StarFlowV(m).float()
    randomize(ours, 0, head)
    theirs_model, tf = their_model(theirs, cfg, ours.state_dict())
    shape = MODELS[name]
    t, h, w, c = FRAMES, HEIGHT, WIDTH, m.token_channels
    g = torch.Generator().manual_seed(1)
    out = {"model": name, "parameters": sum(p.numel() for p in ours.parameters()),
           "config": {k: getattr(m, k) for k in ("num_blocks", "shallow_width", "shallow_layers",
                                                 "deep_width", "deep_layers", "head_dim",
                                                 "denoiser_layers", "text_length", "text_width")},
           "grid": [t, h, w, c], "rows": {}}

    def chw(x):  # ours [B, T, H, W, C] -> theirs [B, T, C, H, W]
        return x.permute(0, 1, 4, 2, 3).contiguous()

    def hwc(x):
        return x.permute(0, 1, 3, 4, 2)

    if "train" in rows:
        b = shape["batch_train"]
        noisy = torch.randn(b, t, h, w, c, generator=g)
        text = torch.randn(b, m.text_length, m.text_width, generator=g)
        ours.train(), theirs_model.train()
        ours.zero_grad(), theirs_model.zero_grad()
        # Same computation: flow outputs and a flow gradient
        x_t = chw(noisy).requires_grad_(True)
        z_t, _, _, logdets = theirs_model(x_t, text)
        loss_t = theirs_model.get_loss(z_t, logdets)["loss"]
        loss_t.backward()
        flow = ours(noisy.clone().requires_grad_(True), text)
        flow.nll_per_dim().mean().backward()
        deep = m.num_blocks - 1
        g_ours = ours.deep_block.proj_in.weight.grad
        g_theirs = theirs_model.blocks[deep].proj_in.weight.grad
        check = {"max_abs_z": (hwc(z_t) - flow.z).abs().max().item(),
                 "max_z_value": flow.z.abs().max().item(),
                 "max_abs_loss": abs(loss_t.item() - flow.nll_per_dim().mean().item()),
                 "max_rel_grad_deep_proj_in": ((g_ours - g_theirs).abs().max() / g_theirs.abs().max()).item()}

        def ours_step():
            ours.zero_grad(set_to_none=True)
            flow_and_fsm_backward(ours, noisy, text, 1.0)

        def theirs_step():
            theirs_model.zero_grad(set_to_none=True)
            x = chw(noisy).requires_grad_(True)
            z, _, _, lds = theirs_model(x, text)
            theirs_model.get_loss(z, lds)["loss"].backward()
            score = x.grad.clone().detach() * float(x.numel()) * m.noise_std
            pred = theirs_model(x, text, denoiser=True)
            torch.nn.functional.mse_loss(pred, score).backward()

        res = interleaved(ours_step, theirs_step, repeats, profile)
        out["rows"]["train"] = {"batch": b, "check": check, **res}
        ours.eval(), theirs_model.eval()

    if "denoiser" in rows:
        b = shape["batch_train"]
        noisy = torch.randn(b, t, h, w, c, generator=g)
        text = torch.randn(b, m.text_length, m.text_width, generator=g)
        with torch.no_grad():
            s = ours.denoise_score(noisy, text)
            d = hwc(theirs_model(chw(noisy), text, denoiser=True))
            check = {"max_abs_their_D_plus_our_s": (d + s).abs().max().item(),
                     "max_s_value": s.abs().max().item()}
            res = interleaved(lambda: ours.denoise_score(noisy, text),
                              lambda: theirs_model(chw(noisy), text, denoiser=True), repeats,
                              profile)
        out["rows"]["denoiser"] = {"batch": b, "check": check, **res}

    b = shape["batch_sample"]
    z = torch.randn(b, t, h, w, c, generator=g)
    text = torch.randn(b, m.text_length, m.text_width, generator=g)
    uncond = torch.randn(b, m.text_length, m.text_width, generator=g)

    def our_inverse(opts, guided=False):
        from megatron_starflow.sampling.jacobi import SolverStats

        u, deep = deep_inverse(ours, z.reshape(b, t * h * w, c), (t, h, w), opts, text,
                               uncond if guided else None, None, t)
        x, shallow = shallow_inverse(ours, u.reshape(b * t, h * w, c), h, w, opts)
        return x.reshape(b, t, h, w, c), deep, shallow

    def their_inverse(jacobi, th=0.0, guided=False):
        kwargs = {}
        if jacobi:
            kwargs = dict(jacobi_block_size=block, jacobi_max_iter=4 * block, jacobi_th=th)
        y = torch.cat([text, uncond]) if guided else text
        return hwc(theirs_model.reverse(chw(z), y, guidance=cfg_w if guided else 0.0,
                                        jacobi=jacobi, **kwargs))

    with torch.no_grad():
        reference = {}
        if any(r in rows for r in ("sequential", "jacobi", "jacobi_exact")):
            reference["ours"] = our_inverse(SolverOptions("sequential"))[0]
            reference["theirs"] = their_inverse(False)
        if "sequential" in rows:
            check = {"max_abs_ours_vs_theirs": (reference["ours"] - reference["theirs"]).abs().max().item(),
                     "max_abs_token": reference["ours"].abs().max().item()}
            res = interleaved(lambda: our_inverse(SolverOptions("sequential")),
                              lambda: their_inverse(False), repeats, profile)
            out["rows"]["sequential"] = {"batch": b, "check": check, **res}
        for row, tau_row, guided in (("jacobi", tau, False), ("jacobi_exact", 0.0, False),
                                     ("jacobi_cfg", tau, True)):
            if row not in rows:
                continue
            opts = SolverOptions("jacobi", block, 4 * block, tau_row, video_aware=True,
                                 guidance=cfg_w if guided else 0.0, commit_pass=commit_pass)
            if guided:
                seq_o = our_inverse(SolverOptions("sequential", guidance=cfg_w), True)[0]
                seq_t = their_inverse(False, guided=True)
            else:
                seq_o, seq_t = reference["ours"], reference["theirs"]
            mine, deep, shallow = our_inverse(opts, guided)
            with count_passes(theirs_model) as counts:
                yours = their_inverse(True, tau_row, guided)
            check = {"ours_max_abs_vs_own_sequential": (mine - seq_o).abs().max().item(),
                     "theirs_max_abs_vs_own_sequential": (yours - seq_t).abs().max().item(),
                     "max_abs_ours_vs_theirs": (mine - yours).abs().max().item(),
                     "sequential_ours_vs_theirs": (seq_o - seq_t).abs().max().item(),
                     "max_token_value": seq_o.abs().max().item()}
            work = {"ours": {"deep_passes": deep.network_evals, "deep_tokens": deep.token_evals,
                             "shallow_passes": shallow.network_evals,
                             "shallow_tokens": shallow.token_evals},
                    "theirs": counts}
            res = interleaved(lambda: our_inverse(opts, guided),
                              lambda: their_inverse(True, tau_row, guided), repeats, profile)
            per_token = {
                k: res[f"{k}_s"] / max(1, work[k]["deep_tokens"] + work[k]["shallow_tokens"])
                for k in ("ours", "theirs")}
            out["rows"][row] = {"batch": b, "tau": tau_row, "block": [block, 4 * block],
                                "ours_commit_pass": commit_pass,
                                "guidance": cfg_w if guided else 0.0, "check": check,
                                "work": work, **res,
                                "seconds_per_token_eval": per_token,
                                "ratio_per_token_eval": per_token["ours"] / per_token["theirs"]}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--theirs", required=True, help="checkout of apple/ml-starflow")
    parser.add_argument("--models", default="tiny,25m")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per row (medians)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, default=16, help="Jacobi chunk in frame 0 (4x after)")
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--cfg", type=float, default=3.5, help="guidance weight of jacobi_cfg")
    parser.add_argument("--head", type=float, default=0.5, help="flow-head scale of the random weights")
    parser.add_argument("--commit-pass", action="store_true",
                        help="our Jacobi with its commit pass after a tau stop (default: without, "
                             "their rule: the same passes per iteration count)")
    parser.add_argument("--profile", action="store_true",
                        help="per row one profiled call of each side: GEMM / attention / other "
                             "milliseconds, GEMM GFLOP, and kernel_floor_ratio (our GEMM + attention "
                             "time over their whole time)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    theirs = os.path.abspath(args.theirs)
    if not os.path.isfile(os.path.join(theirs, "transformer_flow.py")):
        raise SystemExit(f"--theirs {args.theirs}: no transformer_flow.py there (a checkout of "
                         f"https://github.com/apple/ml-starflow)")
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS] + [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown rows/models {bad}; rows: {', '.join(ROWS)}; models: {', '.join(MODELS)}")

    import torch

    from megatron_starflow.cli.quiet import quiet_warnings
    from megatron_starflow.parallel.state import ensure_single_process

    quiet_warnings()
    torch.set_num_threads(args.threads)
    ensure_single_process()  # also the one-process gloo group their Jacobi's all_reduce needs
    result = {"benchmark": "compare_ml_starflow", "theirs": theirs, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "repeats": args.repeats,
              "block": args.block, "tau": args.tau, "cfg": args.cfg, "head": args.head,
              "commit_pass": args.commit_pass,
              "models": [run_model(name, theirs, rows, args.repeats, args.block, args.tau, args.cfg,
                                   args.head, args.commit_pass, args.profile)
                         for name in args.models.split(",")]}
    result["ratios"] = {f"{mod['model']}/{row}": {k: round(r[k], 3) for k in
                                                   ("ratio", "ratio_cpu", "ratio_pairs_median",
                                                    "kernel_floor_ratio") if k in r}
                        for mod in result["models"] for row, r in mod["rows"].items()}
    emit(result, args.out)
    return result


def emit(result: dict, out: str) -> None:
    """Print the JSON and, with ``out``, write it there whole (temp name, then rename)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
