"""Sampling speed figures shared by the benchmarks (tools/benchmark.py sampling,
benchmarks/train_throughput.py): the time per deep-block token evaluation of a run, and the
speed-up of video-aware Jacobi over sequential decoding at equal output.

"Equal output" is a video within ``VIDEO_TOL`` = 2 levels of 255 of the sequential one (the same
seed and prompts). Jacobi's early stop ``tau`` trades accuracy for speed, so the search walks down
a ladder of tau values (``tau_ladder``: the given tau, then 10x smaller steps, then 0, which is
exact) and reports the first that reaches equal output, with and without the commit pass
(``SolverOptions.commit_pass``): the cheaper of the two is the speed-up at equal output.
"""

from __future__ import annotations

import time

import torch

from megatron_starflow.sampling.generate import Generation, generate
from megatron_starflow.sampling.jacobi import SolverOptions, SolverStats

VIDEO_TOL = 2  # uint8 levels


def seconds_per_token_eval(stats: SolverStats) -> float | None:
    """Inversion seconds of one block kind (deep or shallow) per token evaluation."""
    return stats.seconds / stats.token_evals if stats.token_evals else None


def run_summary(gen: Generation, seconds: float) -> dict:
    """Figures of one generation: wall seconds, deep/shallow passes and token evaluations, the
    deep block's inversion seconds and its time per token evaluation."""
    return {"seconds": seconds,
            "deep_seconds": gen.deep.seconds,
            "deep_network_evals": gen.deep.network_evals,
            "deep_token_evals": gen.deep.token_evals,
            "seconds_per_deep_token_eval": seconds_per_token_eval(gen.deep),
            "shallow_network_evals": gen.shallow.network_evals,
            "shallow_token_evals": gen.shallow.token_evals}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def tau_ladder(tau: float, steps: int = 4, floor: float = 1e-7) -> list[float]:
    """tau, tau/10, ... (at most ``steps`` values down to ``floor``), then 0 (exact)."""
    out = []
    while tau > 0 and tau >= floor and len(out) < steps:
        out.append(tau)
        tau /= 10
    return out + [0.0]


def timed_generate(system, captions, frames, seed, opts) -> tuple[Generation, float]:
    t0 = time.perf_counter()
    gen = generate(system, captions, frames, seed, opts)
    return gen, time.perf_counter() - t0


def equal_output_speedup(system, captions: list[str], frames: int, seed: int,
                         block_size: tuple[int, int], tau: float = 1e-3, guidance: float = 0.0,
                         reference: tuple[Generation, float] | None = None,
                         tol: int = VIDEO_TOL) -> dict:
    """Video-aware Jacobi vs sequential at equal output -> a JSON-ready dict: per commit-pass
    setting, the tau ladder walked (seconds, passes, token evaluations, max video / token
    difference) and the first tau within ``tol``; ``best``: the faster of the two and its
    speed-up over sequential. ``reference``: an earlier sequential (generation, seconds)."""
    if reference is None:
        reference = timed_generate(system, captions, frames, seed,
                                   SolverOptions("sequential", guidance=guidance))
    seq, seq_seconds = reference
    out = {"criterion": f"max |video - sequential| <= {tol}/255", "sequential_seconds": seq_seconds,
           "sequential_seconds_per_deep_token_eval": seconds_per_token_eval(seq.deep)}
    best = None
    for commit in (True, False):
        tried = []
        found = None
        for t in tau_ladder(tau):
            opts = SolverOptions("jacobi", block_size[0], block_size[1], t, video_aware=True,
                                 guidance=guidance, commit_pass=commit)
            gen, seconds = timed_generate(system, captions, frames, seed, opts)
            row = {"tau": t, **run_summary(gen, seconds),
                   "max_abs_video_diff": int(round(max_abs(gen.video, seq.video))),
                   "max_abs_token_diff": max_abs(gen.tokens, seq.tokens)}
            tried.append(row)
            if row["max_abs_video_diff"] <= tol:
                found = row
                break
        key = "commit_pass" if commit else "no_commit_pass"
        out[key] = {"ladder": tried, "tau": None if found is None else found["tau"],
                    "seconds": None if found is None else found["seconds"],
                    "speedup_vs_sequential": None if found is None else seq_seconds / found["seconds"]}
        if found is not None and (best is None or found["seconds"] < best[1]["seconds"]):
            best = (key, found)
    if best is not None:
        out["best"] = {"commit_pass": best[0] == "commit_pass", "tau": best[1]["tau"],
                       "seconds": best[1]["seconds"],
                       "speedup_vs_sequential": seq_seconds / best[1]["seconds"],
                       "deep_eval_ratio_vs_sequential":
                           seq.deep.network_evals / max(1, best[1]["deep_network_evals"])}
    return out
