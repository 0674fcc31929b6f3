"""The e²KD loss terms in plain PyTorch (bcos_and_e2kd.md §3.1): the spec for the fused loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Hinton KD: τ² · KL(p_T^τ ‖ p_S^τ), summed over classes and averaged over the batch.

    Args:
        student_logits: [N, C].
        teacher_logits: [N, C] (treated as a constant target: pass it detached).
        tau: temperature τ > 0.

    Returns:
        Scalar loss.
    """
    log_p_student = F.log_softmax(student_logits / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


def explanation_cosine_loss(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """mean_i (1 − cos(flatten(S_i), flatten(T_i))), with ``F.cosine_similarity``'s eps = 1e-8.

    Args:
        student_maps: [N, ...] per-sample explanations (B-cos W: [N, 6, H, W]; GradCAM: [N, 1, H, W]).
        teacher_maps: same shape.

    Returns:
        Scalar loss in [0, 2].
    """
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(
            f"student and teacher explanations differ in shape: {tuple(student_maps.shape)} vs "
            f"{tuple(teacher_maps.shape)}"
        )
    return (1 - explanation_cosine(student_maps, teacher_maps)).mean()


def explanation_cosine(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Per-sample cosine similarity of the flattened explanations: [N, ...] × [N, ...] → [N]."""
    return F.cosine_similarity(student_maps.flatten(1), teacher_maps.flatten(1), dim=1, eps=1e-8)


def uniform_off_label_bce(logits: Tensor, target: Tensor, off_label: float | None = None) -> Tensor:
    """The B-cos classification loss: BCE with logits, target 1 for the class and 1/C elsewhere.

    Args:
        logits: [N, C].
        target: [N] class indices, or [N, C] dense targets (mixup), clamped below at the off label.
        off_label: value of the off-classes (default 1/C).

    Returns:
        Scalar loss (mean over N·C).
    """
    num_classes = logits.shape[1]
    if target.shape != logits.shape:
        target = F.one_hot(target, num_classes).to(logits.dtype)
    target = target.clamp(min=1.0 / num_classes if off_label is None else off_label)
    return F.binary_cross_entropy_with_logits(logits, target)
