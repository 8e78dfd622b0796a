"""Resumable, DP-size-independent sample order.

Design (the state is ONE integer):

* Epoch ``e`` has a permutation ``order_e`` of the ``N`` sample indices, a pure function of
  ``(seed, e)``. With shard sizes given it is *shard-blocked*: the shards are permuted, and the
  samples inside each shard are permuted, so a reader walks one shard at a time (tar locality)
  while every sample still appears exactly once.
* The epochs are laid end to end into one infinite *global order*: global position ``g`` is sample
  ``order_{g // N}[g % N]``.
* The loader state is ``consumed``: how many global positions all data-parallel ranks together
  have taken. A step of global batch ``B * dp`` takes positions ``[consumed, consumed + B * dp)``;
  rank ``r`` takes positions ``consumed + r, consumed + r + dp, ...`` of that window (``B`` of
  them), then ``consumed += B * dp`` on every rank.
* Resuming restores ``consumed`` (plus the seed, checked). The remaining positions of the epoch are
  exactly ``[consumed, (epoch + 1) * N)`` whatever the new DP size is, so changing DP from 2 to 3
  between save and resume neither repeats nor skips a sample: the windows are cut afresh from the
  same global order. Windows run across an epoch boundary (no sample is dropped at the end of an
  epoch). Epoch, shard and in-shard sample index are *derived* from ``consumed`` and reported in
  :meth:`state_dict` for humans. Per-sample randomness (clip start, random crop) is seeded from
  ``(seed, global position)``, so it needs no saved RNG state and is identical after a resume.
* A bad sample still consumes its position (it is skipped, not replaced), so the position
  arithmetic stays identical on every rank.
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
        self.consumed = 0
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

    # -- consumption ---------------------------------------------------------------------------
    def next_positions(self, batch_size: int) -> list[int]:
        """This rank's global positions of the next step (``batch_size`` of them); advances the
        state by the global batch ``batch_size * dp_size``."""
        start = self.consumed
        positions = [start + self.dp_rank + k * self.dp_size for k in range(batch_size)]
        self.consumed = start + batch_size * self.dp_size
        return positions

    def next_batch(self, batch_size: int) -> list[tuple[int, int]]:
        """``[(global position, sample index), ...]`` of this rank's next step."""
        return [(p, self.sample_at(p)) for p in self.next_positions(batch_size)]

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        offset = self.consumed % self.num_samples
        state = {"consumed": self.consumed, "seed": self.seed, "num_samples": self.num_samples,
                 "epoch": self.epoch, "sample_in_epoch": offset, "dp_size_at_save": self.dp_size}
        if self._shard_of is not None:
            sample = self.sample_at(self.consumed)
            shard = int(self._shard_of[sample])
            state["shard"] = shard
            state["sample_in_shard"] = sample - int(sum(self.shard_sizes[:shard]))
        return state

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples, this data set has "
                             f"{self.num_samples}: resume with the same shards")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        self.consumed = int(state["consumed"])
