"""Held-out validation split and few-shot subsets, per class and official: counts, disjointness, determinism, errors."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch.utils.data import DataLoader

from e2kd_fast.data import few_shot_indices, held_out_split, official_visit_order


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


# ----------------------------------------------------------------------------------------------------------------------
# The official draw (data.subset_draw: official): GTE's find_fewshot_indices, index for index
# ----------------------------------------------------------------------------------------------------------------------

# 10 images: 0-2 class 0, 3-5 class 1, 6-9 class 2. With seed 42 the official loader visits them in the order
# 8, 0, 9, 1, 4, 5, 6, 3, 2, 7 (checked against torch's DataLoader below).
HAND = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])


def _official_by_simulation(targets: torch.Tensor, k: int, seed: int, exclude=None) -> list[int]:
    """The official search run as written: torch.manual_seed, a shuffled DataLoader (batch 1024) over the images
    left after ``exclude`` (renumbered 0..M-1), a deque of the last k per class, stop once every class has k."""
    excluded = set() if exclude is None else set(exclude.tolist())
    remaining = [i for i in range(len(targets)) if i not in excluded]
    num_classes = int(targets.max()) + 1
    kept = {}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for batch in DataLoader(range(len(remaining)), batch_size=1024, shuffle=True, num_workers=0, drop_last=False):
            for pos in batch.tolist():
                kept.setdefault(int(targets[remaining[pos]]), deque(maxlen=k)).append(remaining[pos])
                if sum(map(len, kept.values())) == k * num_classes:
                    return sorted(i for d in kept.values() for i in d)
    finally:
        torch.random.set_rng_state(state)
    raise AssertionError("not enough images")


def test_official_visit_order_is_that_of_a_shuffled_data_loader():
    assert official_visit_order(10, 42).tolist() == [8, 0, 9, 1, 4, 5, 6, 3, 2, 7]
    assert official_visit_order(7, 42).tolist() == [1, 2, 3, 6, 4, 5, 0]
    state = torch.random.get_rng_state()
    for n, seed in [(10, 42), (3000, 42), (2500, 7)]:  # 3000: more than one batch of 1024
        torch.manual_seed(seed)
        visited = torch.cat(list(DataLoader(torch.arange(n), batch_size=1024, shuffle=True, num_workers=0)))
        assert torch.equal(official_visit_order(n, seed), visited)
    torch.random.set_rng_state(state)
    official_visit_order(5, 0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_official_held_out_split_by_hand():
    # k = 1, order 8 0 9 1 4: class 2 keeps 8 then 9 (the last seen), class 0 keeps 0 then 1, and at 4 class 1 is
    # the last to fill: the search stops there, inside the first batch (a check per batch would see all 10 and keep
    # 2, 3, 7).
    train, val = held_out_split(HAND, 1, seed=42, draw="official")
    assert val.tolist() == [1, 4, 9] and train.tolist() == [0, 2, 3, 5, 6, 7, 8]
    # k = 2: 8 0 9 1 4 5 fills every class with no replacement.
    assert held_out_split(HAND, 2, seed=42, draw="official")[1].tolist() == [0, 1, 4, 5, 8, 9]


def test_official_few_shots_by_hand_renumber_the_images_left():
    # Left after the held-out [1, 4, 9]: 0 2 3 5 6 7 8 (positions 0..6, classes 0 0 1 1 2 2 2). Seed 42 visits
    # positions 1 2 3 6 4 5 0. k = 1: class 0 keeps position 1 (image 2), class 1 position 2 then 3 (image 5),
    # class 2 position 6 (image 8), and the search stops there.
    val = torch.tensor([1, 4, 9])
    assert few_shot_indices(HAND, 1, seed=42, exclude=val, draw="official").tolist() == [2, 5, 8]
    # k = 2 runs to the end: class 2 sees positions 6 4 5 and keeps 4 5 (images 6 7), class 0 positions 1 0.
    assert few_shot_indices(HAND, 2, seed=42, exclude=val, draw="official").tolist() == [0, 2, 3, 5, 6, 7]


@pytest.mark.parametrize(
    ("counts", "val", "shots", "seed"), [([30, 25, 40], 4, 6, 42), ([400, 700, 500, 650], 50, 200, 3)]
)
def test_official_draw_matches_the_search_as_written(counts, val, shots, seed):
    targets = _targets(counts, seed=seed)
    train, held = held_out_split(targets, val, seed=42, draw="official")
    assert held.tolist() == _official_by_simulation(targets, val, 42)
    got = few_shot_indices(targets, shots, seed=seed, exclude=held, draw="official")
    assert got.tolist() == _official_by_simulation(targets, shots, seed, exclude=held)


def test_official_draw_invariants():
    targets = _targets([60, 45, 80, 51])
    train, val = held_out_split(targets, 10, seed=42, draw="official")
    shots = few_shot_indices(targets, 20, seed=42, exclude=val, draw="official")
    assert torch.equal(torch.bincount(targets[val], minlength=4), torch.full((4,), 10))
    assert torch.equal(torch.bincount(targets[shots], minlength=4), torch.full((4,), 20))
    assert sorted(train.tolist() + val.tolist()) == list(range(len(targets)))
    assert set(shots.tolist()) <= set(train.tolist())  # disjoint from the held-out images
    for t in (val, shots):
        assert torch.equal(t, t.sort().values) and t.dtype == torch.long
    again = few_shot_indices(
        targets, 20, seed=42, exclude=held_out_split(targets, 10, 42, draw="official")[1], draw="official"
    )
    assert torch.equal(again, shots)
    assert not torch.equal(few_shot_indices(targets, 20, seed=43, exclude=val, draw="official"), shots)
    assert not torch.equal(few_shot_indices(targets, 20, seed=42, exclude=val), shots)  # per_class draws others


def test_official_draw_refuses_short_classes_by_name():
    targets = _targets([20, 15, 30])
    with pytest.raises(ValueError, match="class 1 has 15 images, needs at least 16"):
        held_out_split(targets, 15, seed=42, draw="official")
    _, val = held_out_split(targets, 5, seed=42, draw="official")
    with pytest.raises(ValueError, match="class 1 has 10 images available"):
        few_shot_indices(targets, 11, seed=42, exclude=val, draw="official")
    with pytest.raises(ValueError, match="class 3 has 0 images"):
        few_shot_indices(torch.tensor([0, 1, 2, 0, 1, 2]), 1, seed=42, num_classes=4, draw="official")
    with pytest.raises(ValueError, match="draw must be one of 'official', 'per_class'; got 'bit'"):
        few_shot_indices(targets, 1, seed=42, draw="bit")


def test_official_draw_at_imagenet_size_is_fast():
    targets = _targets([60] * 1000)
    train, val = held_out_split(targets, 50, seed=42, draw="official")
    shots = few_shot_indices(targets, 10, seed=42, exclude=val, draw="official")
    assert len(val) == 50_000 and torch.equal(torch.bincount(targets[shots], minlength=1000), torch.full((1000,), 10))


@pytest.mark.parametrize("draw", ["official", "per_class"])
def test_split_indices_draw_as_data_subset_draw_names(draw):
    from e2kd_fast.config import DataConfig
    from e2kd_fast.data.bundle import split_indices

    targets = _targets([30, 25, 40])
    train, held = split_indices(DataConfig(val_per_class=4, shots=6, subset_draw=draw), targets)
    assert torch.equal(held, held_out_split(targets, 4, seed=42, draw=draw)[1])
    assert torch.equal(train, few_shot_indices(targets, 6, seed=42, exclude=held, draw=draw))
