"""XDistillation's explanation metrics: explanation MSE and the top-k superpixel sign-overlap score.

Both compare a teacher's and a student's per-superpixel explanations v_T, v_S [N, K] of the same
images, by the same explainer, over the same SLIC superpixels (paper §IV-B).

* **Explanation MSE** (Table IV): by default on the pixel maps E' (each superpixel weighted by its
  area), after per-image max-|v| normalisation of each explanation (the scale the CAE is trained on);
  ``level="segment"`` averages over superpixels instead, ``normalise="none"`` keeps raw values.
* **Top-k sign overlap** (Table V, Fig. 11 with k = 2): rank each model's superpixels by |v|; the score
  of an image is the number of the teacher's top-k superpixels that are also in the student's top-k
  *and* have the same sign in both, divided by k (by M when an image has only M < k superpixels).
  The paper averages it over images both models classify correctly (the caller passes that mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2kd_fast.xdistill.superpixels import broadcast_segments, normalise_values, segment_valid


def explanation_mse(
    teacher_values: Tensor,
    student_values: Tensor,
    segments: Tensor,
    *,
    level: str = "pixel",
    normalise: str = "maxabs",
) -> Tensor:
    """Per-image mean squared difference of two superpixel explanations.

    Args:
        teacher_values, student_values: [N, K] per-superpixel values.
        segments: [N, H, W] labels (used for the area weighting and the valid slots).
        level: ``"pixel"`` (maps, area-weighted) or ``"segment"`` (mean over the image's superpixels).
        normalise: ``"maxabs"`` or ``"none"`` (see `normalise_values`).

    Returns:
        [N] MSE per image.
    """
    if teacher_values.shape != student_values.shape:
        raise ValueError(
            f"explanation_mse: shapes differ: {tuple(teacher_values.shape)} vs {tuple(student_values.shape)}"
        )
    t = normalise_values(teacher_values.double(), normalise)
    s = normalise_values(student_values.double(), normalise)
    if level == "pixel":
        return (broadcast_segments(t, segments) - broadcast_segments(s, segments)).square().flatten(1).mean(1)
    if level == "segment":
        valid = segment_valid(segments, t.shape[1]).double()
        return ((t - s).square() * valid).sum(1) / valid.sum(1)
    raise ValueError(f"explanation_mse: level must be 'pixel' or 'segment', got {level!r}")


def _topk_mask(values: Tensor, valid: Tensor, k: int) -> Tensor:
    """[N, K] bool: the k entries of largest |v| among the valid ones (ties: lower index first)."""
    score = values.abs().masked_fill(~valid, -1.0)
    k = min(k, values.shape[1])
    # A stable descending sort keeps tie-breaking deterministic.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(valid).scatter(1, order, True)
    return mask & valid


def topk_sign_overlap(
    teacher_values: Tensor, student_values: Tensor, k: int = 2, valid: Tensor | None = None
) -> Tensor:
    """Per-image top-k sign-overlap score in [0, 1].

    Args:
        teacher_values, student_values: [N, K].
        k: number of top superpixels (the paper's figure uses 2).
        valid: [N, K] bool of real superpixel slots (None: all).

    Returns:
        [N] scores.
    """
    if k < 1:
        raise ValueError(f"topk_sign_overlap: k must be >= 1, got {k}")
    if teacher_values.shape != student_values.shape:
        raise ValueError(
            f"topk_sign_overlap: shapes differ: {tuple(teacher_values.shape)} vs {tuple(student_values.shape)}"
        )
    if valid is None:
        valid = torch.ones_like(teacher_values, dtype=torch.bool)
    top_t = _topk_mask(teacher_values, valid, k)
    top_s = _topk_mask(student_values, valid, k)
    same_sign = torch.sign(teacher_values) == torch.sign(student_values)
    hits = (top_t & top_s & same_sign).sum(1).double()
    return hits / valid.sum(1).clamp(max=k).clamp_min(1).double()


__all__ = ["explanation_mse", "topk_sign_overlap"]
