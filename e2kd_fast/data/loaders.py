"""Data loaders with a deterministic order, per-sample augmentation seeds and unreadable images skipped.

`make_loader` is the one loader of training, evaluation and precompute on the torchvision path; the
DALI path (`e2kd_fast.data.dali`) follows the same epoch plan.
"""

from __future__ import annotations

import os

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from e2kd_fast.data.folders import collate_skipping
from e2kd_fast.data.sampling import EpochSampler, SeededDataset, ShardedEpochSampler

MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """Loader workers that fit this machine: one less than the CPU cores this process may run on
    (``os.sched_getaffinity``, which honours cgroups' and ``taskset``'s CPU sets), shared among the
    processes of a launch on this node (``LOCAL_WORLD_SIZE``), at most `MAX_DEFAULT_WORKERS`.

    The core left over runs the training loop itself; a 2-core machine gets one worker.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return max(0, min(MAX_DEFAULT_WORKERS, cores // processes - 1))


def resolve_num_workers(num_workers: int | None) -> int:
    """``data.num_workers`` as a number: None means `default_num_workers`."""
    return default_num_workers() if num_workers is None else num_workers


def make_loader(
    dataset: Dataset,
    indices: Tensor,
    *,
    batch_size: int,
    num_workers: int | None = 0,
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
    the per-rank batch and ``start`` the global position in the epoch. ``num_workers`` None picks
    `default_num_workers`.
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
        num_workers=resolve_num_workers(num_workers),
        collate_fn=collate_skipping,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


__all__ = ["MAX_DEFAULT_WORKERS", "default_num_workers", "make_loader", "resolve_num_workers"]
