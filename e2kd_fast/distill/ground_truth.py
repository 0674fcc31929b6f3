"""The classification loss against the labels, for every model family and label kind."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from e2kd_fast.distill.multilabel import multilabel_bce
from e2kd_fast.reference.losses import uniform_off_label_bce


def ground_truth_loss(logits: Tensor, labels: Tensor, *, bcos: bool, multilabel: bool = False) -> Tensor:
    """The loss of supervised training (``distill.method none``) and the validation loss's ``gt`` term.

    B-cos models: BCE with uniform off-labels at 1/C (`uniform_off_label_bce`, single- or multi-label);
    standard models: multi-hot BCE (`multilabel_bce`) with ``multilabel``, else cross-entropy. Also the
    ground-truth term of `e2kd_fast.distill.e2kd_objective`.

    Args:
        logits: [N, C] the model's logits.
        labels: [N] class indices, or [N, C] multi-hot / mixed (mixup) targets.
        bcos: the model is a B-cos network.
        multilabel: the labels are multi-hot (VOC).

    Returns:
        The batch mean, 0-dim.
    """
    if bcos:
        return uniform_off_label_bce(logits, labels)
    return multilabel_bce(logits, labels) if multilabel else F.cross_entropy(logits, labels)


__all__ = ["ground_truth_loss"]
