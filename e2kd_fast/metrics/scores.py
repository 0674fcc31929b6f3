"""Scores of the paper's other settings: VOC mAP, Waterbirds group and worst-group accuracy.

`EvalExtras` collects them batch by batch inside `e2kd_fast.engine.evaluate`:

- multi-hot targets [N, C] (VOC): ``map``, the mean over classes of the all-point interpolated
  average precision (the VOC devkit's measure since 2010), leaving out the (image, class) pairs
  marked ``ignore`` (classes present only as difficult objects);
- a ``group`` per sample (Waterbirds, group = 2·y + place): ``group{g}_acc`` for every group seen,
  ``worst_group_acc`` (their minimum) and ``mean_group_acc`` (their unweighted mean);
- a ``place`` per sample: ``id_acc`` on samples whose place matches the class (Waterbirds groups 0
  and 3) and ``ood_acc`` on the others (groups 1 and 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def average_precision(scores: Tensor, positives: Tensor) -> float:
    """All-point interpolated AP of one class (VOC2010+ devkit): Σ_k (r_k − r_{k−1}) · max_{j ≥ k} p_j.

    Args:
        scores: [M] confidence of each sample (ties keep the given order).
        positives: [M] bool, whether the class is present.

    Returns:
        The AP in [0, 1], or NaN when there is no positive sample.
    """
    npos = int(positives.sum())
    if npos == 0:
        return math.nan
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    hits = positives[order].double()
    tp = hits.cumsum(0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)  # best precision at this recall or beyond
    return float((envelope * hits).sum() / npos)  # recall grows by 1/npos at every hit


def mean_average_precision(scores: Tensor, targets: Tensor, ignore: Tensor | None = None) -> tuple[float, Tensor]:
    """mAP over classes that have at least one positive.

    Args:
        scores: [N, C] logits or probabilities (only their order per class matters).
        targets: [N, C] multi-hot.
        ignore: [N, C] bool, pairs left out of the ranking (VOC: difficult-only classes).

    Returns:
        (mAP, per-class AP [C], NaN for a class without positives).
    """
    per_class = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    for c in range(scores.shape[1]):
        keep = torch.ones(scores.shape[0], dtype=torch.bool) if ignore is None else ~ignore[:, c].bool()
        per_class[c] = average_precision(scores[keep, c], targets[keep, c] > 0)
    valid = ~per_class.isnan()
    return (float(per_class[valid].mean()) if valid.any() else math.nan), per_class


def group_accuracy(correct: Tensor, groups: Tensor) -> dict[int, float]:
    """Accuracy per group: ``{group: mean(correct[groups == group])}`` for every group present.

    Args:
        correct: [N] bool, whether each prediction is right.
        groups: [N] int group of each sample.
    """
    return {int(g): float(correct[groups == g].float().mean()) for g in groups.unique().tolist()}


class EvalExtras:
    """Accumulates the setting-specific scores of an evaluation (see the module docstring)."""

    # The per-image lists, aligned row by row within each setting.
    _PER_IMAGE = ("_scores", "_targets", "_ignore", "_correct", "_groups", "_places", "_labels")

    def __init__(self) -> None:
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._ignore: list[Tensor] = []
        self._correct: list[Tensor] = []
        self._groups: list[Tensor] = []
        self._places: list[Tensor] = []
        self._labels: list[Tensor] = []

    def update(self, batch: dict, logits: Tensor) -> None:
        """Adds one batch: ``batch["target"]`` [N] or [N, C], optional ``ignore``, ``group``, ``place``."""
        logits, target = logits.detach().float().cpu(), batch["target"].cpu()
        if target.dim() == 2:
            self._scores.append(logits)
            self._targets.append(target)
            ignore = batch.get("ignore")
            self._ignore.append(torch.zeros_like(target, dtype=torch.bool) if ignore is None else ignore.cpu().bool())
            return
        correct = logits.argmax(1) == target
        if "group" in batch:
            self._correct.append(correct)
            self._groups.append(torch.as_tensor(batch["group"]).cpu())
        if "place" in batch:
            self._places.append(torch.as_tensor(batch["place"]).cpu())
            self._labels.append(target)
            if "group" not in batch:
                self._correct.append(correct)

    @classmethod
    def combine(cls, shards: Sequence[EvalExtras]) -> EvalExtras:
        """The extras of an evaluation split round-robin over processes, as one process collects them.

        Shard ``r`` of ``W`` holds the images at positions r, r + W, r + 2W, ... of the evaluation
        order (`ShardedEpochSampler`, DALI's `epoch_plan`); its k-th image goes back to position
        r + k·W, so that the mAP ranks tied scores as one process does. If unreadable images were
        skipped, those positions shift and only the order among exactly equal scores can differ;
        the per-group counts never depend on the order.

        Args:
            shards: the `EvalExtras` of each process, in rank order.
        """
        out, world = cls(), len(shards)
        for name in cls._PER_IMAGE:
            parts = [(r, torch.cat(getattr(s, name))) for r, s in enumerate(shards) if getattr(s, name)]
            if parts:
                positions = torch.cat([torch.arange(len(rows)) * world + r for r, rows in parts])
                rows = torch.cat([rows for _, rows in parts])
                getattr(out, name).append(rows[positions.argsort(stable=True)])
        return out

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._scores:
            out["map"], _ = mean_average_precision(
                torch.cat(self._scores), torch.cat(self._targets), torch.cat(self._ignore)
            )
        correct = torch.cat(self._correct) if self._correct else None
        if self._groups:
            per_group = group_accuracy(correct, torch.cat(self._groups))
            out.update({f"group{g}_acc": acc for g, acc in sorted(per_group.items())})
            out["worst_group_acc"] = min(per_group.values())
            out["mean_group_acc"] = sum(per_group.values()) / len(per_group)
        if self._places:
            matches = torch.cat(self._places) == torch.cat(self._labels)
            for key, subset in (("id_acc", matches), ("ood_acc", ~matches)):
                if subset.any():
                    out[key] = float(correct[subset].float().mean())
        return out


__all__ = [
    "EvalExtras",
    "average_precision",
    "group_accuracy",
    "mean_average_precision",
]
