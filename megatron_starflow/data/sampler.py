"""Resumable sample order with a fixed batch per rank and a DP-size-independent position.

Design:

* Epoch ``e`` has a permutation ``order_e`` of the ``N`` sample indices, a pure function of
  ``(seed, e)``. With shard sizes given it is *shard-blocked*: the shards are permuted, and the
  samples inside each shard are permuted, so a reader walks one shard at a time (tar locality)
  while every sample still appears exactly once.
* The epochs are laid end to end into one infinite *global order*: global position ``g`` is sample
  ``order_{g // N}[g % N]``.
* **Strides.** The positions not consumed yet form the *free sequence* ``u_0 < u_1 < ...``: every
  position from ``frontier`` on, except the finite, sorted set ``exceptions`` (positions beyond the
  frontier consumed before the last re-basing). With ``dp`` data-parallel ranks, rank ``r`` owns
  the slots ``u_r, u_{r+dp}, u_{r+2dp}, ...`` — its *stride* — and reads them strictly in order;
  ``scanned`` counts the slots of its stride it has used.
* **A fixed batch.** A rank takes slots of its own stride until it holds ``batch_size`` good
  samples; a bad sample is replaced by the next slot of the same stride (it is still counted and
  logged by the caller). Which slots a rank uses therefore depends only on its own data, so no
  rank waits for another, and a decoder may read ahead along the stride (worker processes).
  Without bad samples this is the plain layout: step ``s`` of rank ``r`` reads positions
  ``s*B*dp + r + k*dp``, ``k < B``.
* **The saved position** (``merge_states`` of every DP rank's ``state_dict``): ``frontier``,
  ``exceptions``, the DP size and every rank's ``scanned``. The consumed set is
  ``[0, frontier) ∪ exceptions ∪ {u_{r + k*dp} : k < scanned_r}``.
  - Resuming with the same DP size restores every rank's ``scanned``: the run continues exactly as
    if it had not stopped.
  - Resuming with another DP size *re-bases*: the consumed set is rewritten as a new frontier (its
    first gap) plus the consumed positions beyond it (at most the per-rank differences of
    ``scanned``, i.e. a few bad samples), and every rank of the new layout starts its stride at
    0 of the new free sequence. Every position is consumed exactly once either way: nothing is
    repeated or skipped.
* Per-sample randomness (clip start, random crop, noise) is seeded from ``(seed, global
  position)``, so it needs no saved RNG state and is identical after a resume.
* ``consumed`` (reported in the state for humans, and the old one-integer format still loads) is
  the size of the consumed set.
"""

from __future__ import annotations

import numpy as np


class GlobalOrderSampler:
    def __init__(self, num_samples: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 shard_sizes: list[int] | None = None, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if shard_sizes is not None and sum(shard_sizes) != num_samples:
            raise ValueError(f"shard sizes sum to {sum(shard_sizes)}, expected {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else None
        self.shuffle = shuffle
        self.frontier = 0
        self.exceptions: list[int] = []
        self.scanned = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._shard_of = (np.repeat(np.arange(len(self.shard_sizes)), self.shard_sizes)
                          if self.shard_sizes else None)

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.num_samples
        if not self.shuffle:
            order = np.arange(n)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), 0x5EED]))
            if self.shard_sizes:
                starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
                parts = [starts[s] + rng.permutation(self.shard_sizes[s])
                         for s in rng.permutation(len(self.shard_sizes))]
                order = np.concatenate(parts)
            else:
                order = rng.permutation(n)
        self._cache = (epoch, order)
        return order

    def sample_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.num_samples)
        return int(self.epoch_order(epoch)[offset])

    # -- strides -------------------------------------------------------------------------------
    def free_position(self, index: int) -> int:
        """The ``index``-th position of the free sequence (positions >= frontier that are not
        exceptions)."""
        position = self.frontier + int(index)
        for e in self.exceptions:  # sorted: each exception at or before the candidate shifts it
            if e <= position:
                position += 1
            else:
                break
        return position

    def slot_position(self, slot: int) -> int:
        """Global position of slot ``slot`` (0-based, counted from the last re-basing) of this
        rank's stride."""
        return self.free_position(self.dp_rank + int(slot) * self.dp_size)

    def next_slots(self, count: int) -> list[tuple[int, int]]:
        """``[(global position, sample index)]`` of this rank's next ``count`` stride slots;
        marks them used."""
        out = [(p, self.sample_at(p)) for p in
               (self.slot_position(self.scanned + k) for k in range(int(count)))]
        self.scanned += int(count)
        return out

    def next_batch(self, batch_size: int) -> list[tuple[int, int]]:
        """``[(global position, sample index), ...]`` of this rank's next ``batch_size`` slots
        (a caller that finds a bad sample among them takes ``next_slots(1)`` to replace it)."""
        return self.next_slots(batch_size)

    @property
    def consumed(self) -> int:
        """Positions consumed, counting this rank's slots and assuming the other ranks used as
        many (exact for the merged state: see ``merge_states``)."""
        return self.frontier + len(self.exceptions) + self.scanned * self.dp_size

    @property
    def epoch(self) -> int:
        """Epoch of this rank's next position."""
        return self.slot_position(self.scanned) // self.num_samples

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's part of the position; ``merge_states`` of all DP ranks' parts is what a
        checkpoint stores. ``next_position``/``epoch``/``shard``: where this rank reads next."""
        nxt = self.slot_position(self.scanned)
        state = {"seed": self.seed, "num_samples": self.num_samples, "frontier": self.frontier,
                 "exceptions": list(self.exceptions), "dp_size": self.dp_size,
                 "scanned": {str(self.dp_rank): self.scanned}, "consumed": self.consumed,
                 "next_position": nxt, "epoch": nxt // self.num_samples}
        if self._shard_of is not None:
            sample = self.sample_at(nxt)
            shard = int(self._shard_of[sample])
            state["shard"] = shard
            state["sample_in_shard"] = sample - int(sum(self.shard_sizes[:shard]))
        return state

    def restores_exactly(self, state: dict) -> bool:
        """Whether ``state`` holds this rank's own stride (same DP size): the run continues as
        if it had not stopped; otherwise loading re-bases."""
        return ("frontier" in state and int(state["dp_size"]) == self.dp_size
                and str(self.dp_rank) in {str(k) for k in state["scanned"]})

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples, this data set has "
                             f"{self.num_samples}: resume with the same shards")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        if "frontier" not in state:  # the one-integer format: every rank at the same point
            self.frontier, self.exceptions, self.scanned = int(state["consumed"]), [], 0
            return
        frontier, exceptions = int(state["frontier"]), sorted(int(e) for e in state["exceptions"])
        scanned = {int(r): int(k) for r, k in state["scanned"].items()}
        if int(state["dp_size"]) == self.dp_size and self.dp_rank in scanned:
            self.frontier, self.exceptions = frontier, exceptions
            self.scanned = scanned[self.dp_rank]
            return
        missing = sorted(set(range(int(state["dp_size"]))) - set(scanned))
        if missing:
            raise ValueError(f"loader state saved with dp_size={state['dp_size']} lacks the "
                             f"positions of DP ranks {missing}; a checkpoint stores every rank's "
                             f"(data.merge_states), a single rank's state resumes that rank only")
        self.frontier, self.exceptions = rebase(frontier, exceptions, int(state["dp_size"]), scanned)
        self.scanned = 0


def rebase(frontier: int, exceptions: list[int], dp_size: int,
           scanned: dict[int, int]) -> tuple[int, list[int]]:
    """The consumed set ``[0, frontier) ∪ exceptions ∪ {u_{r + k*dp} : k < scanned[r]}`` as a new
    ``(frontier, exceptions)``: the first position not consumed and the consumed ones after it.
    Cost: O(dp * (max - min scanned) + |exceptions|), independent of the run's length."""
    probe = GlobalOrderSampler(1)
    probe.frontier, probe.exceptions = frontier, list(exceptions)
    low = min(scanned.values()) if scanned else 0
    base = probe.free_position(low * dp_size)  # every free slot before it is consumed
    consumed = {e for e in exceptions if e >= base}
    for rank, k in scanned.items():
        consumed.update(probe.free_position(rank + j * dp_size) for j in range(low, k))
    while base in consumed:
        consumed.discard(base)
        base += 1
    return base, sorted(consumed)


def merge_states(states: list[dict]) -> dict:
    """Every DP rank's ``state_dict`` (any nesting under ``"sampler"`` as the loaders write it)
    -> one state holding all ranks' ``scanned`` (and the summed bad-data counters), valid for
    resuming with any DP size."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    if "sampler" in states[0]:
        merged = dict(states[0])
        merged["sampler"] = merge_states([s["sampler"] for s in states])
        if "bad_data" in states[0]:
            merged["bad_data"] = merge_bad_data([s.get("bad_data", {}) for s in states])
        return merged
    first = states[0]
    if "frontier" not in first:
        return dict(first)
    scanned: dict[str, int] = {}
    for s in states:
        for key in ("seed", "num_samples", "frontier", "exceptions", "dp_size"):
            if s[key] != first[key]:
                raise ValueError(f"loader states of different ranks disagree on {key}: "
                                 f"{first[key]} vs {s[key]}")
        scanned.update(s["scanned"])
    merged = {**first, "scanned": dict(sorted(scanned.items(), key=lambda kv: int(kv[0])))}
    merged["consumed"] = (first["frontier"] + len(first["exceptions"])
                          + sum(int(k) for k in scanned.values()))
    return merged


def merge_bad_data(states: list[dict]) -> dict:
    """Bad-data counters of every DP rank (``{"seen", "counts", "dp_rank"}`` each) -> their sums
    plus the per-rank values (restored when the layout is the same)."""
    counts: dict[str, int] = {}
    for s in states:
        for kind, c in s.get("counts", {}).items():
            counts[kind] = counts.get(kind, 0) + int(c)
    return {"seen": sum(int(s.get("seen", 0)) for s in states), "bad": sum(counts.values()),
            "counts": counts,
            "per_rank": {str(s.get("dp_rank", i)): {"seen": int(s.get("seen", 0)),
                                                     "counts": dict(s.get("counts", {}))}
                         for i, s in enumerate(states)}}
