"""Index splits of a labelled data set: the held-out validation split and few-shot subsets.

The official students (GTE's ``final_live`` configs) select models on 50 images per class held out
from the ImageNet train set (seed 42) and draw their 50- or 200-shot training subsets from the rest
(seed 42). Two draws are available, each a pure function of (targets, counts, seed):

- ``"official"``: the images the official code picks, index for index. Its search (BiT's few-shot
  search, GTE ``bcos/data/datamodules.py``, ``find_fewshot_indices``) seeds torch's global generator
  with ``seed``, walks a shuffled ``DataLoader`` over the candidate images and keeps, per class, the
  last ``k`` images seen, stopping at the first image after which every class has ``k``. The
  held-out draw runs over the whole train split; the few-shot draw over the images left, renumbered
  0..M-1 in ascending order. `official_visit_order` gives the loader's order; the batch size (1024
  there) does not matter, because the stop is checked after every image.
- ``"per_class"``: ``k`` images of each class, drawn class by class with one `torch.Generator`.

Both return sorted indices. The official search returns its list shuffled by Python's `random`
(whose state comes from the training script's global seeding); that order changes no image of the
subset, and the training loaders here shuffle by their own seed anyway.
"""

from __future__ import annotations

import typing

import torch
from torch import Tensor

from e2kd_fast.config.schema import SubsetDraw

SUBSET_DRAWS: tuple[str, ...] = typing.get_args(SubsetDraw)


def _indices_per_class(targets: Tensor, num_classes: int | None) -> list[Tensor]:
    """Indices of every class 0..C-1 in ascending order: one stable sort instead of C scans (ImageNet: C=1000)."""
    if targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D tensor of class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    targets = targets.long().cpu()
    if len(targets) and int(targets.min()) < 0:
        raise ValueError(f"targets must be >= 0, got {int(targets.min())}")
    present = int(targets.max()) + 1 if len(targets) else 0
    if num_classes is None:
        num_classes = present
    elif num_classes < present:
        raise ValueError(f"num_classes={num_classes} but targets contain class {present - 1}")
    order = torch.sort(targets, stable=True).indices
    counts = torch.bincount(targets, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


def _draw(indices: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``k`` entries of ``indices`` without replacement; always consumes one permutation from ``gen``."""
    return indices[torch.randperm(len(indices), generator=gen)[:k]]


def _check_draw(draw: str) -> None:
    if draw not in SUBSET_DRAWS:
        raise ValueError(f"draw must be one of {', '.join(repr(d) for d in SUBSET_DRAWS)}; got {draw!r}")


def official_visit_order(n: int, seed: int) -> Tensor:
    """The order in which a shuffled ``DataLoader`` over ``n`` items visits them after ``torch.manual_seed(seed)``.

    The loader's iterator first takes one int64 from the global generator (its base seed for worker
    seeding), then ``RandomSampler`` takes one as the seed of its own generator and yields
    ``randperm(n)`` of that generator. The same two draws are taken here from a private generator
    seeded with ``seed``, so the global state is left alone (the official search restores it too).

    Args:
        n: number of items.
        seed: the seed given to ``torch.manual_seed`` before the loader is iterated.

    Returns:
        [n] int64 permutation of 0..n-1: the item visited at each step.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # the iterator's base seed, unused here
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed))


def _official_pick(groups: list[Tensor], k: int, order: Tensor) -> Tensor:
    """Positions the official search keeps: per class the last ``k`` visited up to the step that fills the last class.

    Args:
        groups: per class, the positions (0..n-1) of its candidates; every class has >= ``k``.
        k: images per class (>= 1).
        order: [n] the visit order (`official_visit_order`).

    Returns:
        [C·k] int64 positions, unsorted.
    """
    step_of = torch.empty_like(order)
    step_of[order] = torch.arange(len(order))  # visit step of each position
    steps = [torch.sort(step_of[g]).values for g in groups]  # per class, its visit steps in order
    stop = max(int(s[k - 1]) for s in steps)  # the step at which the last class gets its k-th image
    kept = [s[: int(torch.searchsorted(s, stop, right=True))][-k:] for s in steps]
    return order[torch.cat(kept)]


def held_out_split(
    targets: Tensor, per_class: int, seed: int, *, num_classes: int | None = None, draw: SubsetDraw = "per_class"
) -> tuple[Tensor, Tensor]:
    """Splits a training set into train and a held-out validation part of ``per_class`` images per class.

    Args:
        targets: [N] integer class index of every image (0..C-1).
        per_class: images of every class that go to the validation part (≥ 0).
        seed: seed of the draw; the same seed gives the same split.
        num_classes: C, if classes beyond ``targets.max()`` exist (they must then have images too).
        draw: ``"official"`` (GTE's search over all N images, module docstring) or ``"per_class"``.

    Returns:
        (train_indices [N - C·per_class], val_indices [C·per_class]): int64, sorted, disjoint, together
        all of 0..N-1.

    Raises:
        ValueError: naming the class, if a class has fewer than ``per_class + 1`` images (it would be
            left without training images).
    """
    _check_draw(draw)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    groups = _indices_per_class(targets, num_classes)
    for c, idx in enumerate(groups):
        if len(idx) < per_class + 1:
            raise ValueError(
                f"held_out_split: class {c} has {len(idx)} images, needs at least {per_class + 1} "
                f"({per_class} held out + 1 for training)"
            )
    if draw == "official" and per_class and groups:
        val = [_official_pick(groups, per_class, official_visit_order(len(targets), seed))]
    else:
        gen = torch.Generator().manual_seed(seed)
        val = [_draw(idx, per_class, gen) for idx in groups]
    val_idx = torch.sort(torch.cat(val)).values if val else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def few_shot_indices(
    targets: Tensor,
    shots: int,
    seed: int,
    exclude: Tensor | None = None,
    *,
    num_classes: int | None = None,
    draw: SubsetDraw = "per_class",
) -> Tensor:
    """Draws ``shots`` images of every class, e.g. the 50-shot ImageNet subset from train minus held-out.

    Args:
        targets: [N] integer class index of every image (0..C-1).
        shots: images per class (≥ 1).
        seed: seed of the draw; the same seed gives the same subset.
        exclude: [M] indices (into ``targets``) that must not be drawn, e.g. the held-out validation part;
            or a bool mask [N].
        num_classes: C, if classes beyond ``targets.max()`` exist (they must then have images too).
        draw: ``"official"`` (GTE's search over the images outside ``exclude``, renumbered in ascending
            order; module docstring) or ``"per_class"``.

    Returns:
        [C·shots] int64 indices into ``targets``, sorted.

    Raises:
        ValueError: naming the class, if a class has fewer than ``shots`` images outside ``exclude``.
    """
    _check_draw(draw)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    allowed = torch.ones(len(targets), dtype=torch.bool)
    if exclude is not None:
        exclude = exclude.cpu()
        if exclude.dtype == torch.bool:
            if exclude.shape != allowed.shape:
                raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}, expected ({len(targets)},)")
            allowed &= ~exclude
        else:
            allowed[exclude.long()] = False
    groups = [idx[allowed[idx]] for idx in _indices_per_class(targets, num_classes)]
    for c, idx in enumerate(groups):
        if len(idx) < shots:
            raise ValueError(
                f"few_shot_indices: class {c} has {len(idx)} images available "
                f"(after excluding {int((~allowed).sum())} indices), needs {shots}"
            )
    if not groups:
        return torch.zeros(0, dtype=torch.long)
    if draw == "official":
        # The official search runs over the remaining images as a data set of their own: position p is
        # the p-th allowed index in ascending order. `rank` maps an allowed index to that position.
        candidates = allowed.nonzero().flatten()
        rank = torch.cumsum(allowed.long(), 0) - 1
        picked = _official_pick([rank[g] for g in groups], shots, official_visit_order(len(candidates), seed))
        return torch.sort(candidates[picked]).values
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.cat([_draw(idx, shots, gen) for idx in groups])).values
