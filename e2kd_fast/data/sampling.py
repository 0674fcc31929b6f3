"""Deterministic data order and augmentation, so that an interrupted run resumes exactly.

Every epoch's order and every sample's augmentation seed are pure functions of (seed, epoch), and
each sample is transformed under its own seed. A run resumed mid-epoch therefore skips the batches
already seen without loading them, and sees exactly the images, crops and flips an uninterrupted run
would have seen, however many workers load them. `ShardedEpochSampler` gives each rank of a
multi-process run its share of the same epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

_SEED_MIX = 1_000_003


def mix_seed(*parts: int) -> int:
    """A 62-bit seed derived from integers (run seed, epoch, step, ...)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x632BE59BD9B4E019 + (value << 6) + (value >> 2))) & ((1 << 64) - 1)
        value = (value * _SEED_MIX) & ((1 << 64) - 1)
    return value >> 2


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(dataset index, augmentation seed)`` pairs of one epoch, from position ``start``.

    Args:
        indices: [N] dataset indices to draw from (a few-shot subset, a split, or all).
        seed: the run's seed.
        shuffle: shuffle per epoch (training) or keep the order (evaluation, precompute).
    """

    def __init__(self, indices: Tensor, seed: int, shuffle: bool = True) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch, and the number of its samples already consumed (for resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(len(self.indices) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.indices), generator=gen) if self.shuffle else torch.arange(len(self.indices))
        seeds = torch.randint(0, 2**62, (len(self.indices),), generator=gen)
        for pos in range(self.start, len(self.indices)):
            yield int(self.indices[order[pos]]), int(seeds[pos])


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is produced under its own torch RNG seed."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


class ShardedEpochSampler(EpochSampler):
    """This rank's share of `EpochSampler`'s epoch: positions ``start + rank``, ``+ world_size``, ...

    The epoch's order and seeds are those of the unsharded sampler. With per-rank batches of
    ``B / world_size`` (drop_last), local batch ``j`` of all ranks together covers global positions
    ``[start + j·B, start + (j+1)·B)``: the same images as the single-process batch ``j``. The tail
    of an epoch that does not fill an optimiser step is left out, as a single process leaves it out
    (``drop_last``); nothing is padded or doubled.

    Args:
        indices, seed, shuffle: as `EpochSampler`.
        rank, world_size: this process's place.
    """

    def __init__(self, indices: Tensor, seed: int, shuffle: bool = True, *, rank: int = 0, world_size: int = 1):
        super().__init__(indices, seed, shuffle=shuffle)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: global positions already consumed, a multiple of ``world_size``."""
        if start % self.world_size:
            raise ValueError(f"start={start} is not a multiple of world_size={self.world_size}")
        super().set_epoch(epoch, start)

    def __len__(self) -> int:
        remaining = max(len(self.indices) - self.start - self.rank, 0)
        return (remaining + self.world_size - 1) // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return islice(super().__iter__(), self.rank, None, self.world_size)
