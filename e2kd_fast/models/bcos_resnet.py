"""B-cos ResNets and ResNeXts (ImageNet) and the small B-cos ResNets for 32–64 px images.

B-cos changes to the torchvision ResNet: no ReLU, B-cos convs without bias, no-bias norms, an
average-pool stem, and the classifier as a 1×1 B-cos conv applied *before* global average pooling,
followed by a constant logit bias. Module names follow the official `bcos` models so their
checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from e2kd_fast.models._registry import register_model
from e2kd_fast.nn import BcosConv2d, LogitLayer, make_norm2d

ConvFactory = Callable[..., nn.Module]
NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3×3 B-cos convs with norms, plus the (projected) identity. [N, C_in, H, W] → [N, planes, H/s, W/s]."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        conv: ConvFactory,
        norm: NormFactory,
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=1, padding=1)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.stochastic_depth = StochasticDepth(drop_path, "row") if drop_path else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class Bottleneck(nn.Module):
    """1×1 → 3×3 (grouped for ResNeXt) → 1×1 B-cos convs with norms, plus the identity."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        conv: ConvFactory,
        norm: NormFactory,
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv(inplanes, width, kernel_size=1)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, kernel_size=3, stride=stride, padding=1, groups=groups)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * self.expansion, kernel_size=1)
        self.bn3 = norm(planes * self.expansion)
        self.downsample = downsample
        self.stochastic_depth = StochasticDepth(drop_path, "row") if drop_path else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class BcosResNet(nn.Module):
    """A B-cos ResNet with 3 or 4 stages.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage (3 stages for the small-input models, 4 for ImageNet).
        num_classes: outputs of the 1×1 B-cos classifier.
        in_chans: input channels (6 for the [x, 1 − x] encoding).
        groups, width_per_group: ResNeXt cardinality and width.
        inplanes: stem width (64 for ImageNet, 16 for the CIFAR models).
        small_inputs: a 3×3 stride-1 stem without pooling (32–64 px images).
        norm: the norm kind (see `e2kd_fast.nn.make_norm2d`); ``"bnu"`` for the ImageNet zoo.
        b, max_out: B-cos exponent and MaxOut units of every conv.
        stochastic_depth_prob: drop-path rate, growing linearly with depth (0 disables).
        logit_bias: constant added to the logits; default −log(num_classes − 1).

    Shapes:
        input [N, in_chans, H, W] → logits [N, num_classes].
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 6,
        groups: int = 1,
        width_per_group: int = 64,
        inplanes: int = 64,
        small_inputs: bool = False,
        norm: str = "bnu",
        b: float = 2,
        max_out: int = 1,
        stochastic_depth_prob: float = 0.0,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if len(layers) not in (3, 4):
            raise ValueError(f"BcosResNet needs 3 or 4 stages, got layers={layers}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        conv = partial(BcosConv2d, b=b, max_out=max_out)
        norm_layer = make_norm2d(norm)
        self.groups, self.base_width = groups, width_per_group
        if small_inputs:
            self.conv1 = conv(in_chans, inplanes, kernel_size=3, stride=1, padding=1)
            self.pool = None
        else:
            self.conv1 = conv(in_chans, inplanes, kernel_size=7, stride=2, padding=3)
            self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(inplanes)

        total_blocks, built = sum(layers), 0
        channels = inplanes
        stages = []
        for i, depth in enumerate(layers):
            planes, stride = inplanes * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or channels != planes * block.expansion):
                    downsample = nn.Sequential(
                        conv(channels, planes * block.expansion, kernel_size=1, stride=stride),
                        norm_layer(planes * block.expansion),
                    )
                drop = stochastic_depth_prob * built / max(total_blocks - 1, 1)
                blocks.append(
                    block(
                        channels,
                        planes,
                        stride if j == 0 else 1,
                        downsample,
                        conv,
                        norm_layer,
                        groups,
                        width_per_group,
                        drop,
                    )
                )
                channels, built = planes * block.expansion, built + 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        self.layer4 = stages[3] if len(stages) == 4 else None
        self.num_features = channels
        self.num_classes = num_classes
        self.fc = conv(channels, num_classes, kernel_size=1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.logit_layer = LogitLayer(logit_bias=-math.log(num_classes - 1) if logit_bias is None else logit_bias)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, in_chans, H, W] → the last stage's map [N, num_features, h, w]."""
        x = self.bn1(self.conv1(x))
        if self.pool is not None:
            x = self.pool(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return x if self.layer4 is None else self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.fc(self.forward_features(x)))
        return self.logit_layer(x.flatten(1))


@register_model("bcos")
def bcos_resnet18(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNet-18 (11.69M parameters; official top-1 68.74 %)."""
    return BcosResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_resnet34(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNet-34 (21.80M; 72.28 %). A GoodTeachersExplain teacher."""
    return BcosResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_resnet50(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNet-50 (25.54M with the official code; the official table says 25.52M; 75.88 %)."""
    return BcosResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_resnet101(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNet-101 (44.50M; 76.53 %)."""
    return BcosResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_resnet152(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNet-152 (60.13M; 76.48 %)."""
    return BcosResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_resnext50_32x4d(num_classes: int = 1000, **kwargs) -> BcosResNet:
    """B-cos ResNeXt-50 32×4d (25.00M; 75.82 %)."""
    return BcosResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, groups=32, width_per_group=4, **kwargs)


def _cifar(depth: int, num_classes: int, **kwargs) -> BcosResNet:
    kwargs.setdefault("small_inputs", True)
    return BcosResNet(BasicBlock, [(depth - 2) // 6] * 3, num_classes=num_classes, inplanes=16, **kwargs)


# The official CIFAR-10 B-cos ResNets (bcos.models.resnet.cifar10_resnet<depth>): 3 stages of
# 16/32/64 channels. Default here: uncentred batch norm, B = 2, no MaxOut. The official entry points
# build position norms instead, so a state dict of an official model built with its defaults loads
# only into norm="pn" (create_model("bcos_resnet20_cifar", norm="pn")). The official CIFAR-10
# configs train them without norms and with max_out=2: pass norm="none", max_out=2 for those files.
@register_model("bcos", default_num_classes=10)
def bcos_resnet20_cifar(num_classes: int = 10, **kwargs) -> BcosResNet:
    """B-cos ResNet-20 for 32–64 px images (3 × 3 basic blocks)."""
    return _cifar(20, num_classes, **kwargs)


@register_model("bcos", default_num_classes=10)
def bcos_resnet32_cifar(num_classes: int = 10, **kwargs) -> BcosResNet:
    """B-cos ResNet-32 for 32–64 px images (3 × 5 basic blocks)."""
    return _cifar(32, num_classes, **kwargs)


@register_model("bcos", default_num_classes=10)
def bcos_resnet44_cifar(num_classes: int = 10, **kwargs) -> BcosResNet:
    """B-cos ResNet-44 for 32–64 px images (3 × 7 basic blocks)."""
    return _cifar(44, num_classes, **kwargs)


@register_model("bcos", default_num_classes=10)
def bcos_resnet56_cifar(num_classes: int = 10, **kwargs) -> BcosResNet:
    """B-cos ResNet-56 for 32–64 px images (3 × 9 basic blocks)."""
    return _cifar(56, num_classes, **kwargs)


@register_model("bcos", default_num_classes=10)
def bcos_resnet110_cifar(num_classes: int = 10, **kwargs) -> BcosResNet:
    """B-cos ResNet-110 for 32–64 px images (3 × 18 basic blocks)."""
    return _cifar(110, num_classes, **kwargs)
