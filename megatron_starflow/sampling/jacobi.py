"""Inverting one flow block: sequential (KV-cached, token by token) or block Jacobi.

Jacobi (METHOD.md section 5): for a chunk of S tokens whose past is in the KV cache, iterate
x^{k+1} = b(x^k) + sigma(x^k) * z over the whole chunk in one parallel pass. Causality makes token
P+k exact after k+1 iterations, so the chunk is exact after at most S iterations; we stop earlier
when ||x^{k+1} - x^k||^2 / ||x^{k+1}||^2 < tau, or when an iteration changes nothing at all (then
x^k is the fixed point, exact to rounding; with tau = 0 this is the only early stop). Every pass
writes its keys into the cache after the committed slots (``KVCache``); they are committed as
follows. After an iteration that changed nothing, the keys it wrote (of x^k = x^{k+1}) are those
of the result: committed as they are. Otherwise one more pass commits the chunk, which is itself
the last iteration (S passes in all without early stop): its keys come from the previous iterate
and its outputs are the returned values; the two agree once converged, so with tau = 0 both the
cache and the result are exact. ``commit_pass=False`` skips that pass after a tau stop and keeps the
last iteration's keys (of x^k, with x^{k+1} returned), as the reference does: one pass less per
chunk for a result about one iteration less accurate. Video-aware initialisation starts a chunk inside frame n > 0 from the values
at the same in-frame positions of frame n-1, which is where consecutive frames agree.

With guidance, the batch holds [conditional; unconditional] copies that share one history (the
guided values), as in the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_starflow.models.flow_block import FlowBlock
from megatron_starflow.models.layout import SlotLayout
from megatron_starflow.models.transformer import KVCache
from megatron_starflow.sampling.guidance import guided_gaussian


class SamplingDiverged(RuntimeError):
    """A block's inverse became non-finite (NaN / inf): the error names the block, the chunk's
    tokens and frame, and the iteration; sampling stops there instead of iterating on."""


@dataclass
class SolverOptions:
    solver: str = "jacobi"  # sequential | jacobi
    first_block: int = 16  # Jacobi chunk size inside frame 0
    later_block: int = 64  # ... and afterwards (the reference: 32, then 4x larger)
    tau: float = 1e-3
    max_iters: int = 0  # iterations before the commit pass; 0 = chunk size - 1 (exact)
    video_aware: bool = True
    guidance: float = 0.0
    # After a chunk stops on tau: one more pass that commits its keys and gives its values (one
    # more iteration, ~3x closer to the exact inverse at tau = 1e-3); False keeps the keys the last
    # iteration wrote (the reference's rule: one pass less per chunk). An iteration that changes
    # nothing (always the case with tau = 0 once converged) never needs it.
    commit_pass: bool = True
    # Commit the final tokens of a chunk after every pass and iterate only the rest (fewer token
    # evaluations); False: every pass covers the whole chunk, so a chunk has one shape (what a
    # compiled or graph-captured step wants).
    shrink: bool = True

    def __post_init__(self):
        if self.solver not in ("sequential", "jacobi"):
            raise ValueError(f"solver={self.solver!r}; valid: sequential, jacobi")
        if self.first_block < 1 or self.later_block < 1:
            raise ValueError("Jacobi block sizes must be >= 1")
        if not (math.isfinite(self.tau) and 0.0 <= self.tau <= 1.0):
            raise ValueError(f"tau must be a finite number in [0, 1], got {self.tau}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance weight must be a finite number >= 0, got {self.guidance}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0 (0: chunk size - 1), got {self.max_iters}")


@dataclass
class SolverStats:
    network_evals: int = 0  # forward passes of the block
    token_evals: int = 0  # sum over passes of the slots computed
    iterations: list[int] = field(default_factory=list)  # per Jacobi chunk
    seconds: float = 0.0

    def merge(self, other: "SolverStats") -> None:
        self.network_evals += other.network_evals
        self.token_evals += other.token_evals
        self.iterations += other.iterations
        self.seconds += other.seconds


class BlockInverter:
    """Stateful inverse of one block over a growing sequence (the state is the KV cache)."""

    def __init__(self, block: FlowBlock, layout: SlotLayout, opts: SolverOptions,
                 text: torch.Tensor | None = None, uncond_text: torch.Tensor | None = None,
                 name: str = "flow block"):
        self.block, self.layout, self.opts, self.name = block, layout, opts, name
        self.guided = opts.guidance != 0 and uncond_text is not None
        self.cache = KVCache(capacity=layout.total)  # preallocated: written in place
        self.stats = SolverStats()
        if layout.text_len:
            both = torch.cat([text, uncond_text]) if self.guided else text
            block.prefill_text(both, layout, self.cache)

    def _step(self, prev: torch.Tensor, start: int, z: torch.Tensor, commit: bool) -> torch.Tensor:
        """One parallel pass over tokens start..start+S-1 -> their new values b + sigma * z."""
        inputs = torch.cat([prev, prev]) if self.guided else prev
        b, log_sigma = self.block.predict(inputs, start, self.layout, self.cache, commit)
        if self.guided:
            (b_c, b_u), (l_c, l_u) = b.chunk(2), log_sigma.chunk(2)
            b, log_sigma = guided_gaussian(b_c, l_c, b_u, l_u, self.opts.guidance)
        self.stats.network_evals += 1
        self.stats.token_evals += prev.shape[1]
        return b + torch.exp(log_sigma) * z

    def encode_prefix(self, x: torch.Tensor) -> None:
        """Fill the cache with given tokens (I2V / V2V / long-video context): one parallel pass."""
        prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        inputs = torch.cat([prev, prev]) if self.guided else prev
        self.block.predict(inputs, 0, self.layout, self.cache, commit=True)
        self.stats.network_evals += 1

    @torch.no_grad()
    def run(self, z: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """z ``[B, N, C]`` -> x. Tokens of ``prefix`` (``[B, P, C]``, P < N) are given, not solved."""
        t0 = time.time()
        x = torch.zeros_like(z)
        start = 0
        if prefix is not None and prefix.shape[1]:
            start = prefix.shape[1]
            x[:, :start] = prefix
            self.encode_prefix(prefix)
        if self.opts.solver == "sequential":
            self._sequential(z, x, start)
        else:
            self._jacobi(z, x, start)
        self.stats.seconds += time.time() - t0
        return x

    def diverged(self, start: int, size: int, when: str) -> SamplingDiverged:
        """The error of a chunk of tokens ``[start, start + size)`` whose values are not finite."""
        hw = self.layout.tokens_per_frame
        first, last = start // hw, (start + size - 1) // hw
        if self.layout.frames == 1:  # shallow blocks: every frame is its own one-frame sequence
            frames = "in-frame positions, all frames at once"
        else:
            frames = f"frame {first}" if first == last else f"frames {first}-{last}"
        return SamplingDiverged(
            f"{self.name}: the chunk of tokens {start}..{start + size - 1} ({frames}) became "
            f"non-finite (NaN/inf) {when}; sampling stopped. The model or its inputs (guidance "
            f"weight, conditioning frames, weights) produce non-finite values")

    def _sequential(self, z, x, start):
        hw = self.layout.tokens_per_frame
        for t in range(start, z.shape[1]):
            prev = x[:, t - 1:t] if t else torch.zeros_like(x[:, :1])
            x[:, t:t + 1] = self._step(prev, t, z[:, t:t + 1], commit=True)
            if (t + 1) % hw == 0 or t + 1 == z.shape[1]:  # one check per frame
                lo = max(start, t + 1 - hw)
                if not torch.isfinite(x[:, lo:t + 1]).all():
                    raise self.diverged(lo, t + 1 - lo, "in sequential decoding")

    def _initial_guess(self, x, z, start, size):
        hw = self.layout.tokens_per_frame
        if self.opts.video_aware and start >= hw:
            # Same in-frame position in the latest solved frame; a chunk longer than what is
            # solved before it (size > hw) wraps around to that frame again instead of reading
            # unsolved slots.
            index = start - hw + torch.arange(size, device=x.device) % hw
            return x[:, index].clone()
        return z[:, start:start + size].clone()

    def _jacobi(self, z, x, start):
        hw, n = self.layout.tokens_per_frame, z.shape[1]
        while start < n:
            size = self.opts.first_block if start < hw else self.opts.later_block
            size = min(size, n - start)
            self._solve_chunk(z, x, start, size)
            start += size

    def _solve_chunk(self, z, x, start, size):
        """Jacobi over tokens [start, start + size). Tokens become final from the left: the first
        token of a pass reads only final values, and so does every token after it up to the
        first one whose value the pass changed (bit for bit), which is the last final one. Those
        are committed after each pass (their values, and the keys this pass wrote for them, which
        it computed from final inputs) and later passes only cover the rest: the same iterates as
        passes over the whole chunk, for fewer token evaluations (at most S(S+1)/2 instead of S^2
        for S tokens). The stop rule's relative change is over the whole chunk (final tokens
        change by zero)."""
        # The commit pass below is itself an iteration, so size - 1 iterations before it make
        # every token exact (at most S network passes per chunk in all).
        limit = self.opts.max_iters or size - 1
        guess = self._initial_guess(x, z, start, size)
        numel = guess.numel()
        done, final_sq = 0, 0.0  # tokens committed; their sum of squares (for the stop rule)
        iters, passes, settled = 0, 0, False
        while done < size and iters < limit:
            iters += 1
            a = start + done
            first = x[:, a - 1:a] if a else torch.zeros_like(x[:, :1])
            new = self._step(torch.cat([first, guess[:, done:-1]], 1), a, z[:, a:start + size],
                             commit=False)
            passes += 1
            diff = new - guess[:, done:]
            new_sq = new.pow(2).sum()
            change = (diff.pow(2).sum() / numel
                      / ((new_sq + final_sq) / numel).clamp_min(1e-30)).item()
            if not math.isfinite(change):  # NaN / inf never converge: stop here
                raise self.diverged(start, size, f"at Jacobi iteration {iters} of at most {limit}")
            guess[:, done:] = new
            changed = diff.ne(0).flatten(2).any(2).any(0)  # per token of this pass
            moved = torch.nonzero(changed)
            final = moved[0, 0].item() + 1 if moved.numel() else new.shape[1]
            if not self.opts.shrink and final < new.shape[1]:
                final = 0
            final_sq += new[:, :final].pow(2).sum().item()
            x[:, a:a + final] = new[:, :final]
            self.cache.advance(final)
            done += final
            if done < size and change < self.opts.tau:
                settled = not self.opts.commit_pass
                break
        if done < size:
            a = start + done
            if settled:
                # Keep the keys the last iteration wrote for the rest (of its inputs, one iterate
                # before the returned values), as the reference does.
                self.cache.commit_written()
                x[:, a:start + size] = guess[:, done:]
            else:
                # Commit pass: cache keys of exactly the values we keep (one more Jacobi iteration;
                # after size - 1 iterations it is the one that makes the last token exact).
                first = x[:, a - 1:a] if a else torch.zeros_like(x[:, :1])
                x[:, a:start + size] = self._step(torch.cat([first, guess[:, done:-1]], 1), a,
                                                  z[:, a:start + size], commit=True)
                passes += 1
                if not torch.isfinite(x[:, a:start + size]).all():
                    raise self.diverged(start, size, f"in its commit pass after {iters} iterations")
        self.stats.iterations.append(passes)
