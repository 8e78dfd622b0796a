"""This process's place in a training run: device, ranks and process groups of every parallel
dimension, read once from megatron's ``parallel_state`` after initialisation.

The layout is validated against the launched world size before anything is built
(``parallel.state.validate_parallel``): ``parallel.tp=3`` on one process is an error, never a
silent TP=1 run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_starflow.config import Config


@dataclass
class ProcessLayout:
    device: torch.device
    rank: int
    world: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    sp: bool
    tp_group: object
    pp_group: object
    cp_group: object
    dp_group: object
    dp_cp_group: object  # data x context parallel ranks: gradient averaging, optimizer sharding

    @classmethod
    def initialize(cls, cfg: Config, device: torch.device) -> "ProcessLayout":
        """Initialise torch.distributed (backend from the device) and megatron's groups for
        ``cfg.parallel``, then read the layout."""
        from megatron_starflow.parallel import state as pstate
        from megatron_starflow.parallel.device import backend_for

        pstate.initialize_from_config(cfg, backend=backend_for(device))
        return cls.current(cfg, device)

    @classmethod
    def current(cls, cfg: Config, device: torch.device) -> "ProcessLayout":
        from megatron.core import parallel_state as ps

        return cls(
            device=torch.device(device), rank=dist.get_rank(), world=dist.get_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
            sp=bool(cfg.parallel.sp and ps.get_tensor_model_parallel_world_size() > 1),
            tp_group=ps.get_tensor_model_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        )

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> dict:
        return {"world": self.world, "tp": self.tp_size, "pp": self.pp_size, "cp": self.cp_size,
                "dp": self.dp_size, "sp": self.sp}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def replica_values(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """Average logged scalars over data-parallel replicas. Under PP a value exists on the
        stage that computes it (None elsewhere): it is summed over the pipeline first, so every
        rank logs the same numbers."""
        keys = sorted(values)
        present = torch.tensor([0.0 if values[k] is None else 1.0 for k in keys],
                               dtype=torch.float64, device=self.device)
        t = torch.tensor([0.0 if values[k] is None else float(values[k]) for k in keys],
                         dtype=torch.float64, device=self.device)
        if self.pp_size > 1:
            dist.all_reduce(t, group=self.pp_group)
            dist.all_reduce(present, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
            t /= self.dp_size
        return {k: (float(v) if p > 0 else None) for k, v, p in zip(keys, t.tolist(), present.tolist())}

    def counts_in_norm(self, param: torch.Tensor) -> bool:
        """Whether this rank's rows of ``param`` enter the global gradient norm. The optimizer
        splits every parameter's rows over the data x context parallel ranks, so DP and CP
        replicas are counted once by construction; TP-replicated parameters count on TP rank 0
        only (megatron's duplicate rule); each pipeline stage counts its own parameters."""
        return bool(getattr(param, "tensor_model_parallel", False)) or self.tp_rank == 0
