"""What a resumed run needs besides weights and optimizer state, split by who owns it.

* ``global_state``: the step, the skip guard and the data position (``data/sampler.py``: every
  data-parallel rank's place in its stride of the global order, gathered from the DP ranks, plus
  the bad-data counters) — equal on every rank, stored once in the checkpoint's meta.json. The noise of a sample is a function of its position (``training/sample_noise.py``),
  so the data position also fixes every random input of the remaining steps, for any layout.
* ``rank_state``: this rank's other random streams (torch's default generator, the CUDA generator
  of its device, megatron's RNG tracker) and its coordinates — stored per rank and restored when
  the layout is the same.
"""

from __future__ import annotations

import torch

from megatron_starflow.training.guards import SkipGuard
from megatron_starflow.training.layout import ProcessLayout


def _tracker_states() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    try:
        return dict(mrandom.get_cuda_rng_tracker().get_states())
    except Exception:  # noqa: BLE001 - no tracker was seeded (tp=1): nothing to save
        return {}


def _set_tracker_states(states: dict) -> None:
    if states:
        from megatron.core.tensor_parallel import random as mrandom

        mrandom.get_cuda_rng_tracker().set_states(states)


class TrainState:
    def __init__(self, layout: ProcessLayout, loader, guard: SkipGuard):
        self.layout, self.loader, self.guard = layout, loader, guard
        self.step = 0
        # Seconds spent in training steps over the whole run, resumes included (evaluation and
        # checkpoint writing excluded): the x axis of quality-against-training-time curves.
        self.train_seconds = 0.0

    def global_state(self) -> dict:
        """Collective over the data-parallel group (every rank calls it when saving)."""
        return {"step": self.step, "guard": self.guard.state_dict(), "data": self.data_state(),
                "parallel": self.layout.describe(), "train_seconds": self.train_seconds}

    def data_state(self) -> dict:
        """Every DP rank's loader state merged (a rank that met bad samples has read further along
        its stride than the others: ``data/sampler.py``)."""
        from megatron_starflow.data.sampler import merge_states

        state, lay = self.loader.state_dict(), self.layout
        states = [state]
        if lay.dp_size > 1:
            states = [None] * lay.dp_size
            torch.distributed.all_gather_object(states, state, group=lay.dp_group)
        return merge_states(states)

    def rank_state(self) -> dict:
        lay = self.layout
        state = {"torch": torch.get_rng_state(), "tracker": _tracker_states(),
                 "coords": {"tp": lay.tp_rank, "pp": lay.pp_rank, "cp": lay.cp_rank, "dp": lay.dp_rank}}
        if lay.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(lay.device)
        return state

    def load(self, global_state: dict, rank_state: dict | None) -> None:
        """``rank_state``: this rank's saved streams when the layout is the same, else None."""
        self.step = int(global_state["step"])
        self.train_seconds = float(global_state.get("train_seconds", 0.0))
        self.guard.load_state_dict(global_state["guard"])
        if global_state.get("data"):
            self.loader.load_state_dict(global_state["data"])
        if rank_state is None:
            return
        torch.set_rng_state(rank_state["torch"])
        _set_tracker_states(rank_state.get("tracker", {}))
        if "cuda" in rank_state and self.layout.device.type == "cuda":
            torch.cuda.set_rng_state(rank_state["cuda"], self.layout.device)
