"""Index splits of a labelled data set: the held-out validation split and few-shot subsets.

The official students (GTE's ``final_live`` configs) select models on 50 images per class held out
from the ImageNet train set (seed 42) and draw their 50- or 200-shot training subsets from the rest.
Both draws here are per class with a `torch.Generator` seeded by ``seed``, so they depend only on
(targets, counts, seed).
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def held_out_split(
    targets: Tensor, per_class: int, seed: int, *, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Splits a training set into train and a held-out validation part of ``per_class`` images per class.

    Args:
        targets: [N] integer class index of every image (0..C-1).
        per_class: images of every class that go to the validation part (≥ 0).
        seed: seed of the `torch.Generator` that draws them; the same seed gives the same split.
        num_classes: C, if classes beyond ``targets.max()`` exist (they must then have images too).

    Returns:
        (train_indices [N - C·per_class], val_indices [C·per_class]): int64, sorted, disjoint, together
        all of 0..N-1.

    Raises:
        ValueError: naming the class, if a class has fewer than ``per_class + 1`` images (it would be
            left without training images).
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    val = []
    for c, idx in enumerate(_indices_per_class(targets, num_classes)):
        if len(idx) < per_class + 1:
            raise ValueError(
                f"held_out_split: class {c} has {len(idx)} images, needs at least {per_class + 1} "
                f"({per_class} held out + 1 for training)"
            )
        val.append(_draw(idx, per_class, gen))
    val_idx = torch.sort(torch.cat(val)).values if val else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def few_shot_indices(
    targets: Tensor, shots: int, seed: int, exclude: Tensor | None = None, *, num_classes: int | None = None
) -> Tensor:
    """Draws ``shots`` images of every class, e.g. the 50-shot ImageNet subset from train minus held-out.

    Args:
        targets: [N] integer class index of every image (0..C-1).
        shots: images per class (≥ 1).
        seed: seed of the `torch.Generator` that draws them; the same seed gives the same subset.
        exclude: [M] indices (into ``targets``) that must not be drawn, e.g. the held-out validation part;
            or a bool mask [N].
        num_classes: C, if classes beyond ``targets.max()`` exist (they must then have images too).

    Returns:
        [C·shots] int64 indices into ``targets``, sorted.

    Raises:
        ValueError: naming the class, if a class has fewer than ``shots`` images outside ``exclude``.
    """
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
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c, idx in enumerate(_indices_per_class(targets, num_classes)):
        idx = idx[allowed[idx]]
        if len(idx) < shots:
            raise ValueError(
                f"few_shot_indices: class {c} has {len(idx)} images available "
                f"(after excluding {int((~allowed).sum())} indices), needs {shots}"
            )
        chosen.append(_draw(idx, shots, gen))
    return torch.sort(torch.cat(chosen)).values if chosen else torch.zeros(0, dtype=torch.long)
