"""Multi-label distillation (PASCAL VOC): the per-class binary KD term and the multi-label GT loss.

With multi-hot targets each class is its own yes/no question, so the softmax KL of single-label KD is
replaced by a sum of per-class Bernoulli KL divergences between the teacher's and the student's
sigmoid probabilities (GTE's ``MLD`` criterion, its multi-label KD loss for VOC):

    p = clamp(σ(z / τ), ε, 1 − ε),   ε = 1e-6
    L = τ² · mean_n Σ_c [ p_T·(log p_T − log p_S) + (1 − p_T)·(log(1 − p_T) − log(1 − p_S)) ]

GTE applies the criterion to ``activation(logits, T)`` and multiplies by ``rescale(T)`` (τ² for its
softmax KD), summing over classes and averaging over the batch; the VOC activation itself was not
released, so σ(z/τ) and the τ² factor are this project's reading (docs/datasets.md). At τ = 1 the
factor is 1 and the formula is exactly ``MLD``.

The explained class stays the teacher's top-1 logit (GTE's ``exp_of='top1'``, the only option it
implements), as in `e2kd_objective`. The ground-truth term of a B-cos student is
`uniform_off_label_bce`, which takes multi-hot targets as they are; standard students use `multilabel_bce`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MLD_EPS = 1e-6


def _clamped_sigmoid(logits: Tensor, tau: float, eps: float) -> Tensor:
    return torch.sigmoid(logits / tau).clamp(eps, 1 - eps)


def multilabel_kd(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, eps: float = MLD_EPS) -> Tensor:
    """Per-class binary KL from teacher to student sigmoid probabilities, τ²-scaled (see module docstring).

    Args:
        student_logits: [N, C].
        teacher_logits: [N, C]; treated as a constant target (pass it detached).
        tau: temperature τ > 0.
        eps: clamp of the probabilities away from 0 and 1 (GTE: 1e-6).

    Returns:
        Scalar loss: summed over classes, averaged over the batch.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"multilabel_kd needs [N, C] logits of equal shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    p_s = _clamped_sigmoid(student_logits, tau, eps)
    p_t = _clamped_sigmoid(teacher_logits, tau, eps)
    # F.kl_div(log q, p) = p·(log p − log q), elementwise: the positive and the negative outcome.
    positive = F.kl_div(p_s.log(), p_t, reduction="none")
    negative = F.kl_div((1 - p_s).log(), 1 - p_t, reduction="none")
    return (positive + negative).sum(1).mean() * tau**2


def multilabel_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with multi-hot targets: the ground-truth loss of a standard multi-label student.

    Args:
        logits: [N, C].
        targets: [N, C] multi-hot (0/1) targets.

    Returns:
        Scalar loss, mean over N·C.
    """
    if targets.shape != logits.shape:
        raise ValueError(f"multi-hot targets {tuple(targets.shape)} must match the logits {tuple(logits.shape)}")
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


__all__ = ["MLD_EPS", "multilabel_bce", "multilabel_kd"]
