"""Resumable, data-parallel batches of the in-memory synthetic clips (``data.source=synthetic``).

The position is kept as for tar shards (``data/sampler.py``; no sample is ever bad here, so every
rank reads as far along its stride as the others). Each epoch's order is
``torch.randperm(N, generator=manual_seed(seed * 100003 + epoch))``; when ``N`` is not a multiple of the batch size, a batch runs across the epoch
boundary, as in the shard sampler.

With ``dp`` ranks, rank ``r`` takes positions ``consumed + r, consumed + r + dp, ...`` of each
global window of ``batch_size * dp`` samples, so resuming with another DP size continues the same
global order without repeating or skipping a sample.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_starflow.data.collate import collate
from megatron_starflow.data.sampler import GlobalOrderSampler


class TorchPermutationSampler(GlobalOrderSampler):
    """:class:`GlobalOrderSampler` whose epoch order is a seeded torch permutation."""

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + int(epoch))
            order = torch.randperm(self.num_samples, generator=gen).numpy()
        else:
            order = np.arange(self.num_samples)
        self._cache = (epoch, order)
        return order


class SyntheticBatchIterator:
    """``batches()`` yields ``(epoch, batch)`` like ``VideoClipIterator.batches``; ``state_dict``
    holds the sampler position."""

    def __init__(self, dataset, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = TorchPermutationSampler(len(dataset), seed=seed, dp_rank=dp_rank,
                                               dp_size=dp_size)

    def next_batch(self) -> dict:
        epoch = self.sampler.epoch
        items = self.sampler.next_batch(self.batch_size)
        batch = collate([self.dataset[index] for _, index in items])
        batch["position"] = [position for position, _ in items]
        batch["epoch"] = epoch
        return batch

    def batches(self):
        while True:
            batch = self.next_batch()
            yield batch["epoch"], batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
