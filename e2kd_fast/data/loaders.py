"""Data loaders with a deterministic order, per-sample augmentation seeds and unreadable images skipped.

`make_loader` is the one loader of training, evaluation and precompute on the torchvision path; the
DALI path (`e2kd_fast.data.dali`) follows the same epoch plan.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from e2kd_fast.data.folders import collate_skipping
from e2kd_fast.data.sampling import EpochSampler, SeededDataset, ShardedEpochSampler


def make_loader(
    dataset: Dataset,
    indices: Tensor,
    *,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    epoch: int = 0,
    start: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader over ``dataset[indices]`` with deterministic order and per-sample augmentation seeds.

    Items that are None (unreadable images) are dropped and counted in each batch's ``skipped``.
    With ``world_size > 1`` it loads this rank's shard (`ShardedEpochSampler`): ``batch_size`` is then
    the per-rank batch and ``start`` the global position in the epoch.
    """
    if world_size > 1:
        sampler = ShardedEpochSampler(indices, seed, shuffle=shuffle, rank=rank, world_size=world_size)
    else:
        sampler = EpochSampler(indices, seed, shuffle=shuffle)
    sampler.set_epoch(epoch, start)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


__all__ = ["make_loader"]
