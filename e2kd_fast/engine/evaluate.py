"""Evaluation: accuracy, agreement with the teacher, and explanation similarity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from e2kd_fast.config import BASELINE_DEFAULTS
from e2kd_fast.distill.ground_truth import ground_truth_loss
from e2kd_fast.distill.multilabel import multilabel_kd
from e2kd_fast.explain import dynamic_weights, gradcam
from e2kd_fast.metrics.scores import EvalExtras
from e2kd_fast.reference.losses import explanation_cosine, explanation_cosine_loss, kd_kl

# The validation loss terms `evaluate` reports (batch means weighted by the batch's images).
LOSS_KEYS = ("loss", "kd", "exp", "gt")


def topk_hits(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose ``target`` is among the top-k logits, for each k (k capped at C), as
    0-dim integer tensors on ``logits``' device (no host sync).

    Args:
        logits: [N, C].
        target: [N] class indices, or [N, C] multi-hot (VOC): a sample counts when any of its top-k
            classes is present.
    """
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = target.gather(1, top) > 0 if target.dim() == 2 else top == target[:, None]
    return {k: hits[:, : min(k, max_k)].any(1).sum() for k in ks}


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """`topk_hits` as Python ints."""
    return {k: int(v) for k, v in topk_hits(logits, target, ks).items()}


@dataclass(frozen=True)
class ValidationLoss:
    """The training objective, evaluated on validation batches (the official ``val_loss``).

    ``method`` ``"kd"`` / ``"e2kd"``: ``loss = β·τ²·KL(p_T^τ ‖ p_S^τ) + λ·mean(1 − cos(E_S, E_T)) +
    gt_coef·L_gt``, with the teacher's logits and explanation computed live on the validation image and
    both explanations taken for the teacher's top-1 class, as in training (λ = 0 for ``kd``; the
    explanation term is always included, whatever ``guided_step_interval``). ``"none"`` (supervised
    training, e.g. of a teacher): ``loss = L_gt``, the objective that training minimises. ``L_gt`` is
    `ground_truth_loss` and is reported in every case (the official ``gt_logit_loss``).

    Attributes:
        method: ``"none"``, ``"kd"`` or ``"e2kd"``.
        tau, lam, gt_coef, logit_coef: as ``distill.tau``, ``distill.lam`` (e²KD only),
            ``distill.gt_coef`` and ``distill.logit_coef`` (β).
        bcos: the ground-truth loss is the B-cos one (uniform off-label BCE).
        multilabel: multi-hot targets (VOC): per-class KD and BCE.
    """

    method: str
    tau: float = 1.0
    lam: float = 0.0
    gt_coef: float = 0.0
    logit_coef: float = 1.0
    bcos: bool = True
    multilabel: bool = False

    @classmethod
    def from_config(cls, cfg, bcos_student: bool) -> ValidationLoss | None:
        """The validation loss of a run's config; None for the feature baselines (their terms need the
        connectors and stage features, which evaluation does not compute)."""
        d = cfg.distill
        if d.method in BASELINE_DEFAULTS:
            return None
        bcos = bcos_student if d.method == "none" else d.explanation == "bcos"
        lam = d.lam if d.method == "e2kd" else 0.0
        return cls(
            d.method, tau=d.tau, lam=lam, gt_coef=d.gt_coef, logit_coef=d.logit_coef, bcos=bcos, multilabel=d.multilabel
        )

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None = None,
        student_map: Tensor | None = None,
        teacher_map: Tensor | None = None,
    ) -> dict[str, Tensor] | None:
        """The batch means of `LOSS_KEYS` (``exp`` only with λ > 0), or None when the batch lacks what the
        loss needs (no teacher outputs for a distillation loss, no explanations with λ > 0).

        Args:
            logits: [N, C] student logits (float32).
            labels: [N] class indices or [N, C] multi-hot targets.
            teacher_logits: [N, C] teacher logits.
            student_map, teacher_map: [N, ...] explanations for the teacher's top-1 class.
        """
        gt = ground_truth_loss(logits, labels, bcos=self.bcos, multilabel=self.multilabel)
        if self.method == "none":
            return {"loss": gt, "gt": gt}
        if teacher_logits is None or (self.lam > 0 and (student_map is None or teacher_map is None)):
            return None
        kd = (multilabel_kd if self.multilabel else kd_kl)(logits, teacher_logits.float(), self.tau)
        out = {"kd": kd, "gt": gt}
        loss = kd if self.logit_coef == 1 else self.logit_coef * kd
        if self.lam > 0:
            out["exp"] = explanation_cosine_loss(student_map.float(), teacher_map.float())
            loss = loss + self.lam * out["exp"]
        out["loss"] = loss + self.gt_coef * gt if self.gt_coef > 0 else loss
        return out


def evaluate(
    student: nn.Module,
    batches: Iterable[dict],
    *,
    teacher: nn.Module | None = None,
    explanation: str | None = "bcos",
    device: torch.device | str = "cpu",
    prepare=None,
    loss: ValidationLoss | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
) -> dict[str, float]:
    """Evaluates ``student`` (and its agreement with ``teacher``) over ``batches``.

    Explanations are computed with gradients enabled and outside inference mode (the official
    validation under Lightning's inference mode could not compute them).

    Split over processes (``gather`` given), each process evaluates its own share of the images and
    the shares are then put together: image counts are summed exactly, cosine and loss sums in
    float64 (so the metrics match one process's up to the float32 rounding of per-batch values,
    which differs with the batches' make-up), and the per-image scores that mAP and the group
    accuracies need are gathered, so those are computed over all images.

    Args:
        student: the model to evaluate; put in eval mode for the duration, then restored.
        batches: dicts with ``image`` [N, C, H, W] and ``target`` [N] (and optionally ``skipped``).
        teacher: if given, agreement (student top-1 = teacher top-1) is measured, and with
            ``explanation`` also the mean cosine between the explanations for the teacher's top-1.
        explanation: ``"bcos"``, ``"gradcam"`` or None (no explanation similarity).
        device: where to run.
        prepare: optional ``f(images) -> images`` applied on the device (dtype, memory format).
        loss: the validation loss to compute (`ValidationLoss`); a distillation loss needs ``teacher``
            (and with λ > 0 ``explanation``).
        gather: for an evaluation split over processes, a collective ``f(obj) -> [obj of rank 0,
            obj of rank 1, ...]`` (`Strategy.all_gather_object`) that every process calls once. The
            shares must be round-robin: rank r of W holds positions r, r + W, ... of the evaluation
            order (`ShardedEpochSampler`), every image in exactly one share. No other collective runs,
            so the processes may have different numbers of batches.

    Returns:
        ``top1``, ``top5`` (in [0, 1]), ``images``, ``skipped``, and with a teacher ``agreement``
        and, with an explanation, ``explanation_cosine``. With ``loss``: ``loss``, ``kd``, ``exp``,
        ``gt`` (those it gives), means over the images. Multi-hot targets add ``map``; batches with
        ``group`` / ``place`` add group, worst-group, ID and OOD accuracies (`EvalExtras`). With
        ``gather``, the metrics of all shares together, the same on every process.
    """
    was_training = student.training
    student.eval()
    counts = {"images": 0, "top1": 0, "top5": 0, "agree": 0, "skipped": 0}
    cosine_sum = 0.0
    loss_sums: dict[str, float] | None = {} if loss is not None else None  # None: a batch could not give it
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
            teacher_logits = student_map = teacher_map = None
            if teacher is not None:
                if explain is not None:
                    teacher_map, teacher_logits = explain(teacher, images, None, create_graph=False, return_logits=True)
                    teacher_top1 = teacher_logits.argmax(1)
                    student_map = explain(student, images, teacher_top1, create_graph=False)
                    cosine_sum += float(explanation_cosine(student_map.float(), teacher_map.float()).sum())
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    teacher_top1 = teacher_logits.argmax(1)
                counts["agree"] += int((logits.argmax(1) == teacher_top1).sum())
            if loss_sums is not None:
                with torch.no_grad():
                    terms = loss(logits.float(), target, _detached(teacher_logits), student_map, teacher_map)
                if terms is None:
                    loss_sums = None
                else:
                    for key, value in terms.items():
                        loss_sums[key] = loss_sums.get(key, 0.0) + float(value) * images.shape[0]
    finally:
        student.train(was_training)
    if gather is not None:
        counts, cosine_sum, loss_sums, extras = _combine_shards(gather((counts, cosine_sum, loss_sums, extras)))
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
    if loss_sums and counts["images"]:
        result.update({key: loss_sums[key] / n for key in LOSS_KEYS if key in loss_sums})
    return result


def _combine_shards(
    shards: list[tuple[dict[str, int], float, dict[str, float] | None, EvalExtras]],
) -> tuple[dict[str, int], float, dict[str, float] | None, EvalExtras]:
    """The tallies of every process's share (counts, cosine sum, loss sums, extras), in rank order, as one."""
    counts = {key: sum(shard[0][key] for shard in shards) for key in shards[0][0]}
    cosine_sum = math.fsum(shard[1] for shard in shards)  # correctly rounded: independent of the rank order
    loss_sums = None
    if all(shard[2] is not None for shard in shards):  # one batch without the loss anywhere drops it, as on one process
        keys = sorted({key for shard in shards for key in shard[2]})
        loss_sums = {key: math.fsum(shard[2].get(key, 0.0) for shard in shards) for key in keys}
    return counts, cosine_sum, loss_sums, EvalExtras.combine([shard[3] for shard in shards])


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()
