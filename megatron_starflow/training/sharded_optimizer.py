"""``ShardedAdamW``: megatron's DistributedOptimizer recipe over plain torch collectives.

Megatron-core's ``DistributedDataParallel`` and ``DistributedOptimizer`` accept only CUDA tensors.
This is the same recipe written against plain ``nn.Parameter``s and explicit process groups, so it
runs on CPU (gloo) and on CUDA (NCCL) with one code path:

* **fp32 gradient accumulation.** Every parameter gets ``main_grad``, a view into one flat buffer of
  ``main_dtype`` (megatron DDP's grad buffer). A post-accumulate-grad hook adds ``p.grad`` (bf16 or
  fp32) into it and frees ``p.grad``, so micro-batch accumulation happens in fp32 whatever the
  parameter dtype. ``zero_grad()`` zeroes the buffer.
* **Gradient averaging.** ``reduce_grads()`` averages the buffer over ``shard_group`` (the data x
  context parallel ranks) with ONE in-place collective (SUM then scale: gloo has no AVG). It is an
  all-reduce rather than megatron's reduce-scatter because ``main_grad`` must stay a parameter-shaped
  view (hooks, sequence-parallel reductions and fault tests write into it) while the optimizer shards
  by rows: a reduce-scatter would need a rank-major copy of the whole buffer.
* **Sharded optimizer state.** Each parameter's (TP-local) tensor is split along dim 0 over the
  ``shard_group`` ranks with ``torch.chunk`` semantics (rank r owns rows ``[r*c, min(n, (r+1)*c))``,
  ``c = ceil(n / dp)``; the split DTensor ``Shard(0)`` uses); 0-d tensors count as one row, owned by
  shard rank 0. A rank keeps AdamW's ``exp_avg`` / ``exp_avg_sq`` (``main_dtype``) for its rows
  only, and an fp32 master copy of its rows where the parameter is not already ``main_dtype`` (with
  fp32 parameters the master rows ARE the parameter's rows, as in megatron).
  Bytes per parameter on one rank (``local_bytes``), matching ``parallel.memory.static_bytes_per_param(
  dp, distributed_optimizer=True, bf16)``: bf16 params 2 + main grads 4 + master 4/dp + moments 8/dp;
  fp32 params 4 + 4 + 8/dp. (Transient during ``step``: one gather buffer of the parameters' dtype
  the size of the parameters, like megatron's param all-gather buffer.)
* **Norms and clipping.** ``grad_norms()`` returns, per named group, the global L2 norm of the
  averaged main grads: a float64 sum of squares over this rank's OWN rows (so DP/CP replicas count
  once by construction) of the parameters for which ``counts_in_norm(p)`` is true (the caller makes
  it false for TP-replicated parameters on tp_rank != 0: megatron's duplicate rule), all-reduced over
  ``norm_group`` (default: the whole world, which also sums the pipeline stages). Every rank gets
  every group's norm (also groups that live on another pipeline stage), so skip decisions agree.
* **Step.** ``step(lrs, clip)`` scales each group's own-row grads by ``max/(norm+1e-6)`` when that is
  < 1 (``clip_grad_norm_``'s rule), applies AdamW to the master rows with exactly the operations of
  ``torch.optim.AdamW(foreach=False)`` (decoupled weight decay, bias correction, per-group step
  counter), then all-gathers the updated rows over ``shard_group`` (equal-size segments, one flat
  ``all_gather_into_tensor`` per parameter dtype) and copies them into the parameters (cast to their
  dtype; at most two strided copies per parameter whatever dp). Skipping a step is not calling
  ``step``.
* **Checkpoints.** ``sharded_state_dict()`` describes master rows and moments as DTensors over a
  (tp, shard) DeviceMesh with placements ``(Shard(partition_dim) | Replicate(), Shard(0))`` (tp outer,
  shard inner: a TP-sharded tensor is first split over TP ranks, then each TP piece by rows over the
  shard ranks, exactly the nesting above), so torch.distributed.checkpoint reshards them on load into
  any other (tp, dp) layout. ``model_sharded_state_dict`` does the same for the weights (replicated
  over the shard dim). DTensors wrap this rank's own storage, so a DCP load writes in place.

Groups are ``[{"name": "flow", "params": [(fqn, param), ...], "weight_decay": optional}, ...]``, fqn
being the parameter's name in the full one-process model (pipeline stages use global names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

# ------------------------------------------------------------------------------ helpers


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _size(group) -> int:
    """Size of ``group``; None means "no such parallel dimension" (size 1), not the world."""
    return dist.get_world_size(group) if _dist() and group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if _dist() and group is not None else 0


def chunk_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of chunk ``index`` when ``rows`` rows are split into ``parts`` with
    ``torch.chunk`` semantics (= DTensor ``Shard``): chunks of ``ceil(rows / parts)``, the last ones
    shorter or empty."""
    c = -(-rows // parts) if rows else 0
    lo = min(rows, index * c)
    return lo, min(rows, lo + c)


def partition_dim(param: torch.Tensor) -> int | None:
    """Megatron's TP split dim of ``param`` (``tensor_model_parallel`` + ``partition_dim``)."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim", 0))
    return None


def _default_tp_group():
    """Megatron's TP group when parallel_state is initialised, else None (TP size 1)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return None
    if _dist() and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def _default_shard_group():
    """Megatron's data x context parallel group when parallel_state is initialised, else the whole
    world (pure data parallelism); None without torch.distributed."""
    if not _dist():
        return None
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return dist.group.WORLD
    if ps.model_parallel_is_initialized():
        return ps.get_data_parallel_group(with_context_parallel=True)
    return dist.group.WORLD


_SELF_GROUPS: dict = {}


def _self_group(*candidates):
    """A one-rank process group holding only this rank (for a mesh with no parallel dim): one of
    ``candidates`` of size 1 if given, else a new one (only this rank takes part in creating it)."""
    for g in candidates:
        if g is not None and dist.get_world_size(g) == 1:
            return g
    if dist.get_world_size() == 1:
        return dist.group.WORLD
    rank = dist.get_rank()
    if rank not in _SELF_GROUPS:
        _SELF_GROUPS[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _SELF_GROUPS[rank]


@dataclass
class MeshInfo:
    """Where this rank's tensors sit for DTensor / DCP: a DeviceMesh over (tp, shard) (dims of size 1
    dropped) and the sizes/ranks. ``mesh`` is None without torch.distributed (plain tensors)."""

    tp_size: int
    tp_rank: int
    shard_size: int
    shard_rank: int
    mesh: object = None
    dims: tuple[str, ...] = ()

    @classmethod
    def build(cls, tp_group, shard_group, device_type: str) -> "MeshInfo":
        """Collective over ``tp_group`` when its size is > 1 (all-gathers the shard groups' ranks to
        lay out the 2-D mesh)."""
        tp_size, shard_size = _size(tp_group), _size(shard_group)
        info = cls(tp_size, _rank(tp_group), shard_size, _rank(shard_group))
        if not _dist():
            return info
        from torch.distributed.device_mesh import DeviceMesh

        shard_ranks = dist.get_process_group_ranks(shard_group) if shard_group is not None else [dist.get_rank()]
        if tp_size > 1 and shard_size > 1:
            grid: list = [None] * tp_size
            dist.all_gather_object(grid, shard_ranks, group=tp_group)
            info.mesh = DeviceMesh.from_group([tp_group, shard_group], device_type, mesh=grid,
                                              mesh_dim_names=("tp", "shard"))
            info.dims = ("tp", "shard")
        elif tp_size > 1:
            info.mesh = DeviceMesh.from_group(tp_group, device_type, mesh_dim_names=("tp",))
            info.dims = ("tp",)
        elif shard_size > 1:
            info.mesh = DeviceMesh.from_group(shard_group, device_type, mesh_dim_names=("shard",))
            info.dims = ("shard",)
        else:
            info.mesh = DeviceMesh.from_group(_self_group(tp_group, shard_group), device_type,
                                              mesh_dim_names=("shard",))
            info.dims = ("shard",)
        return info

    def placements(self, tp_dim: int | None, sharded_rows: bool) -> tuple:
        from torch.distributed.tensor import Replicate, Shard

        out = []
        for d in self.dims:
            if d == "tp":
                out.append(Shard(tp_dim) if tp_dim is not None else Replicate())
            else:
                out.append(Shard(0) if sharded_rows else Replicate())
        return tuple(out)

    def global_shape(self, local_shape: tuple[int, ...], tp_dim: int | None) -> tuple[int, ...]:
        shape = list(local_shape)
        if tp_dim is not None and self.tp_size > 1:
            shape[tp_dim] *= self.tp_size
        return tuple(shape)

    def dtensor(self, local: torch.Tensor, full_local_shape: tuple[int, ...], tp_dim: int | None,
                sharded_rows: bool):
        """A DTensor view of ``local``: the rows this rank owns (``sharded_rows``) or the whole
        TP-local tensor of shape ``full_local_shape``; plain tensors without torch.distributed."""
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        shape = self.global_shape(full_local_shape, tp_dim)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local, self.mesh, self.placements(tp_dim, sharded_rows),
                                  run_check=False, shape=torch.Size(shape), stride=stride)


def model_sharded_state_dict(named_params: Iterable[tuple[str, torch.Tensor]], mesh_info: MeshInfo | None = None,
                             prefix: str = "model.", tp_group=None, shard_group=None) -> dict:
    """``{prefix + fqn: DTensor}`` of the weights in their own dtype: TP placement from megatron's
    attributes, replicated over the shard dim. The DTensors wrap the parameters' storage (a DCP load
    into them writes the parameters in place). Collective over the TP group if ``mesh_info`` is not
    given and TP > 1."""
    named_params = list(named_params)
    if mesh_info is None:
        device = named_params[0][1].device.type if named_params else "cpu"
        tp_group = tp_group if tp_group is not None else _default_tp_group()
        shard_group = shard_group if shard_group is not None else _default_shard_group()
        mesh_info = MeshInfo.build(tp_group, shard_group, device)
    out = {}
    for fqn, p in named_params:
        t = p.detach()
        out[prefix + fqn] = mesh_info.dtensor(t, tuple(t.shape), partition_dim(p), sharded_rows=False)
    return out


def _local(value) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _copy_into(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if dst.data_ptr() == src.data_ptr() and dst.shape == src.shape and dst.dtype == src.dtype:
        return  # the DCP load already wrote into our storage
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{key}: shape {tuple(src.shape)} in the state dict, {tuple(dst.shape)} here")
    dst.copy_(src)


def load_model_sharded_state_dict(named_params: Iterable[tuple[str, torch.Tensor]], sd: dict,
                                  prefix: str = "model.") -> None:
    """Copy ``sd[prefix + fqn]`` (a DTensor of this layout, as ``model_sharded_state_dict`` built it
    and ``sharded_checkpoint.load`` filled it, or a plain TP-local tensor) into each parameter."""
    missing = [prefix + fqn for fqn, _ in named_params if prefix + fqn not in sd]
    if missing:
        raise KeyError(f"{len(missing)} model tensors missing from the checkpoint, e.g. {missing[:5]}")
    with torch.no_grad():
        for fqn, p in named_params:
            _copy_into(p.detach(), _local(sd[prefix + fqn]), prefix + fqn)


# ------------------------------------------------------------------------------ the optimizer


@dataclass
class _Entry:
    group: str
    fqn: str
    param: nn.Parameter
    shape: tuple[int, ...]  # TP-local shape; 0-d parameters as (1,)
    rows: int
    row_numel: int
    lo: int
    hi: int
    tp_dim: int | None
    _dp: int  # shard group size
    grad_offset: int  # into the flat main-grad buffer
    own_offset: int  # into this rank's flat moment buffers
    master_offset: int | None  # into the flat master buffer; None: the master rows are the param's
    gather_offset: int = 0  # in every shard rank's segment of the dtype bucket (same for all ranks)

    @property
    def chunk(self) -> int:
        """Rows of a full chunk (shard rank 0's rows)."""
        return chunk_rows(self.rows, self._dp, 0)[1]

    @property
    def own_numel(self) -> int:
        return (self.hi - self.lo) * self.row_numel

    def rows_of(self, tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return tensor.view(self.shape)[lo:hi]


GATHER_BUCKET_NUMEL = 40_000_000  # parameters per all-gather of updated rows


class ShardedAdamW:
    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, shard_group=None, norm_group=None,
                 counts_in_norm: Callable[[torch.Tensor], bool] | None = None,
                 main_dtype: torch.dtype = torch.float32, tp_group=None):
        """Collective over ``norm_group`` (group names) and over the TP group (mesh layout): every
        rank constructs its optimizer at the same time. ``shard_group`` None: megatron's data x context
        parallel group when parallel_state is initialised, else the whole world (pure data
        parallelism), or no sharding without torch.distributed. ``tp_group``
        None: megatron's TP group when parallel_state is initialised (only used to describe
        checkpoints)."""
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.main_dtype = main_dtype
        self.shard_group = shard_group if shard_group is not None else _default_shard_group()
        self.norm_group = norm_group if norm_group is not None else (dist.group.WORLD if _dist() else None)
        self.tp_group = tp_group if tp_group is not None else _default_tp_group()
        self.counts_in_norm = counts_in_norm or (lambda p: True)
        self.dp, self.dp_rank = _size(self.shard_group), _rank(self.shard_group)
        self.groups = [{"name": g["name"], "params": list(g["params"]),
                        "weight_decay": float(g.get("weight_decay", self.weight_decay))} for g in groups]
        self.group_steps = {g["name"]: 0 for g in self.groups}

        params = [p for g in self.groups for _, p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in the optimizer's groups")
        fqns = [f for g in self.groups for f, _ in g["params"]]
        if len(set(fqns)) != len(fqns):
            raise ValueError("two parameters share a name in the optimizer's groups")
        self.device = params[0].device if params else torch.device("cpu")

        # Layout: main grads in parameter order; own rows (moments, master) in parameter order.
        self.entries: list[_Entry] = []
        grad_n = own_n = master_n = 0
        for g in self.groups:
            for fqn, p in g["params"]:
                shape = tuple(p.shape) if p.dim() else (1,)
                rows = shape[0]
                row_numel = math.prod(shape[1:])
                lo, hi = chunk_rows(rows, self.dp, self.dp_rank)
                alias = p.dtype == main_dtype
                e = _Entry(g["name"], fqn, p, shape, rows, row_numel, lo, hi, partition_dim(p), self.dp,
                           grad_n, own_n, None if alias else master_n)
                grad_n += p.numel()
                own_n += e.own_numel
                if not alias:
                    master_n += e.own_numel
                self.entries.append(e)
        dev = self.device
        self._grad_buffer = torch.zeros(grad_n, dtype=main_dtype, device=dev)
        self._exp_avg = torch.zeros(own_n, dtype=main_dtype, device=dev)
        self._exp_avg_sq = torch.zeros(own_n, dtype=main_dtype, device=dev)
        self._master = torch.zeros(master_n, dtype=main_dtype, device=dev)

        # Gather layout per parameter dtype: every rank's segment holds its rows of every param at
        # the same offset, room for a full chunk (ceil(rows/dp) rows) each, so the gathered buffer
        # viewed as [dp, segment] holds a parameter's chunks as one strided block (<= 2 copies per
        # parameter to publish, whatever dp). Shard rank 0 always holds full chunks: no padding
        # beyond the longest rank's rows.
        # Buckets of at most ``GATHER_BUCKET_NUMEL`` parameters (as megatron's buckets) bound the
        # transient gather buffer: at 7B a single bucket would hold every parameter once more.
        self._buckets: dict[tuple[torch.dtype, int], dict] = {}
        current: dict[torch.dtype, int] = {}
        for e in self.entries:
            index = current.setdefault(e.param.dtype, 0)
            b = self._buckets.setdefault((e.param.dtype, index), {"entries": [], "segment": 0, "numel": 0})
            b["entries"].append(e)
            e.gather_offset = b["segment"]
            b["segment"] += e.chunk * e.row_numel
            b["numel"] += e.param.numel()
            if b["numel"] >= GATHER_BUCKET_NUMEL:
                current[e.param.dtype] = index + 1

        self._hooks = []
        self._by_fqn = {e.fqn: e for e in self.entries}
        for e in self.entries:
            e.param.main_grad = self._grad_buffer[e.grad_offset:e.grad_offset + e.param.numel()].view(e.param.shape)
            if e.param.requires_grad:
                self._hooks.append(e.param.register_post_accumulate_grad_hook(self._accumulate_hook))
        self.sync_master_from_model()

        # Every rank must know every group's name (pipeline stages may lack a group).
        names = sorted(g["name"] for g in self.groups)
        if _size(self.norm_group) > 1:
            gathered: list = [None] * _size(self.norm_group)
            dist.all_gather_object(gathered, names, group=self.norm_group)
            names = sorted({n for part in gathered for n in part})
        self.all_group_names = names
        self._norms: dict[str, float] | None = None
        self.mesh_info = MeshInfo.build(self.tp_group, self.shard_group, dev.type)

    def close(self) -> None:
        """Remove the grad hooks and the ``main_grad`` attributes (the optimizer is unusable after)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for e in self.entries:
            if hasattr(e.param, "main_grad"):
                del e.param.main_grad

    # ------------------------------------------------------------------ views
    def _master_rows(self, e: _Entry) -> torch.Tensor:
        if e.master_offset is None:
            return e.rows_of(e.param.data, e.lo, e.hi)
        return self._master[e.master_offset:e.master_offset + e.own_numel].view(e.hi - e.lo, *e.shape[1:])

    def _moment_rows(self, buf: torch.Tensor, e: _Entry) -> torch.Tensor:
        return buf[e.own_offset:e.own_offset + e.own_numel].view(e.hi - e.lo, *e.shape[1:])

    def _grad_rows(self, e: _Entry) -> torch.Tensor:
        return e.rows_of(e.param.main_grad, e.lo, e.hi)

    def master_rows(self, fqn: str) -> torch.Tensor:
        """This rank's fp32 master rows of parameter ``fqn`` (for tests and checks)."""
        return self._master_rows(self._entry(fqn))

    def state_rows(self, fqn: str) -> dict[str, torch.Tensor]:
        """This rank's rows of parameter ``fqn``: ``master``, ``exp_avg``, ``exp_avg_sq`` (views)
        and ``rows`` = (lo, hi) of the (TP-local) tensor."""
        e = self._entry(fqn)
        return {"master": self._master_rows(e), "exp_avg": self._moment_rows(self._exp_avg, e),
                "exp_avg_sq": self._moment_rows(self._exp_avg_sq, e), "rows": (e.lo, e.hi)}

    def rows_dtensor(self, fqn: str, rows: torch.Tensor):
        """``rows`` (this rank's rows of parameter ``fqn``, e.g. an EMA kept like the master) as
        the DTensor a checkpoint stores, laid out as the master rows."""
        e = self._entry(fqn)
        return self.mesh_info.dtensor(rows, e.shape, e.tp_dim, True)

    def owned_rows(self, fqn: str) -> tuple[int, int]:
        e = self._entry(fqn)
        return e.lo, e.hi

    def _entry(self, fqn: str) -> _Entry:
        return self._by_fqn[fqn]

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """(Re)initialise the master rows from the model parameters (after loading weights into the
        model some other way than ``load_sharded_state_dict``)."""
        for e in self.entries:
            if e.master_offset is not None:
                self._master_rows(e).copy_(e.rows_of(e.param.data, e.lo, e.hi))

    # ------------------------------------------------------------------ gradients
    @staticmethod
    @torch.no_grad()
    def _accumulate_hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            p.main_grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move any ``p.grad`` left outside backward's hook (set by hand, or by
        ``torch.autograd.backward(inputs=...)``) into ``main_grad``."""
        for e in self.entries:
            self._accumulate_hook(e.param)

    def zero_grad(self) -> None:
        self._grad_buffer.zero_()
        for e in self.entries:
            e.param.grad = None
        self._norms = None

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Average the main grads over ``shard_group`` (one flat in-place collective)."""
        self.accumulate_grads()
        self._norms = None
        if self.dp > 1 and self._grad_buffer.numel():
            dist.all_reduce(self._grad_buffer, op=dist.ReduceOp.SUM, group=self.shard_group)
            self._grad_buffer.mul_(1.0 / self.dp)

    @torch.no_grad()
    def grad_norms(self) -> dict[str, float]:
        """Global L2 norm of each group's averaged main grads (collective over ``norm_group``), for
        every group name known on any rank of ``norm_group``. Each rank sums its OWN rows only, so
        data- and context-parallel replicas are already counted once: ``counts_in_norm`` must
        exclude only TP duplicates (TP-replicated params on tp_rank != 0), never DP/CP ranks."""
        index = {n: i for i, n in enumerate(self.all_group_names)}
        sums = torch.zeros(len(index), dtype=torch.float64, device=self.device)
        for e in self.entries:
            if e.hi > e.lo and self.counts_in_norm(e.param):
                sums[index[e.group]] += torch.linalg.vector_norm(self._grad_rows(e), 2, dtype=torch.float64).square()
        if _size(self.norm_group) > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.norm_group)
        self._norms = dict(zip(self.all_group_names, sums.sqrt().tolist()))
        return dict(self._norms)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, lrs: dict[str, float], clip: dict[str, float] | None = None) -> None:
        """Clip (per group, by its global norm), AdamW on the own rows, all-gather into the model.
        ``clip[name]`` None or <= 0: no clipping for that group. Collective over ``shard_group``
        (and over ``norm_group`` when clipping needs norms ``grad_norms`` has not computed yet)."""
        missing = [g["name"] for g in self.groups if g["name"] not in lrs]
        if missing:
            raise KeyError(f"no learning rate for optimizer group(s) {missing}")
        clip = clip or {}
        coefs = {}
        if any(v is not None and v > 0 for v in clip.values()):
            norms = self._norms if self._norms is not None else self.grad_norms()
            for name, max_norm in clip.items():
                if max_norm is not None and max_norm > 0 and name in norms:
                    coefs[name] = min(1.0, float(max_norm) / (norms[name] + 1e-6))
        b1, b2 = self.betas
        for g in self.groups:
            name = g["name"]
            self.group_steps[name] += 1
            step = self.group_steps[name]
            lr, wd = float(lrs[name]), g["weight_decay"]
            coef = coefs.get(name, 1.0)
            bias_correction1 = 1 - b1 ** step
            bias_correction2 = 1 - b2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            for e in self.entries:
                if e.group != name or e.hi == e.lo:
                    continue
                grad = self._grad_rows(e)
                if coef < 1.0:
                    grad.mul_(coef)
                master = self._master_rows(e)
                exp_avg, exp_avg_sq = self._moment_rows(self._exp_avg, e), self._moment_rows(self._exp_avg_sq, e)
                if wd != 0:
                    master.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                master.addcdiv_(exp_avg, denom, value=-step_size)
        self._norms = None
        self._publish()

    @torch.no_grad()
    def _publish(self) -> None:
        """Copy the master rows into the model: all-gather every rank's rows (one flat collective
        per parameter dtype, equal-size segments)."""
        for (dtype, _), b in self._buckets.items():
            entries, seg = b["entries"], b["segment"]
            if self.dp == 1:
                for e in entries:
                    if e.master_offset is not None:
                        e.rows_of(e.param.data, 0, e.rows).copy_(self._master_rows(e))
                continue
            if seg == 0:
                continue
            send = torch.zeros(seg, dtype=dtype, device=self.device)
            for e in entries:
                if e.hi > e.lo:
                    send[e.gather_offset:e.gather_offset + e.own_numel].view(e.hi - e.lo, *e.shape[1:]).copy_(
                        self._master_rows(e))
            out = torch.empty(seg * self.dp, dtype=dtype, device=self.device)
            dist.all_gather_into_tensor(out, send, group=self.shard_group)
            del send
            grid = out.view(self.dp, seg)
            for e in entries:
                c = e.chunk
                if c == 0:
                    continue
                flat = e.param.data.view(e.rows, e.row_numel)
                n_full = e.rows // c  # ranks holding a full chunk
                width = c * e.row_numel
                block = grid[:n_full, e.gather_offset:e.gather_offset + width]
                flat[:n_full * c].view(n_full, width).copy_(block)
                rest = e.rows - n_full * c  # the one shorter chunk, if any
                if rest:
                    flat[n_full * c:].view(-1).copy_(grid[n_full, e.gather_offset:e.gather_offset + rest * e.row_numel])

    # ------------------------------------------------------------------ memory
    def local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``master`` (separate fp32 copies of own rows), ``moments``
        (exp_avg + exp_avg_sq of own rows), ``main_grads`` (full), ``model_params`` (the
        parameters in their dtype), ``params`` (parameters + master, the estimator's "params"),
        ``numel`` (parameters)."""
        def nbytes(t):
            return t.numel() * t.element_size()

        model = sum(nbytes(e.param) for e in self.entries)
        out = {"master": nbytes(self._master), "moments": nbytes(self._exp_avg) + nbytes(self._exp_avg_sq),
               "main_grads": nbytes(self._grad_buffer), "model_params": model,
               "numel": sum(e.param.numel() for e in self.entries)}
        out["params"] = out["model_params"] + out["master"]
        out["total"] = out["params"] + out["main_grads"] + out["moments"]
        return out

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, mesh_info: MeshInfo | None = None) -> dict:
        """``optim.<group>.<fqn>.{master,exp_avg,exp_avg_sq}`` as DTensors over the (tp, shard)
        mesh (placements ``(Shard(partition_dim) | Replicate(), Shard(0))``; 0-d parameters as one
        row), wrapping this rank's storage; ``optim.<group>.step`` as a plain int64 tensor."""
        info = mesh_info or self.mesh_info
        out = {}
        for e in self.entries:
            key = f"optim.{e.group}.{e.fqn}"
            out[key + ".master"] = info.dtensor(self._master_rows(e), e.shape, e.tp_dim, True)
            out[key + ".exp_avg"] = info.dtensor(self._moment_rows(self._exp_avg, e), e.shape, e.tp_dim, True)
            out[key + ".exp_avg_sq"] = info.dtensor(self._moment_rows(self._exp_avg_sq, e), e.shape, e.tp_dim, True)
        for g in self.groups:
            out[f"optim.{g['name']}.step"] = torch.tensor(self.group_steps[g["name"]], dtype=torch.int64,
                                                          device=self.device)
        return out

    @torch.no_grad()
    def load_sharded_state_dict(self, sd: dict) -> None:
        """Restore from ``sd`` (the template of ``sharded_state_dict`` after a DCP load, or plain
        tensors holding either this rank's rows or the whole TP-local tensor)."""
        missing = [f"optim.{g['name']}.step" for g in self.groups if f"optim.{g['name']}.step" not in sd]
        missing += [f"optim.{e.group}.{e.fqn}.{k}" for e in self.entries for k in ("master", "exp_avg", "exp_avg_sq")
                    if f"optim.{e.group}.{e.fqn}.{k}" not in sd]
        if missing:
            raise KeyError(f"{len(missing)} optimizer tensors missing from the checkpoint, e.g. {missing[:5]}")
        for g in self.groups:
            self.group_steps[g["name"]] = int(_local(sd[f"optim.{g['name']}.step"]).item())
        for e in self.entries:
            key = f"optim.{e.group}.{e.fqn}"
            for k, dst in (("master", self._master_rows(e)), ("exp_avg", self._moment_rows(self._exp_avg, e)),
                           ("exp_avg_sq", self._moment_rows(self._exp_avg_sq, e))):
                src = _local(sd[f"{key}.{k}"])
                if tuple(src.shape) == e.shape and e.hi - e.lo != e.rows:
                    src = src[e.lo:e.hi]
                elif tuple(src.shape) != tuple(dst.shape) and src.numel() == dst.numel():
                    src = src.reshape(dst.shape)
                _copy_into(dst, src, f"{key}.{k}")
        self._norms = None

    def model_sharded_state_dict(self, named_params=None, prefix: str = "model.",
                                 mesh_info: MeshInfo | None = None) -> dict:
        """The weights as DTensors (see the module function); default: this optimizer's params."""
        named = list(named_params) if named_params is not None else [(e.fqn, e.param) for e in self.entries]
        return model_sharded_state_dict(named, mesh_info or self.mesh_info, prefix)

    def load_model_sharded_state_dict(self, sd: dict, prefix: str = "model.", named_params=None) -> None:
        named = list(named_params) if named_params is not None else [(e.fqn, e.param) for e in self.entries]
        load_model_sharded_state_dict(named, sd, prefix)
