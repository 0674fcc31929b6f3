"""The e²KD objective, exactly as the official implementation computes it.

The official implementation is ``m-parchami/GoodTeachersExplain`` ("GTE"),
``bcos/distillation_methods/TeachersExplain.py`` (``TeachersExplainCriterion``, ``explanation_aware_forward``):

    L = gt_coef · L_gt + β · τ² · KL(p_T^τ ‖ p_S^τ) + λ · mean_i(1 − cos(E_S,i, E_T,i))

β is GTE's ``teacher_logit_loss_coef`` (1 in every paper config; its standard-network sweep also
tried 0.5). The fused loss op computes ``kd + λ'·exp``; with β > 0 the objective is that op at
λ' = λ/β times β, so the loss keeps one statement (the reference) and β = 1 changes no bit.

Both explanations are taken for the teacher's top-1 class ĉ. B-cos models are explained by their
dynamic weights W = ∂logit_ĉ/∂x6 ([N, 6, H, W]); standard models by ReLU-GradCAM of the last stage,
resized to the input ([N, 1, H, W]). ``loss.backward()`` gives the official gradient: the student's
explanation is differentiated through its dynamic weights (the exact total derivative), and the KD
term gets the ordinary gradient although the student's forward ran in explanation mode.

The teacher builds no autograd graph: its logits are computed under ``no_grad`` when no explanation
is needed (the KD baseline), and its explanation with ``create_graph=False`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.distill.ground_truth import ground_truth_loss
from e2kd_fast.distill.multilabel import multilabel_kd
from e2kd_fast.explain import dynamic_weights, gradcam
from e2kd_fast.ops import distill_loss
from e2kd_fast.reference.losses import explanation_cosine_loss, kd_kl

EXPLANATIONS = ("bcos", "gradcam")


@dataclass(frozen=True)
class TeacherOutputs:
    """A teacher's stored ("frozen") outputs for one batch.

    Attributes:
        logits: [N, C] teacher logits; their argmax is the explained class.
        explanation: the teacher's explanation for its top-1 class, [N, 6, H, W] (B-cos) or
            [N, 1, H, W] (GradCAM), aligned with the batch's images (same crop and flip).
    """

    logits: Tensor
    explanation: Tensor | None = None


def e2kd_objective(
    student: nn.Module,
    teacher: nn.Module | None,
    x: Tensor,
    *,
    tau: float = 1.0,
    lam: float = 1.0,
    explanation: str = "bcos",
    labels: Tensor | None = None,
    gt_coef: float = 0.0,
    logit_coef: float = 1.0,
    step: int = 0,
    guided_step_interval: int = 1,
    frozen: TeacherOutputs | None = None,
    algorithm: str = "autograd",
    multilabel: bool = False,
) -> dict[str, Tensor]:
    """One batch of the e²KD objective (λ = 0 gives the KD baseline).

    Args:
        student: the model being trained (its train/eval mode is used as it is).
        teacher: the teacher, in eval mode with frozen parameters; None with ``frozen`` outputs.
        x: [N, C, H, W] the batch both models see (6-channel encoding for B-cos models, normalised
            RGB for standard models).
        tau: KD temperature τ > 0.
        lam: weight λ ≥ 0 of the explanation term.
        explanation: ``"bcos"`` (dynamic weights) or ``"gradcam"`` (standard networks).
        labels: [N] class indices or [N, C] dense (mixup) targets, for the ground-truth term.
        gt_coef: weight of the ground-truth term: BCE with uniform off-labels for B-cos, cross-entropy
            for GradCAM students (0 in every official configuration).
        logit_coef: weight β > 0 of the KD (teacher-logit) term.
        step: the optimiser step index, for ``guided_step_interval``.
        guided_step_interval: compute the explanation term only on steps divisible by this (K = 16
            for ResNets, 4 for ViTs in the official "efficient" configs); other steps are KD only.
        frozen: precomputed teacher outputs instead of running ``teacher``.
        algorithm: how B-cos explanations are computed: ``"autograd"`` (the reference) or ``"sweep"``
            (explicit reverse sweep, first-order autograd only); both give the same loss and gradient.
        multilabel: multi-hot ``labels`` [N, C] (VOC): the KD term is `multilabel_kd` (per-class sigmoid
            KL), the ground-truth term multi-hot BCE; the explained class is still the teacher's top-1.

    Returns:
        A dict of tensors: ``loss`` (differentiable), and detached ``kd``, ``exp`` (0 on steps
        without explanation), ``gt``, ``agreement`` (share of samples where the student's top-1 is
        the teacher's), ``explanation_cosine`` (mean cosine, NaN on steps without explanation),
        ``target`` ([N], the teacher's top-1), ``student_logits``, ``teacher_logits``.
    """
    if explanation not in EXPLANATIONS:
        raise ValueError(f"explanation must be one of {EXPLANATIONS}, got {explanation!r}")
    if tau <= 0 or lam < 0 or gt_coef < 0 or logit_coef <= 0:
        raise ValueError(
            f"need tau > 0, lam >= 0, gt_coef >= 0 and logit_coef > 0; "
            f"got tau={tau}, lam={lam}, gt_coef={gt_coef}, logit_coef={logit_coef}"
        )
    if guided_step_interval < 1:
        raise ValueError(f"guided_step_interval must be >= 1, got {guided_step_interval}")
    if teacher is None and frozen is None:
        raise ValueError("e2kd_objective needs a teacher model or its frozen outputs")
    if gt_coef > 0 and labels is None:
        raise ValueError("gt_coef > 0 needs the ground-truth labels")
    explain_now = lam > 0 and step % guided_step_interval == 0
    explain = _explainer(explanation, algorithm)

    if frozen is None:
        frozen = teacher_outputs(teacher, x, explanation=explanation, explain=explain_now, algorithm=algorithm)
    teacher_logits, teacher_map = _stored_outputs(frozen, x, explain_now)
    target = teacher_logits.argmax(1)
    if explain_now:
        student_map, student_logits = explain(student, x, target, create_graph=True, return_logits=True)
        if teacher_map is None:
            raise ValueError("frozen teacher outputs hold no explanation, but this step needs one (lam > 0)")
        if student_map.shape != teacher_map.shape:
            raise ValueError(
                f"student explanation {tuple(student_map.shape)} and teacher explanation "
                f"{tuple(teacher_map.shape)} differ in shape"
            )
        if multilabel:
            kd = multilabel_kd(student_logits, teacher_logits.to(student_logits.dtype), tau)
            exp = explanation_cosine_loss(student_map, teacher_map.to(student_map.dtype))
            distill = logit_coef * kd + lam * exp
        else:
            distill, kd, exp = distill_loss(
                student_logits,
                teacher_logits.to(student_logits.dtype),
                student_map,
                teacher_map.to(student_map.dtype),
                tau,
                lam / logit_coef,
            )
            if logit_coef != 1:
                distill = logit_coef * distill
        cosine = 1 - exp.detach()  # the batch mean of the cosines
    else:
        student_logits = student(x)
        kd = (multilabel_kd if multilabel else kd_kl)(student_logits, teacher_logits.to(student_logits.dtype), tau)
        distill, exp = (kd if logit_coef == 1 else logit_coef * kd), student_logits.new_zeros(())
        cosine = student_logits.new_tensor(float("nan"))

    gt = student_logits.new_zeros(())
    if gt_coef > 0:
        gt = ground_truth_loss(student_logits, labels, bcos=explanation == "bcos", multilabel=multilabel)
    loss = distill + gt_coef * gt if gt_coef > 0 else distill
    return {
        "loss": loss,
        "kd": kd.detach(),
        "exp": exp.detach(),
        "gt": gt.detach(),
        "agreement": (student_logits.argmax(1) == target).float().mean().detach(),
        "explanation_cosine": cosine,
        "target": target,
        "student_logits": student_logits.detach(),
        "teacher_logits": teacher_logits,
    }


def _explainer(explanation: str, algorithm: str):
    """The explanation function: B-cos dynamic weights by ``algorithm``, or GradCAM."""
    return partial(dynamic_weights, algorithm=algorithm) if explanation == "bcos" else gradcam


def teacher_outputs(
    teacher: nn.Module, x: Tensor, *, explanation: str = "bcos", explain: bool = True, algorithm: str = "autograd"
) -> TeacherOutputs:
    """A live teacher's outputs for the batch ``x``, without any autograd graph.

    The logits [N, C] and, with ``explain``, the explanation for the teacher's own top-1 (the class
    the student explains too) from the same forward; ``algorithm`` as in `e2kd_objective`.
    `e2kd_objective` calls it for a live teacher; the training step runs it as the teacher's own
    inference graph and hands the result to the objective as if it were stored.
    """
    if not explain:
        # Leave the no_grad block before returning: a return inside it loses the student's graph
        # under torch.compile (torch 2.14; the grad mode is not restored in the traced graph).
        with torch.no_grad():
            logits = teacher(x)
        return TeacherOutputs(logits)
    teacher_map, logits = _explainer(explanation, algorithm)(teacher, x, None, create_graph=False, return_logits=True)
    return TeacherOutputs(logits.detach(), teacher_map.detach())


def _stored_outputs(frozen: TeacherOutputs, x: Tensor, explain_now: bool) -> tuple[Tensor, Tensor | None]:
    """(logits [N, C], explanation or None) of stored teacher outputs, detached."""
    if frozen.logits.shape[0] != x.shape[0]:
        raise ValueError(f"frozen teacher logits cover {frozen.logits.shape[0]} samples, the batch has {x.shape[0]}")
    explanation = None if frozen.explanation is None or not explain_now else frozen.explanation.detach()
    return frozen.logits.detach(), explanation
