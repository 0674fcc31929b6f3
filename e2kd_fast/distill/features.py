"""Stage features, pooled feature, logits and class activation maps of a zoo model in one forward.

Feature-based KD baselines (AT, NST, AB, CAT-KD, ReviewKD; docs/baselines.md) compare intermediate
maps of student and teacher. `forward_stages` re-runs each supported architecture's forward
explicitly, stage by stage, and returns every intermediate it needs, so there are no forward hooks
and `torch.compile(fullgraph=True)` captures it like any other code. Its logits are those of
``model(x)`` (tested).

Stages (4 per model; 3 for the small-input B-cos ResNets):

    ResNet (B-cos and torchvision)   outputs of layer1 … layer4
    DenseNet (B-cos and torchvision) outputs of denseblock1 … denseblock3, then norm5(denseblock4),
                                     the map the classifier sees
    B-cos ViT                        the tokens after blocks depth/4, depth/2, 3·depth/4, depth,
                                     laid out as maps [N, dim, H/p, W/p]

Pre- and post-activation: B-cos networks have no activation functions, so both lists hold the same
tensors. torchvision ResNets end each stage with a ReLU; the pre-activation is the last block's
residual sum before it (computed explicitly). torchvision DenseNet block outputs are concatenations
of conv outputs (no activation follows inside the block), so pre = post there, except the last stage
where post = ReLU(norm5(·)) as torchvision's classifier sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from e2kd_fast.models.bcos_densenet import BcosDenseNet
from e2kd_fast.models.bcos_resnet import BcosResNet
from e2kd_fast.models.bcos_vit import BcosViT, sincos_position_embedding

SUPPORTED = "B-cos ResNets/ResNeXts/DenseNets/ViTs and torchvision ResNets/DenseNets"


@dataclass
class Stages:
    """What one forward of `forward_stages` returns.

    Attributes:
        feats: post-activation stage outputs, each [N, C_j, H_j, W_j] (what the next stage reads).
        preact: pre-activation stage outputs, same shapes (the same tensors for B-cos models).
        pooled: [N, C_last] the globally averaged last-stage map the classifier reads.
        logits: [N, num_classes], equal to ``model(x)``.
        cam: [N, num_classes, H_last, W_last] class activation maps whose spatial mean is the logits
            minus the constant B-cos logit bias (B-cos CNNs: the 1×1 B-cos classifier applied before
            pooling; torchvision CNNs: the linear classifier, bias included, applied at every
            position); None unless asked for.
    """

    feats: list[Tensor]
    preact: list[Tensor]
    pooled: Tensor
    logits: Tensor
    cam: Tensor | None = None


def forward_stages(model: nn.Module, x: Tensor, *, cam: bool = False) -> Stages:
    """Runs ``model`` on ``x`` once and returns its stage features and logits.

    Args:
        model: a zoo model (see `SUPPORTED`); its current train/eval mode is used.
        x: [N, 6, H, W] for B-cos models ([x, 1 − x]), [N, 3, H, W] normalised RGB otherwise.
        cam: also compute the class activation maps (not available for ViTs, which pool before
            their head).

    Returns:
        `Stages`.

    Raises:
        TypeError: an unsupported architecture, or ``cam=True`` for a ViT.
    """
    if isinstance(model, BcosResNet):
        return _bcos_resnet(model, x, cam)
    if isinstance(model, BcosDenseNet):
        return _bcos_densenet(model, x, cam)
    if isinstance(model, torchvision.models.ResNet):
        return _tv_resnet(model, x, cam)
    if isinstance(model, torchvision.models.DenseNet):
        return _tv_densenet(model, x, cam)
    if isinstance(model, BcosViT):
        if cam:
            raise TypeError(
                "class activation maps need a classifier applied at every position before pooling; the B-cos "
                "ViT pools its tokens before its norm and B-cos head, so CAT-KD does not support ViTs"
            )
        return _bcos_vit(model, x)
    raise TypeError(f"feature distillation supports {SUPPORTED}, not {type(model).__name__}")


def check_supported(model: nn.Module, *, cam: bool = False, role: str = "model") -> None:
    """Raises a TypeError naming ``role`` unless `forward_stages` supports ``model`` (and CAMs)."""
    kinds = (BcosResNet, BcosDenseNet, torchvision.models.ResNet, torchvision.models.DenseNet)
    if cam and isinstance(model, BcosViT):
        raise TypeError(f"the {role} is a B-cos ViT, which has no class activation maps (it pools before its head)")
    if not isinstance(model, (*kinds, BcosViT)):
        raise TypeError(f"the {role} ({type(model).__name__}) is not supported: feature distillation needs {SUPPORTED}")


@torch.no_grad()
def stage_shapes(model: nn.Module, in_chans: int, size: int = 64) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each stage for a ``size``² input, by a dry run in eval mode.

    The model's train/eval flags are restored afterwards and no running statistic changes. Channels
    do not depend on ``size``; spatial sizes do.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        p = next(model.parameters())
        out = forward_stages(model, torch.zeros(1, in_chans, size, size, device=p.device, dtype=p.dtype))
    finally:
        for m, mode in modes:
            m.training = mode
    return [tuple(f.shape[1:]) for f in out.preact]


def _pool(a: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(a, 1).flatten(1)


def _bcos_resnet(model: BcosResNet, x: Tensor, cam: bool) -> Stages:
    a = model.bn1(model.conv1(x))
    if model.pool is not None:
        a = model.pool(a)
    feats = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        if layer is not None:
            a = layer(a)
            feats.append(a)
    maps = model.fc(a)  # the 1×1 B-cos classifier runs before pooling: its output is the CAM
    logits = model.logit_layer(model.avgpool(maps).flatten(1))
    return Stages(feats, feats, _pool(a), logits, maps if cam else None)


def _bcos_densenet(model: BcosDenseNet, x: Tensor, cam: bool) -> Stages:
    feats = []
    a = x
    for name, module in model.features.named_children():
        a = module(a)
        if name.startswith("denseblock") and name != f"denseblock{_num_blocks(model.features)}":
            feats.append(a)
    feats.append(a)  # norm5(denseblock_last)
    maps = model.classifier(a)
    logits = model.logit_layer(F.adaptive_avg_pool2d(maps, 1).flatten(1))
    return Stages(feats, feats, _pool(a), logits, maps if cam else None)


def _num_blocks(features: nn.Sequential) -> int:
    return sum(1 for name, _ in features.named_children() if name.startswith("denseblock"))


def _tv_block_preact(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision residual block without its final ReLU: the residual sum [N, C, H, W]."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


def _linear_cam(a: Tensor, linear: nn.Linear) -> Tensor:
    """The linear classifier at every position: [N, C, H, W] → [N, K, H, W] (bias included)."""
    return F.conv2d(a, linear.weight[:, :, None, None], linear.bias)


def _tv_resnet(model: torchvision.models.ResNet, x: Tensor, cam: bool) -> Stages:
    a = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats, preact = [], []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        blocks = list(layer.children())
        for block in blocks[:-1]:
            a = block(a)
        pre = _tv_block_preact(blocks[-1], a)
        a = F.relu(pre)
        preact.append(pre)
        feats.append(a)
    pooled = _pool(a)
    logits = model.fc(pooled)
    return Stages(feats, preact, pooled, logits, _linear_cam(a, model.fc) if cam else None)


def _tv_densenet(model: torchvision.models.DenseNet, x: Tensor, cam: bool) -> Stages:
    feats = []
    a = x
    last = f"denseblock{_num_blocks(model.features)}"
    for name, module in model.features.named_children():
        a = module(a)
        if name.startswith("denseblock") and name != last:
            feats.append(a)
    preact = [*feats, a]  # a = norm5(denseblock_last)
    a = F.relu(a)
    feats.append(a)
    pooled = _pool(a)
    logits = model.classifier(pooled)
    return Stages(feats, preact, pooled, logits, _linear_cam(a, model.classifier) if cam else None)


def _bcos_vit(model: BcosViT, x: Tensor) -> Stages:
    tokens = model.to_patch_embedding(x)  # [N, h, w, dim]
    n, h, w, dim = tokens.shape
    tokens = tokens.reshape(n, h * w, dim) + sincos_position_embedding(h, w, dim, tokens.dtype, tokens.device)
    blocks = list(model.transformer.children())
    depth = len(blocks)
    ends = sorted({max(1, round(depth * k / 4)) for k in range(1, 5)})
    feats = []
    for i, block in enumerate(blocks, start=1):
        tokens = block(tokens)
        if i in ends:
            feats.append(tokens.transpose(1, 2).reshape(n, dim, h, w))
    pooled = tokens.mean(dim=1)
    logits = model.logit_layer(model.linear_head(pooled))
    return Stages(feats, feats, pooled, logits, None)
