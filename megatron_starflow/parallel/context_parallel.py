"""Context parallelism (CP) over frames: the deep block's video tokens split across ranks.

Rank r of a CP group owns a contiguous range of latent frames ``[a_r, b_r)`` (``frame_split``);
the text prefix is replicated (sampling: every rank pre-fills its own KV cache with it) or held by
rank 0 (training). Two users:

* **Sampling** (``sampling/cp_jacobi.py``): a pipelined (wavefront) Jacobi. Rank r streams messages
  to rank r+1 over a ``Link`` (its own two-rank gloo group, so a background receiver thread and the
  sender never share a communicator): the tokens of every frame before ``b_r`` (final or
  speculative) and the *committed* KV of newly final slots. The receiver side is an ``Inbox``: a
  thread doing blocking receives into a queue, which the compute loop polls without blocking.
* **Training** (``ContextParallelAttention``, ``cp_deep_forward``, ``cp_flow_nll``): each rank runs
  its slice of the sequence; in every layer the (RoPE-rotated) keys and values are all-gathered
  over the CP group (autograd: the backward all-reduces the gathered grads and keeps this rank's
  slice) and the local queries attend to them under the frame-causal mask (and window), built
  from global slot labels. Works under TP (heads split, K/V gathered among ranks of the same TP
  rank: megatron's context-parallel group) and SP (the stack pads each rank's slice; pad keys
  are masked out). Parameter grads are partial sums: all-reduce them over the CP group
  (``allreduce_cp_grads``).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_starflow.models import masks
from megatron_starflow.models.layout import SlotLayout


# ------------------------------------------------------------------------------ frame split

def frame_split(frames: int, ranks: int, given: int = 0) -> list[tuple[int, int]]:
    """Contiguous frame ranges ``[a_r, b_r)``: the ``frames - given`` frames to solve are shared as
    evenly as possible (earlier ranks take the remainder); the ``given`` prefix frames (I2V / V2V)
    go to rank 0 on top of its share."""
    todo = frames - given
    if ranks < 1:
        raise ValueError(f"context parallel size must be >= 1, got {ranks}")
    if todo < ranks:
        raise ValueError(f"context parallel size {ranks} exceeds the {todo} latent frames to "
                         f"generate: every rank needs at least one frame (use fewer ranks or more "
                         f"frames)")
    base, extra = divmod(todo, ranks)
    out, start = [], 0
    for r in range(ranks):
        end = start + base + (r < extra) + (given if r == 0 else 0)
        out.append((start, end))
        start = end
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world() -> int:
    """World size set by a launcher (torchrun / SLURM), 0 when not launched by one."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_NTASKS"])
    return 0


def _spawn_entry(local_rank: int, world: int, port: int, threads: int, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


def spawn_local(world: int, fn, *args, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``world`` local processes (gloo on CPU) with RANK/WORLD_SIZE/MASTER_*
    set, so ``parallel.state.initialize`` joins them in one group. ``fn`` must be importable
    (module level). CPU threads per process default to cores / world."""
    import torch.multiprocessing as mp

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world)
    mp.spawn(_spawn_entry, args=(world, free_port(), threads, fn, args), nprocs=world, join=True)


# ------------------------------------------------------------------------------ sampling links

# Header of one message: [final_len, kv_from, kv_to, token_len, last]. Slots are video-token
# indices (the text prefix is not counted); the KV payload covers slots [kv_from, kv_to).
_HEADER = 5


@dataclass
class Message:
    final_len: int  # video tokens 0..final_len-1 are final (their committed KV has been sent)
    kv_from: int
    kv_to: int
    tokens: torch.Tensor  # [B, token_len, C]: current values of video tokens 0..token_len-1
    kv: torch.Tensor | None  # [2 * layers, kv_to - kv_from, B_kv, heads, head_dim] (keys; values)
    last: bool


class Link:
    """One direction of the rank r -> r+1 stream, on a two-rank group of its own. ``send`` only
    enqueues: a sender thread does the (blocking) gloo sends, so compute never waits for rank r+1
    to be scheduled; ``close`` flushes."""

    def __init__(self, group, peer: int):
        self.group, self.peer = group, peer
        self.seconds = 0.0  # sender thread time inside sends (overlapped with compute)
        self.enqueue_seconds = 0.0  # main thread
        self.messages = 0
        self.bytes = 0
        self.queue: queue.Queue = queue.Queue()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            if msg is None:
                return
            try:
                t0 = time.perf_counter()
                header = torch.tensor([msg.final_len, msg.kv_from, msg.kv_to, msg.tokens.shape[1],
                                       int(msg.last)], dtype=torch.long)
                dist.send(header, self.peer, group=self.group)
                dist.send(msg.tokens, self.peer, group=self.group)
                if msg.kv_to > msg.kv_from:
                    dist.send(msg.kv, self.peer, group=self.group)
                self.seconds += time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - raised by close()
                self.error = exc
                return

    def send(self, msg: Message) -> None:
        t0 = time.perf_counter()
        if self.error is not None:
            raise RuntimeError(f"context-parallel send to rank {self.peer} failed") from self.error
        msg.tokens = msg.tokens.contiguous()
        self.bytes += msg.tokens.numel() * msg.tokens.element_size()
        if msg.kv is not None:
            msg.kv = msg.kv.contiguous()
            self.bytes += msg.kv.numel() * msg.kv.element_size()
        self.queue.put(msg)
        self.messages += 1
        self.enqueue_seconds += time.perf_counter() - t0

    def close(self) -> float:
        """Wait until every message is sent; -> seconds waited."""
        t0 = time.perf_counter()
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"context-parallel send to rank {self.peer} failed") from self.error
        return time.perf_counter() - t0


class Inbox:
    """Background receiver of the stream from rank r-1: ``poll()`` returns the messages that
    arrived (never blocks), ``wait()`` blocks for at least one. Stops after the ``last`` one."""

    def __init__(self, group, peer: int, batch: int, channels: int, kv_shape: tuple[int, ...],
                 dtype: torch.dtype):
        self.group, self.peer = group, peer
        self.batch, self.channels, self.kv_shape, self.dtype = batch, channels, kv_shape, dtype
        self.queue: queue.Queue = queue.Queue()
        self.seconds = 0.0  # time the receiver thread spent inside receives (overlapped)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                header = torch.zeros(_HEADER, dtype=torch.long)
                dist.recv(header, self.peer, group=self.group)
                t0 = time.perf_counter()
                final_len, kv_from, kv_to, token_len, last = header.tolist()
                tokens = torch.empty(self.batch, token_len, self.channels, dtype=self.dtype)
                dist.recv(tokens, self.peer, group=self.group)
                kv = None
                if kv_to > kv_from:
                    layers2, bkv, heads, dim = self.kv_shape
                    kv = torch.empty(layers2, kv_to - kv_from, bkv, heads, dim, dtype=self.dtype)
                    dist.recv(kv, self.peer, group=self.group)
                self.seconds += time.perf_counter() - t0
                self.queue.put(Message(final_len, kv_from, kv_to, tokens, kv, bool(last)))
                if last:
                    return
        except Exception as exc:  # noqa: BLE001 - surfaced to the compute loop
            self.queue.put(exc)

    def _check(self, item):
        if isinstance(item, Exception):
            raise RuntimeError(f"context-parallel receive from rank {self.peer} failed") from item
        return item

    def poll(self) -> list[Message]:
        out = []
        while True:
            try:
                out.append(self._check(self.queue.get_nowait()))
            except queue.Empty:
                return out

    def wait(self, timeout: float = 1800.0) -> list[Message]:
        try:
            first = self._check(self.queue.get(timeout=timeout))
        except queue.Empty:
            raise RuntimeError(f"no message from context-parallel rank {self.peer} in "
                               f"{timeout:.0f} s") from None
        return [first] + self.poll()


_PAIR_GROUPS: dict[tuple[int, ...], list] = {}


def pair_groups(ranks: list[int]) -> list:
    """One two-rank gloo group per consecutive pair of ``ranks`` (collective: every rank of the
    world calls it with the same list); cached per rank list."""
    key = tuple(ranks)
    if key not in _PAIR_GROUPS:
        _PAIR_GROUPS[key] = [dist.new_group([ranks[i], ranks[i + 1]], backend="gloo")
                             for i in range(len(ranks) - 1)]
    return _PAIR_GROUPS[key]


# ------------------------------------------------------------------------------ training attention

class _GatherSequence(torch.autograd.Function):
    """All-gather equal-length ``[L, ...]`` slices along dim 0. Backward: the grad of this rank's
    slice is the sum over ranks of their grads of it (all-reduce, keep own slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank, ctx.length = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.length
        return grad[start:start + ctx.length], None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def layout_mask_fn(layout: SlotLayout, kind: str = "causal", ahead: int = 1):
    """Allowed-matrix function of (query slots, key slots) for a layout: the frame-causal mask
    with the layout's window (flow blocks) or the denoiser's mask with ``ahead`` frames of
    look-ahead."""
    slot, frame, is_text = layout.labels()

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if kind == "causal":
            return masks.frame_causal(slot[q], slot[k], frame[q], frame[k], is_text[k], layout.window)
        return masks.lookahead(frame[q], frame[k], is_text[k], layout.window, ahead)

    return fn


class ContextParallelAttention:
    """Context manager: while active, the core attention of every layer of ``stack`` all-gathers
    K/V over ``group`` and applies the global mask. ``slots_per_rank[i]`` are the global slot
    indices of rank i's local sequence, in order; this rank's are ``slots_per_rank[rank]``.
    ``mask_fn`` is one mask function for every layer, or a list with one per layer (the
    denoiser's first layer looks further ahead than the others)."""

    def __init__(self, stack, slots_per_rank: list[torch.Tensor], mask_fn, group):
        self.stack, self.group = stack, group
        self.mask_fns = mask_fn if isinstance(mask_fn, (list, tuple)) else None
        self.mask_fn = None if self.mask_fns else mask_fn
        self.rank = dist.get_rank(group)
        self.slots = slots_per_rank
        tp = stack.tp if stack.sp else 1
        # Each rank's local sequence as the core attention sees it (padded to a multiple of tp
        # under SP); slices are gathered padded to the longest.
        self.padded = [len(s) + (-len(s)) % tp for s in slots_per_rank]
        self.length = max(self.padded)
        self._masks: dict = {}
        self._saved = []

    def _mask(self, queries: int, device, layer: int = 0) -> torch.Tensor:
        fn = self.mask_fns[layer] if self.mask_fns else self.mask_fn
        key = (queries, id(fn), str(device))
        if key not in self._masks:
            real = self.slots[self.rank]
            allowed = torch.zeros(queries, len(self.slots) * self.length, dtype=torch.bool)
            for i, keys in enumerate(self.slots):
                lo = i * self.length
                allowed[:len(real), lo:lo + len(keys)] = fn(real, keys)
            allowed[len(real):] = True  # pad queries: outputs dropped; no all-masked rows (NaN)
            self._masks[key] = allowed.to(device)
        return self._masks[key]

    def _forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                 attention_bias=None, packed_seq_params=None, *, module=None, layer=0):
        import torch.nn.functional as F

        pad = self.length - key.shape[0]
        if pad:
            key = torch.cat([key, key.new_zeros(pad, *key.shape[1:])])
            value = torch.cat([value, value.new_zeros(pad, *value.shape[1:])])
        key, value = gather_sequence(key, self.group), gather_sequence(value, self.group)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        allowed = self._mask(query.shape[0], query.device, layer)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=module.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def __enter__(self):
        for i, m in enumerate(self.stack.core_attentions()):
            m.forward = lambda *a, _m=m, _i=i, **kw: self._forward(*a, module=_m, layer=_i, **kw)
            self._saved.append(m)
        return self

    def __exit__(self, *exc):
        for m in self._saved:
            del m.forward  # back to the class's forward
        self._saved = []
        return False


def _rank_slots(layout: SlotLayout, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Global slot indices of each rank's local sequence: rank 0 holds the text prefix."""
    hw, text = layout.tokens_per_frame, layout.text_len
    out = []
    for i, (a, b) in enumerate(ranges):
        slots = torch.arange(text + a * hw, text + b * hw)
        if i == 0 and text:
            slots = torch.cat([torch.arange(text), slots])
        out.append(slots)
    return out


def cp_deep_forward(block, x_local: torch.Tensor, prev_token: torch.Tensor | None,
                    layout: SlotLayout, text: torch.Tensor | None, ranges: list[tuple[int, int]],
                    group) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward (data -> noise) of a causal flow block on this rank's frames.

    ``x_local`` [B, (b-a)*hw, C]: tokens of frames ``ranges[rank]``; ``prev_token`` [B, 1, C]: the
    token just before them (None on rank 0, which reads sos and holds the text). Returns this
    rank's z and its part of the log-det (sum over its tokens); the sum over ranks of the
    log-dets (and the concatenation of z) equals ``block(x, layout, text)``."""
    rank = dist.get_rank(group)
    a, _ = ranges[rank]
    start = a * layout.tokens_per_frame
    shifted = x_local[:, :-1] if prev_token is None else torch.cat([prev_token, x_local[:, :-1]], 1)
    if prev_token is None:
        shifted = torch.cat([x_local[:, :1], shifted], dim=1)  # row 0 becomes sos
    h = block.video_inputs(shifted, start)
    slots_all = _rank_slots(layout, ranges)
    slots = slots_all[rank]
    n_text = 0
    if rank == 0 and layout.text_len:
        h = torch.cat([block.proj_txt(text.to(h.dtype)), h], dim=1)
        n_text = layout.text_len
    angles = layout.angles(*block.rope)[slots].to(h.device)
    dummy = torch.ones(len(slots), len(slots), dtype=torch.bool, device=h.device)
    with ContextParallelAttention(block.transformer, slots_all, layout_mask_fn(layout), group):
        h = block.transformer(h, dummy, angles)
    b, log_sigma = block.head(h[:, n_text:])
    z = (x_local - b) * torch.exp(-log_sigma)
    return z, -log_sigma.flatten(1).sum(1)


def _cp_flow_terms(model, tokens: torch.Tensor, text: torch.Tensor, group,
                   ranges: list[tuple[int, int]] | None = None):
    """(local share of the batch-mean loss, its all-reduced value, per-sample local shares)."""
    b, t, h, w, c = tokens.shape
    ranges = ranges or frame_split(t, dist.get_world_size(group))
    rank = dist.get_rank(group)
    a, e = ranges[rank]
    hw, dims = h * w, t * h * w * c
    u, logdet = tokens[:, a:e], tokens.new_zeros(b)
    for i in range(len(model.blocks) - 1):
        u, ld = model.shallow_forward(i, u)
        logdet = logdet + ld
    prev = None
    if a > 0:
        p = tokens[:, a - 1:a]
        for i in range(len(model.blocks) - 1):
            p, _ = model.shallow_forward(i, p)
        prev = p.reshape(b, hw, c)[:, -1:]
    z, ld = cp_deep_forward(model.deep_block, u.reshape(b, (e - a) * hw, c), prev,
                            model.deep_layout(t, h, w), text, ranges, group)
    logdet = logdet + ld
    dtype = torch.promote_types(z.dtype, torch.float32)  # loss sums in fp32 (bf16 models)
    per_sample = 0.5 * z.to(dtype).flatten(1).pow(2).sum(1) / dims - logdet.to(dtype) / dims
    local = per_sample.mean()
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local, total, per_sample


def cp_flow_nll(model, tokens: torch.Tensor, text: torch.Tensor, group,
                ranges: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the flow loss ``model(tokens, text).nll_per_dim().mean()``.

    Every rank gets the full batch; it runs the shallow (per-frame) blocks on its own frames (and,
    without log-det, on the frame before them, whose last token its first deep slot reads) and the
    deep block with context-parallel attention. Returns (local loss: backward this one, then
    ``allreduce_cp_grads``; total loss: the all-reduced value, detached)."""
    local, total, _ = _cp_flow_terms(model, tokens, text, group, ranges)
    return local, total


@torch.no_grad()
def cp_flow_nll_per_sample(model, tokens: torch.Tensor, text: torch.Tensor, group,
                           ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``model(tokens, text).nll_per_dim()`` (per sample), computed context-parallel; the same
    on every rank of the group."""
    _, _, per_sample = _cp_flow_terms(model, tokens, text, group, ranges)
    per_sample = per_sample.clone()
    dist.all_reduce(per_sample, group=group)
    return per_sample


def cp_denoise_score(denoiser, tokens_local: torch.Tensor, layout: SlotLayout,
                     text: torch.Tensor, ranges: list[tuple[int, int]], group) -> torch.Tensor:
    """The FSM denoiser's output for this rank's frames ``ranges[rank]`` (``tokens_local``
    [B, (b-a)*hw, C]); rank 0 holds the text prefix. Equals the slice of
    ``denoiser(tokens, layout, text)`` for those frames: every layer all-gathers K/V, the first
    layer under the one-frame look-ahead mask and later ones under the look-ahead of the
    denoiser's mode (``every_layer``: 1 frame, ``first_layer``: 0)."""
    rank = dist.get_rank(group)
    slots_all = _rank_slots(layout, ranges)
    slots = slots_all[rank]
    dtype = denoiser.proj_in.weight.dtype
    h = denoiser.proj_in(tokens_local.to(dtype))
    n_text = 0
    if rank == 0 and layout.text_len:
        h = torch.cat([denoiser.proj_txt(text.to(dtype)), h], dim=1)
        n_text = layout.text_len
    angles = layout.angles(*denoiser.rope)[slots].to(h.device)
    layers = len(denoiser.transformer.core_attentions())
    later = 1 if denoiser.lookahead == "every_layer" else 0
    first_fn, later_fn = layout_mask_fn(layout, "lookahead", 1), layout_mask_fn(layout, "lookahead", later)
    fns = [first_fn] + [later_fn] * (layers - 1)
    dummy = torch.ones(len(slots), len(slots), dtype=torch.bool, device=h.device)
    with ContextParallelAttention(denoiser.transformer, slots_all, fns, group):
        h = denoiser.transformer(h, dummy, angles)
    out = denoiser.proj_out(denoiser.final_norm(h[:, n_text:]))
    if denoiser.output_scale != 1.0:
        out = out * denoiser.output_scale
    return out.to(torch.promote_types(out.dtype, tokens_local.dtype))


def allreduce_cp_grads(parameters, group) -> None:
    """Sum the partial parameter grads of the CP ranks (each holds the grads through its slice).
    A parameter some ranks never used (rank 0 alone holds the text projection and sos) has no
    grad there: it gets zeros first, so every rank reduces the same tensors (one flat buffer per
    dtype). Parameters without a grad on every rank are left alone."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=params[0].device)  # NCCL reduces device tensors only
    dist.all_reduce(has, group=group)
    chosen = [p for p, h in zip(params, has.tolist()) if h]
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in chosen:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def context_parallel_group():
    """Megatron's context-parallel group when it was initialised with cp > 1 (ranks of the same
    TP rank), else the whole world."""
    from megatron.core import parallel_state

    if (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_context_parallel_world_size() > 1):
        return parallel_state.get_context_parallel_group()
    return dist.group.WORLD
