"""GradCAM for standard (non-B-cos) networks, as the e²KD GradCAM variant uses it.

GradCAM = ReLU(Σ_k mean_{h,w}(∂y_c/∂A_k) · A_k) at the last stage's output A (torchvision ResNet:
``layer4``; DenseNet: ``relu(features(x))``), resized bilinearly to the input size (GTE's
``GRAD_CAM_POS`` in ``bcos/distillation_methods/TeachersExplain.py``). The forward is split at A
explicitly (no hooks), so A is an ordinary graph node: the map is differentiable with ``create_graph``
for a student and costs no graph for a frozen teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from e2kd_fast.reference.explain import check_target


def split_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, nn.Module]:
    """Runs ``model`` up to its last conv stage.

    Args:
        model: a torchvision ResNet or DenseNet.
        x: [N, 3, H, W] normalised images.

    Returns:
        (A [N, K, h, w], head) where ``head(A)`` gives the logits [N, num_classes].
    """
    if isinstance(model, torchvision.models.ResNet):
        a = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        a = model.layer4(model.layer3(model.layer2(model.layer1(a))))
        return a, _ResNetHead(model)
    if isinstance(model, torchvision.models.DenseNet):
        return F.relu(model.features(x)), _DenseNetHead(model)
    raise TypeError(
        f"GradCAM supports torchvision ResNets and DenseNets (the standard models of the zoo), "
        f"not {type(model).__name__}; B-cos models are explained by their dynamic weights"
    )


class _ResNetHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, a: Tensor) -> Tensor:
        return self.model.fc(torch.flatten(self.model.avgpool(a), 1))


class _DenseNetHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, a: Tensor) -> Tensor:
        return self.model.classifier(torch.flatten(F.adaptive_avg_pool2d(a, (1, 1)), 1))


def head_weight(model: nn.Module) -> Tensor:
    """The classifier weight [num_classes, K] applied after global average pooling of A."""
    return model.fc.weight if isinstance(model, torchvision.models.ResNet) else model.classifier.weight


def gradcam(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    create_graph: bool | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """ReLU-GradCAM of the last conv stage for class ``target``, resized to the input.

    The head after A is global average pooling and a linear layer, so ∂y_c/∂A_k is W[c, k]/(h·w) at
    every position and the GradCAM channel weights are exactly W[c]/(h·w): computed in closed form,
    without an autograd call (same values and gradient; compiles in one graph).

    Args:
        model: a torchvision ResNet or DenseNet (its current train/eval mode is used).
        x: [N, 3, H, W] normalised images.
        target: [N] classes to explain; None explains the model's own top-1.
        create_graph: keep the map differentiable (default: when grad mode is on and the model has
            trainable parameters, i.e. a student); otherwise it is computed under ``no_grad``.
        return_logits: also return the logits of the same forward.

    Returns:
        The map [N, 1, H, W] (and the logits [N, num_classes] if asked).
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    with torch.set_grad_enabled(create_graph):
        activations, head = split_forward(model, x)
        logits = head(activations)
        if target is None:
            target = logits.argmax(1)
        check_target(target, logits.shape[0], logits.shape[1])
        cam = linear_head_cam(activations, head_weight(model)[target.long()], x.shape[-2:])
    return (cam, logits) if return_logits else cam


def linear_head_cam(activations: Tensor, class_weights: Tensor, size: tuple[int, int]) -> Tensor:
    """GradCAM in closed form for a head that is global average pooling then a linear layer.

    ∂y_c/∂A_k = W[c, k]/(h·w) at every position, so the channel weights are W[c]/(h·w).

    Args:
        activations: A [N, K, h, w].
        class_weights: [N, K] the linear layer's weight rows W[c] of the explained classes (the
            columns that multiply the pooled A; other inputs of the layer do not change ∂y_c/∂A).
        size: (H, W) of the returned map.

    Returns:
        ReLU(Σ_k W[c, k]/(h·w) · A_k), bilinearly resized: [N, 1, H, W].
    """
    h, w = activations.shape[-2:]
    channel_weights = class_weights / (h * w)  # [N, K] = mean of ∂y_c/∂A_k
    cam = F.relu((channel_weights[:, :, None, None] * activations).sum(1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
