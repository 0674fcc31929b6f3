"""The e²KD loss terms in plain PyTorch (GTE's ``TeachersExplainCriterion``): the spec for the fused loss.

The cosine is the official one, ``F.cosine_similarity(s, t, eps=1e-8)`` (torch ≥ 1.12): each norm
is clamped below at ε *separately*, and the clamp is applied without autograd, so the gradient
flows through ‖s‖ as if it were not clamped. With a = max(‖s‖, ε), b = max(‖t‖, ε):

    cos = Σ (s/a)(t/b)
    ∂cos/∂s = t/(a·b) − cos · s/(a·‖s‖)        (the second term is 0 where ‖s‖ = 0)

Where ‖s‖ ≥ ε this is the derivative of the forward. Where 0 < ‖s‖ < ε the forward is linear in s
(a = ε is constant) but torch's gradient keeps the second term; it differs from the derivative
of the forward by at most ‖s‖/ε relative. This module follows torch there, because the official
training steps with torch's gradient. `distill_loss_grads` states the gradient of the whole loss
in differentiable torch ops (the double-backward path of ``e2kd::distill_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COSINE_EPS = 1e-8  # F.cosine_similarity's default eps: the clamp of each norm


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
    return F.cosine_similarity(student_maps.flatten(1), teacher_maps.flatten(1), dim=1, eps=COSINE_EPS)


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The e²KD loss (loss, kd, exp) = (kd + λ·exp, `kd_kl`, `explanation_cosine_loss`), 0-dim each.

    Args:
        student_logits, teacher_logits: [N, C].
        student_maps, teacher_maps: [N, ...] explanations (flattened per sample for the cosine).
        tau: temperature τ; lam: weight λ of the explanation term.

    Returns:
        Three 0-dim tensors in the logits' dtype.
    """
    kd = kd_kl(student_logits, teacher_logits, tau)
    exp = explanation_cosine_loss(student_maps, teacher_maps).to(kd.dtype)
    return kd + lam * exp, kd, exp


def distill_loss_grads(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """(∂kd/∂z_S, ∂exp/∂s) of `distill_loss`, as torch's autograd gives them, in differentiable ops.

    ∂kd/∂z_S = τ (p_S^τ − p_T^τ) / N;  ∂exp/∂s_i = −(1/N) ∂cos_i/∂s_i with ∂cos/∂s as in the module
    docstring (per-norm clamp, torch's gradient through the unclamped norm).

    Args:
        student_logits, teacher_logits: [N, C].
        student_maps, teacher_maps: [N, ...].

    Returns:
        ([N, C] in the logits' dtype, the maps' shape and dtype).
    """
    n = student_logits.shape[0]
    grad_logits = tau * (F.softmax(student_logits / tau, dim=1) - F.softmax(teacher_logits / tau, dim=1)) / n
    s, t = student_maps.reshape(n, -1), teacher_maps.reshape(n, -1)
    s_norm = torch.linalg.vector_norm(s, dim=1, keepdim=True)
    a = s_norm.clamp_min(COSINE_EPS)
    b = torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(COSINE_EPS)
    cos = ((s / a) * (t / b)).sum(1, keepdim=True)
    # s/‖s‖ is taken as 0 at s = 0, as vector_norm's own backward does.
    nonzero = s_norm > 0
    inv_s_norm = torch.where(nonzero, 1 / torch.where(nonzero, s_norm, torch.ones_like(s_norm)), 0)
    grad_s = t / a / b - cos * s * (inv_s_norm / a)
    return grad_logits, (grad_s / -n).reshape(student_maps.shape)


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
