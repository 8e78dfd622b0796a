"""Context-parallel sampling: the deep block's frames split across ranks, a pipelined (wavefront)
Jacobi in which all ranks compute at the same time.

Rank r owns the contiguous frames ``[a_r, b_r)`` (``parallel.context_parallel.frame_split``; I2V /
V2V prefix frames on rank 0), i.e. video tokens ``[A, E)``. Every rank pre-fills the text prefix
itself. Its *final cache* holds text + the committed KV of the final tokens ``[0, F)``.

* **Final mode** (rank 0 from the start; rank r once every upstream token is final, F = A): the
  one-rank block Jacobi of ``BlockInverter`` on its own tokens, chunk by chunk, with the same stop
  rule (``tau``, ``max_iters``, chunk size - 1 iterations then the commit pass, none after an
  iteration that changed nothing or with ``commit_pass`` off). A chunk starts from
  rank r's speculative iterate when it has one (warm start), else from the one-rank guess
  (video-aware or z). After every commit it sends rank r+1 the chunk's committed KV.
* **Speculative mode** (rank r > 0 while upstream is not final): with the latest upstream tokens
  (final ones + the upstream's current iterate of the rest), rank r encodes the non-final
  upstream tokens into a scratch copy of its cache (one pass) and iterates Jacobi over all its
  own tokens at once (one pass per iteration), until they settle (change < tau, or as many
  iterations as tokens) or newer upstream values arrive; its iterate is streamed on to rank r+1.
  When upstream turns final, final mode starts from this iterate, so a chunk that speculation got
  right stops after one iteration + the commit pass.

Exactness: in final mode the cache holds exactly the committed KV of all earlier tokens (sent as
KV, not re-encoded), and block Jacobi from any initial guess reaches the sequential inverse, so
with tau = 0 (full convergence) the result equals one-rank Jacobi and the sequential inverse up
to rounding. With tau > 0 each chunk stops under the one-rank rule but from a different start
(speculative iterate) and with chunks cut at rank boundaries, so the result agrees with one-rank
Jacobi within the tau tolerance (both are within it of the sequential inverse).

Shallow blocks are per frame: each rank inverts its own frames. Rank 0 gathers the tokens,
denoises and decodes. Per-rank timings: passes (speculative, context, final), iterations per
final chunk, compute / communication / idle seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from megatron_starflow.parallel.context_parallel import (Inbox, Link, Message, frame_split,
                                                         pair_groups)
from megatron_starflow.sampling.jacobi import BlockInverter, SolverOptions, SolverStats


@dataclass
class RankTimings:
    rank: int
    frames: tuple[int, int]
    network_evals: int = 0
    token_evals: int = 0
    speculative_passes: int = 0
    context_passes: int = 0
    final_passes: int = 0
    iterations: list[int] = field(default_factory=list)  # per final-mode chunk (commit included)
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0  # main thread: packing/enqueueing messages + final flush
    send_seconds: float = 0.0  # sender thread inside gloo sends (overlapped with compute)
    receive_seconds: float = 0.0  # receiver thread inside gloo receives (overlapped)
    idle_seconds: float = 0.0  # blocked waiting for upstream values
    wall_seconds: float = 0.0
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    first_final_pass_at: float = 0.0  # seconds after start when final mode began


class CPBlockInverter(BlockInverter):
    """One rank's part of the pipelined Jacobi inverse of a causal block (see module doc)."""

    def __init__(self, block, layout, opts: SolverOptions, ranges: list[tuple[int, int]],
                 text=None, uncond_text=None, group=None, warm_start: bool = True):
        super().__init__(block, layout, opts, text, uncond_text, name="deep block")
        self.group = group or dist.group.WORLD
        self.ranks = dist.get_process_group_ranks(self.group)
        self.rank, self.size = dist.get_rank(self.group), len(self.ranks)
        if len(ranges) != self.size:
            raise ValueError(f"{len(ranges)} frame ranges for {self.size} context-parallel ranks")
        self.ranges = ranges
        self.warm_start = warm_start
        self.final = self.cache  # text prefix (+ committed slots)
        links = pair_groups(self.ranks) if self.size > 1 else []
        self.out_link = (Link(links[self.rank], self.ranks[self.rank + 1])
                         if self.rank + 1 < self.size else None)
        self.in_group = links[self.rank - 1] if self.rank > 0 else None
        self.timing = RankTimings(self.rank, tuple(ranges[self.rank]))
        self.sent_final = 0  # video tokens whose KV rank r+1 already has

    # -- helpers -----------------------------------------------------------------------------
    def _final_len(self) -> int:
        return len(self.final) - self.layout.text_len

    def _kv_shape(self, batch: int):
        cfg = self.block.transformer.config
        tp = self.block.transformer.tp
        groups = (cfg.num_query_groups or cfg.num_attention_heads) // tp
        layers = len(self.block.transformer.core_attentions())
        bkv = 2 * batch if self.guided else batch
        return (2 * layers, bkv, groups, cfg.kv_channels)

    def _layer_ids(self):
        return [m.layer_number for m in self.block.transformer.core_attentions()]

    def _apply(self, msgs: list[Message], x: torch.Tensor) -> bool:
        """Fold upstream messages into the final cache and x; -> whether anything changed."""
        text = self.layout.text_len
        for msg in msgs:
            self.timing.messages_received += 1
            x[:, :msg.tokens.shape[1]] = msg.tokens.to(x.device)
            if msg.kv is not None:
                msg.kv = msg.kv.to(x.device)
                if msg.kv_from != self._final_len():
                    raise RuntimeError(f"rank {self.rank}: KV for slots {msg.kv_from}.. arrived, "
                                       f"cache holds {self._final_len()}")
                # On the wire [2 * layers, S, B, heads, d]; the cache holds [B, heads, S, d].
                n = len(self._layer_ids())
                for i, layer in enumerate(self._layer_ids()):
                    self.final.append(layer, msg.kv[i].permute(1, 2, 0, 3),
                                      msg.kv[n + i].permute(1, 2, 0, 3))
                self.final.advance(msg.kv.shape[1])
            assert msg.final_len == self._final_len(), (msg.final_len, self._final_len(), text)
        return bool(msgs)

    def _publish(self, x: torch.Tensor, upto: int, last: bool = False) -> None:
        """Send rank r+1 the values of tokens [0, upto) and the KV of newly final slots."""
        if self.out_link is None:
            return
        final = self._final_len()
        kv = None
        if final > self.sent_final:
            text, ids = self.layout.text_len, self._layer_ids()
            lo, hi = text + self.sent_final, text + final
            kv = torch.stack([self.final.get(i, lo, hi)[0] for i in ids]
                             + [self.final.get(i, lo, hi)[1] for i in ids]).permute(0, 3, 1, 2, 4)
        # Messages travel over gloo from host memory (a GPU run stages them through the CPU).
        kv = None if kv is None else kv.cpu()
        self.out_link.send(Message(final, self.sent_final, final, x[:, :upto].cpu().clone(), kv, last))
        self.sent_final = final
        self.timing.messages_sent = self.out_link.messages
        self.timing.bytes_sent = self.out_link.bytes

    def _pass(self, x, start, size, z, commit, kind):
        first = x[:, start - 1:start] if start else torch.zeros_like(x[:, :1])
        t0 = time.perf_counter()
        new = self._step(torch.cat([first, x[:, start:start + size - 1]], 1), start,
                         z[:, start:start + size], commit)
        self.timing.compute_seconds += time.perf_counter() - t0
        # _step counted the pass in self.stats; record its kind
        setattr(self.timing, kind, getattr(self.timing, kind) + 1)
        return new

    def _encode(self, x, lo, hi, cache):
        """Commit KV of tokens [lo, hi) (their current values) into ``cache`` (one pass)."""
        prev = torch.cat([x[:, lo - 1:lo] if lo else torch.zeros_like(x[:, :1]), x[:, lo:hi - 1]], 1)
        inputs = torch.cat([prev, prev]) if self.guided else prev
        t0 = time.perf_counter()
        self.block.predict(inputs, lo, self.layout, cache, commit=True)
        self.timing.compute_seconds += time.perf_counter() - t0
        self.stats.network_evals += 1
        self.stats.token_evals += hi - lo
        self.timing.context_passes += 1

    def _fill_guess(self, x, z, lo, hi):
        """Speculative values for unsolved tokens [lo, hi): the one-rank initial guess (the same
        in-frame position one frame earlier, or z in frame 0)."""
        hw = self.layout.tokens_per_frame
        for p in range(lo, hi, hw):
            q = min(hi, p + hw)
            if self.opts.video_aware and p >= hw:
                x[:, p:q] = x[:, p - hw:q - hw]
            else:
                x[:, p:q] = z[:, p:q]

    # -- the two modes -------------------------------------------------------------------------
    def _speculate(self, x, z, inbox: Inbox, a_tok: int, e_tok: int) -> bool:
        """Speculative mode until every upstream token is final; -> whether own tokens hold a
        speculative iterate."""
        size = e_tok - a_tok
        have = False
        t0 = time.perf_counter()
        msgs = inbox.wait()
        self.timing.idle_seconds += time.perf_counter() - t0
        self._apply(msgs, x)
        while self._final_len() < a_tok:
            if not have:
                self._fill_guess(x, z, a_tok, e_tok)
                have = True
            cache = self.final.clone()
            self._encode(x, self._final_len(), a_tok, cache)
            self.cache = cache
            fresh = False
            for it in range(size):
                new = self._pass(x, a_tok, size, z, False, "speculative_passes")
                change = (new - x[:, a_tok:e_tok]).pow(2).mean() / new.pow(2).mean().clamp_min(1e-30)
                x[:, a_tok:e_tok] = new
                self._publish(x, e_tok)
                msgs = inbox.poll()
                if msgs:
                    self._apply(msgs, x)
                    fresh = True
                    break
                if change < self.opts.tau or not math.isfinite(change.item()):
                    break  # settled, or non-finite: wait for final upstream values
            self.cache = self.final
            if not fresh and self._final_len() < a_tok:
                t0 = time.perf_counter()
                msgs = inbox.wait()
                self.timing.idle_seconds += time.perf_counter() - t0
                self._apply(msgs, x)
        return have

    def _final_mode(self, x, z, start, end, warm: bool) -> None:
        hw = self.layout.tokens_per_frame
        self.cache = self.final
        self.timing.first_final_pass_at = time.perf_counter() - self._t0
        while start < end:
            size = self.opts.first_block if start < hw else self.opts.later_block
            size = min(size, end - start)
            limit = self.opts.max_iters or size - 1
            if warm and self.warm_start:
                guess = x[:, start:start + size].clone()
            else:
                guess = self._initial_guess(x, z, start, size)
            iters, settled = 0, False
            for iters in range(1, limit + 1):
                x[:, start:start + size] = guess
                new = self._pass(x, start, size, z, False, "final_passes")
                change = ((new - guess).pow(2).mean() / new.pow(2).mean().clamp_min(1e-30)).item()
                guess = new
                if not math.isfinite(change):  # NaN / inf never converge: stop here
                    raise self.diverged(start, size, f"at Jacobi iteration {iters} of at most "
                                                     f"{limit} (context-parallel rank {self.rank})")
                if change == 0.0 or change < self.opts.tau:  # the one-rank rule (BlockInverter)
                    settled = change == 0.0 or not self.opts.commit_pass
                    break
            if settled:
                self.cache.commit_written()
                x[:, start:start + size] = guess
                passes = iters
            else:
                x[:, start:start + size] = guess
                x[:, start:start + size] = self._pass(x, start, size, z, True, "final_passes")
                if not torch.isfinite(x[:, start:start + size]).all():
                    raise self.diverged(start, size, f"in its commit pass after {iters} iterations "
                                                     f"(context-parallel rank {self.rank})")
                passes = iters + 1
            self.stats.iterations.append(passes)
            self.timing.iterations.append(passes)
            start += size
            if not warm:  # the rest of the range: the one-rank guess, for rank r+1's speculation
                self._fill_guess(x, z, start, end)
            self._publish(x, end, last=start >= end)

    @torch.no_grad()
    def run_cp(self, z: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """z ``[B, N, C]`` (the whole video's noise, the same on every rank) -> this rank's solved
        tokens ``[B, E - A, C]`` (rank 0: the prefix tokens included)."""
        self._t0 = time.perf_counter()
        hw = self.layout.tokens_per_frame
        a, e = self.ranges[self.rank]
        a_tok, e_tok = a * hw, e * hw
        x = torch.zeros_like(z[:, :e_tok])
        start, warm = a_tok, False
        if self.rank == 0:
            if prefix is not None and prefix.shape[1]:
                start = prefix.shape[1]
                x[:, :start] = prefix
                t0 = time.perf_counter()
                self.encode_prefix(prefix)
                self.timing.compute_seconds += time.perf_counter() - t0
                self.timing.context_passes += 1
            self._fill_guess(x, z, start, e_tok)
            self._publish(x, e_tok)
        else:
            inbox = Inbox(self.in_group, self.ranks[self.rank - 1], z.shape[0], z.shape[2],
                          self._kv_shape(z.shape[0]), z.dtype)
            warm = self._speculate(x, z, inbox, a_tok, e_tok)
            inbox.thread.join()
            self.timing.receive_seconds = inbox.seconds
        self._final_mode(x, z, start, e_tok, warm)
        if self.out_link is not None:
            flush = self.out_link.close()
            self.timing.communication_seconds = self.out_link.enqueue_seconds + flush
            self.timing.send_seconds = self.out_link.seconds
        self.timing.network_evals = self.stats.network_evals
        self.timing.token_evals = self.stats.token_evals
        self.timing.wall_seconds = time.perf_counter() - self._t0
        self.stats.seconds += self.timing.wall_seconds
        return x[:, a_tok:e_tok]


def cp_invert_block(block, z, layout, opts, text=None, uncond=None, prefix=None, group=None,
                    ranges=None, warm_start: bool = True):
    """All ranks: -> (this rank's tokens, its SolverStats, its RankTimings, the frame ranges)."""
    if opts.solver != "jacobi":
        raise ValueError(f"context-parallel sampling runs the pipelined Jacobi solver, not "
                         f"solver={opts.solver!r}")
    group = group or dist.group.WORLD
    size = dist.get_world_size(group)
    hw = layout.tokens_per_frame
    given = 0 if prefix is None else prefix.shape[1] // hw
    ranges = ranges or frame_split(z.shape[1] // hw, size, given)
    inv = CPBlockInverter(block, layout, opts, ranges, text, uncond, group, warm_start)
    x = inv.run_cp(z, prefix)
    return x, inv.stats, inv.timing, ranges


# ------------------------------------------------------------------------------ generation

@torch.no_grad()
def cp_generate(system, captions: list[str], frames: int | None = None, seed: int = 0,
                opts: SolverOptions | None = None, prefix_video: torch.Tensor | None = None,
                denoise: bool = True, temperature: float = 1.0, group=None,
                warm_start: bool = True):
    """``generate`` with the deep block (and the per-frame shallow blocks) split over the ranks of
    ``group`` (default: the world). Collective. Rank 0 returns the ``Generation`` (tokens, video,
    summed solver stats, ``ranks``: every rank's timings, ``ranges``); other ranks return None."""
    from megatron_starflow.sampling.generate import (Generation, finish, prepare_inputs,
                                                     shallow_inverse)

    group = group or dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    opts = opts or SolverOptions()
    model = system.model
    inp = prepare_inputs(system, captions, frames, seed, opts, prefix_video, temperature,
                         with_prefix_u=rank == 0)  # the given frames live on rank 0
    (t, h, w), given, train_t = inp.grid, inp.given, inp.train_t
    if t > train_t:
        raise ValueError(f"context-parallel sampling covers up to the training length ({train_t} "
                         f"latent frames); {t} asked: sample long videos on one rank (--cp 1)")
    z, text, uncond, prefix_u, t0 = inp.z, inp.text, inp.uncond, inp.prefix_u, inp.t0
    b, c, hw = z.shape[0], z.shape[-1], h * w
    times = {"encode": time.time() - t0}
    ranges = frame_split(t, size, given)
    u_own, deep_stats, timing, _ = cp_invert_block(
        model.deep_block, z.reshape(b, t * hw, c), model.deep_layout(t, h, w), opts, text, uncond,
        prefix_u, group, ranges, warm_start)
    a, e = ranges[rank]
    skip = given if rank == 0 else 0  # given frames are not inverted
    t1 = time.perf_counter()
    own = u_own[:, skip * hw:].reshape(b * (e - a - skip), hw, c)
    x_own, shallow_stats = shallow_inverse(model, own, h, w, opts)
    x_own = x_own.reshape(b, e - a - skip, h, w, c)
    timing_d = asdict(timing)
    timing_d["shallow_seconds"] = time.perf_counter() - t1
    timing_d["shallow_network_evals"] = shallow_stats.network_evals
    parts = [None] * size
    dist.all_gather_object(parts, (x_own, deep_stats, shallow_stats, timing_d), group=group)
    times["invert"] = time.time() - t0 - times["encode"]
    if rank != 0:
        return None
    x = torch.cat([p[0] for p in parts], dim=1)
    deep, shallow = SolverStats(), SolverStats()
    for p in parts:
        deep.merge(p[1])
        shallow.merge(p[2])
    tokens, video = finish(system, inp, x, denoise)
    times["total"] = time.time() - t0
    out = Generation(video, tokens, deep, shallow, times)
    out.ranks = [p[3] for p in parts]
    out.ranges = ranges
    return out
