"""B-cos DenseNets (121/161/169/201). Module names follow the official `bcos` models.

B-cos changes to the torchvision DenseNet: no ReLU, B-cos convs, no-bias norms, average pooling in
the stem, and a 1×1 B-cos conv classifier before global average pooling plus a constant logit bias.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast.models._registry import register_model
from e2kd_fast.nn import BcosConv2d, LogitLayer, make_norm2d


class DenseLayer(nn.Module):
    """norm → 1×1 conv → norm → 3×3 conv on the concatenation of all previous features."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int, drop_rate: float, conv, norm) -> None:
        super().__init__()
        self.norm1 = norm(in_features)
        self.conv1 = conv(in_features, bn_size * growth_rate, kernel_size=1)
        self.norm2 = norm(bn_size * growth_rate)
        self.conv2 = conv(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[Tensor]) -> Tensor:
        out = self.conv1(self.norm1(torch.cat(features, 1)))
        out = self.conv2(self.norm2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; returns the concatenation [N, C_in + L·growth, H, W]."""

    def __init__(self, num_layers: int, in_features: int, bn_size: int, growth_rate: int, drop_rate: float, conv, norm):
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_features + i * growth_rate, growth_rate, bn_size, drop_rate, conv, norm)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """norm → 1×1 conv (halving the channels) → 2×2 average pool."""

    def __init__(self, in_features: int, out_features: int, conv, norm) -> None:
        super().__init__()
        self.add_module("norm", norm(in_features))
        self.add_module("conv", conv(in_features, out_features, kernel_size=1))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class BcosDenseNet(nn.Module):
    """A B-cos DenseNet.

    Args:
        growth_rate, block_config, num_init_features, bn_size, drop_rate: as torchvision's DenseNet.
        num_classes: outputs of the 1×1 B-cos classifier.
        in_chans: input channels (6 for the [x, 1 − x] encoding).
        small_inputs: a 3×3 stride-1 stem without norm and pooling (32 px images).
        norm, b, max_out, logit_bias: as `BcosResNet`.

    Shapes:
        input [N, in_chans, H, W] → logits [N, num_classes].
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 6,
        small_inputs: bool = False,
        norm: str = "bnu",
        b: float = 2,
        max_out: int = 1,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        conv = partial(BcosConv2d, b=b, max_out=max_out)
        norm_layer = make_norm2d(norm)
        if small_inputs:
            stem = [("conv0", conv(in_chans, num_init_features, kernel_size=3, padding=1))]
        else:
            stem = [
                ("conv0", conv(in_chans, num_init_features, kernel_size=7, stride=2, padding=3)),
                ("norm0", norm_layer(num_init_features)),
                ("pool0", nn.AvgPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate, conv, norm_layer)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2, conv, norm_layer))
                channels //= 2
        self.features.add_module("norm5", norm_layer(channels))
        self.num_features = channels
        self.num_classes = num_classes
        self.classifier = conv(channels, num_classes, kernel_size=1)
        self.logit_layer = LogitLayer(logit_bias=-math.log(num_classes - 1) if logit_bias is None else logit_bias)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, in_chans, H, W] → [N, num_features, h, w]."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(self.classifier(self.features(x)), (1, 1))
        return self.logit_layer(out.flatten(1))


@register_model("bcos")
def bcos_densenet121(num_classes: int = 1000, **kwargs) -> BcosDenseNet:
    """B-cos DenseNet-121 (7.95M parameters; official top-1 73.61 %)."""
    return BcosDenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_densenet161(num_classes: int = 1000, **kwargs) -> BcosDenseNet:
    """B-cos DenseNet-161 (28.58M; 76.62 %)."""
    return BcosDenseNet(48, (6, 12, 36, 24), 96, num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_densenet169(num_classes: int = 1000, **kwargs) -> BcosDenseNet:
    """B-cos DenseNet-169 (14.08M; 75.19 %). The default GoodTeachersExplain teacher."""
    return BcosDenseNet(32, (6, 12, 32, 32), 64, num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_densenet201(num_classes: int = 1000, **kwargs) -> BcosDenseNet:
    """B-cos DenseNet-201 (19.91M; 75.48 %)."""
    return BcosDenseNet(32, (6, 12, 48, 32), 64, num_classes=num_classes, **kwargs)
