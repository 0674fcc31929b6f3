"""Evaluation: accuracy, agreement with the teacher, and explanation similarity."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.explain import dynamic_weights, gradcam
from e2kd_fast.metrics.scores import EvalExtras
from e2kd_fast.reference.losses import explanation_cosine


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose ``target`` is among the top-k logits, for each k (k capped at C).

    With multi-hot targets [N, C] (VOC) a sample counts when any of its top-k classes is present.
    """
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = target.gather(1, top) > 0 if target.dim() == 2 else top == target[:, None]
    return {k: int(hits[:, : min(k, max_k)].any(1).sum()) for k in ks}


def evaluate(
    student: nn.Module,
    batches: Iterable[dict],
    *,
    teacher: nn.Module | None = None,
    explanation: str | None = "bcos",
    device: torch.device | str = "cpu",
    prepare=None,
) -> dict[str, float]:
    """Evaluates ``student`` (and its agreement with ``teacher``) over ``batches``.

    Explanations are computed with gradients enabled and outside inference mode (the official
    validation under Lightning's inference mode could not compute them).

    Args:
        student: the model to evaluate; put in eval mode for the duration, then restored.
        batches: dicts with ``image`` [N, C, H, W] and ``target`` [N] (and optionally ``skipped``).
        teacher: if given, agreement (student top-1 = teacher top-1) is measured, and with
            ``explanation`` also the mean cosine between the explanations for the teacher's top-1.
        explanation: ``"bcos"``, ``"gradcam"`` or None (no explanation similarity).
        device: where to run.
        prepare: optional ``f(images) -> images`` applied on the device (dtype, memory format).

    Returns:
        ``top1``, ``top5`` (in [0, 1]), ``images``, ``skipped``, and with a teacher ``agreement``
        and, with an explanation, ``explanation_cosine``. Multi-hot targets add ``map``; batches with
        ``group`` / ``place`` add group, worst-group, ID and OOD accuracies (`EvalExtras`).
    """
    was_training = student.training
    student.eval()
    counts = {"images": 0, "top1": 0, "top5": 0, "agree": 0, "skipped": 0}
    cosine_sum = 0.0
    # The same explanation path as training (the sweep), not the double-backward reference.
    explainers = {"bcos": partial(dynamic_weights, algorithm="sweep"), "gradcam": gradcam}
    explain = explainers.get(explanation) if explanation else None
    extras = EvalExtras()  # VOC mAP, Waterbirds group accuracies (e2kd_fast.metrics.scores)
    try:
        for batch in batches:
            counts["skipped"] += int(batch.get("skipped", 0))
            images, target = batch["image"].to(device), batch["target"].to(device)
            if images.shape[0] == 0:
                continue
            if prepare is not None:
                images = prepare(images)
            with torch.no_grad():
                logits = student(images)
            hits = topk_correct(logits.float(), target)
            extras.update(batch, logits)
            counts["images"] += images.shape[0]
            counts["top1"] += hits[1]
            counts["top5"] += hits[5]
            if teacher is None:
                continue
            if explain is not None:
                teacher_map, teacher_logits = explain(teacher, images, None, create_graph=False, return_logits=True)
                teacher_top1 = teacher_logits.argmax(1)
                student_map = explain(student, images, teacher_top1, create_graph=False)
                cosine_sum += float(explanation_cosine(student_map.float(), teacher_map.float()).sum())
            else:
                with torch.no_grad():
                    teacher_top1 = teacher(images).argmax(1)
            counts["agree"] += int((logits.argmax(1) == teacher_top1).sum())
    finally:
        student.train(was_training)
    n = max(counts["images"], 1)
    result = {
        "top1": counts["top1"] / n,
        "top5": counts["top5"] / n,
        "images": counts["images"],
        "skipped": counts["skipped"],
        **extras.compute(),
    }
    if teacher is not None:
        result["agreement"] = counts["agree"] / n
        if explain is not None:
            result["explanation_cosine"] = cosine_sum / n
    return result
