"""GradCAM for standard (non-B-cos) networks, as the e²KD GradCAM variant uses it.

GradCAM = ReLU(Σ_k mean_{h,w}(∂y_c/∂A_k) · A_k) at the last stage's output A (torchvision ResNet:
``layer4``; DenseNet: ``relu(features(x))``), resized bilinearly to the input size (bcos_and_e2kd.md
§3.2). The forward is split at A explicitly (no hooks), so A is an ordinary graph node: the map is
differentiable with ``create_graph`` for a student and costs no graph for a frozen teacher.
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


def gradcam(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    create_graph: bool | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """ReLU-GradCAM of the last conv stage for class ``target``, resized to the input.

    Args:
        model: a torchvision ResNet or DenseNet (its current train/eval mode is used).
        x: [N, 3, H, W] normalised images.
        target: [N] classes to explain; None explains the model's own top-1.
        create_graph: keep the map differentiable (default: when grad mode is on and the model has
            trainable parameters, i.e. a student).
        return_logits: also return the logits of the same forward.

    Returns:
        The map [N, 1, H, W] (and the logits [N, num_classes] if asked).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("GradCAM needs autograd: compute it outside torch.inference_mode()")
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        activations, head = split_forward(model, x)
        if not activations.requires_grad:  # a frozen teacher: differentiate w.r.t. A only
            activations = activations.detach().requires_grad_(True)
        logits = head(activations)
        if target is None:
            target = logits.argmax(1)
        check_target(target, logits.shape[0], logits.shape[1])
        selected = logits.gather(1, target[:, None].long()).sum()
        (grads,) = torch.autograd.grad(
            selected, activations, create_graph=create_graph, retain_graph=create_graph or return_logits
        )
        channel_weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((channel_weights * activations).sum(1, keepdim=True))
        if not create_graph:
            cam = cam.detach()
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return (cam, logits) if return_logits else cam
