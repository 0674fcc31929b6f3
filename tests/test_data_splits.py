"""Held-out validation split and few-shot subsets: counts, disjointness, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from e2kd_fast.data import few_shot_indices, held_out_split


def _targets(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled class ids with ``counts[c]`` images of class c."""
    t = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return t[torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))]


def test_held_out_split_counts_disjoint_sorted():
    targets = _targets([10, 7, 12, 4, 9])
    train, val = held_out_split(targets, per_class=3, seed=42)
    assert train.dtype == val.dtype == torch.long
    assert torch.equal(torch.bincount(targets[val], minlength=5), torch.full((5,), 3))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(targets)))


def test_held_out_split_is_deterministic_per_seed():
    targets = _targets([50] * 6)
    a, b = held_out_split(targets, 5, seed=1), held_out_split(targets, 5, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(held_out_split(targets, 5, seed=2)[1], a[1])


def test_held_out_split_errors_name_the_class():
    with pytest.raises(ValueError, match="class 3 has 4 images"):
        held_out_split(_targets([10, 7, 12, 4]), per_class=4, seed=0)  # would leave class 3 without training
    with pytest.raises(ValueError, match="class 1 has 0 images"):  # a class with no images at all
        held_out_split(torch.tensor([0, 0, 2, 2, 0, 2]), per_class=1, seed=0)
    with pytest.raises(ValueError, match="class 3 has 0 images"):
        held_out_split(torch.tensor([0, 0, 1, 1, 2, 2]), per_class=1, seed=0, num_classes=4)
    with pytest.raises(ValueError, match="per_class"):
        held_out_split(torch.tensor([0, 1]), per_class=-1, seed=0)


def test_few_shot_indices_excludes_and_counts():
    targets = _targets([20, 15, 30])
    _, val = held_out_split(targets, 5, seed=42)
    shots = few_shot_indices(targets, 8, seed=42, exclude=val)
    assert torch.equal(torch.bincount(targets[shots], minlength=3), torch.full((3,), 8))
    assert set(shots.tolist()).isdisjoint(val.tolist())
    assert torch.equal(shots, shots.sort().values) and len(set(shots.tolist())) == 24
    mask = torch.zeros(len(targets), dtype=torch.bool)
    mask[val] = True
    assert torch.equal(few_shot_indices(targets, 8, seed=42, exclude=mask), shots)  # bool mask = index list
    assert torch.equal(few_shot_indices(targets, 8, seed=42, exclude=val), shots)
    assert not torch.equal(few_shot_indices(targets, 8, seed=43, exclude=val), shots)


def test_few_shot_indices_errors_name_the_class():
    targets = _targets([20, 15, 30])
    _, val = held_out_split(targets, 5, seed=0)
    with pytest.raises(ValueError, match="class 1 has 10 images available"):
        few_shot_indices(targets, 11, seed=0, exclude=val)
    assert len(few_shot_indices(targets, 15, seed=0)) == 45  # without exclusion class 1 has exactly 15
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(targets, 0, seed=0)


def test_imagenet_sized_split_is_fast_and_exact():
    targets = _targets([60] * 1000)  # 60k images, 1000 classes
    train, val = held_out_split(targets, 50, seed=42)
    shots = few_shot_indices(targets, 10, seed=42, exclude=val)
    assert len(val) == 50_000 and len(train) == 10_000
    assert torch.equal(torch.bincount(targets[shots], minlength=1000), torch.full((1000,), 10))
    assert set(shots.tolist()) <= set(train.tolist())
