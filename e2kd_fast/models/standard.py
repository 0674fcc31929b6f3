"""Standard (non-B-cos) torchvision models for the GradCAM variant of e²KD.

They take a mean/std-normalised RGB image. Weights are never downloaded: load torchvision
checkpoint files with `e2kd_fast.models.load_checkpoint`.
"""

from __future__ import annotations

import re

import torchvision
from torch import Tensor, nn

from e2kd_fast.models._registry import register_model

# Old torchvision DenseNet checkpoints name dense-layer modules "norm.1", "conv.2", ...
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _convert_densenet_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        match = _LEGACY_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _densenet(builder, num_classes: int, **kwargs) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    model.convert_state_dict = _convert_densenet_state_dict
    return model


@register_model("standard")
def resnet18(num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision ResNet-18 (11.69M parameters)."""
    return torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs)


@register_model("standard")
def resnet34(num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision ResNet-34 (21.80M). The GradCAM teacher of GoodTeachersExplain."""
    return torchvision.models.resnet34(weights=None, num_classes=num_classes, **kwargs)


@register_model("standard")
def resnet50(num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision ResNet-50 (25.56M)."""
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


@register_model("standard")
def densenet121(num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision DenseNet-121 (7.98M)."""
    return _densenet(torchvision.models.densenet121, num_classes, **kwargs)


@register_model("standard")
def densenet169(num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision DenseNet-169 (14.15M)."""
    return _densenet(torchvision.models.densenet169, num_classes, **kwargs)
