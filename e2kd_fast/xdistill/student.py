"""The XDistillation student and its loss.

Student (paper §III-B): a CNN branch and the frozen CAE branch. The CNN's globally average-pooled
last-stage features f [N, K] and the flattened CAE map g [N, P] (optionally average-pooled to
``fusion_size`` × ``fusion_size`` first, for large images) are concatenated and one Linear layer,
the classifier W [num_classes, K + P], gives the logits. The CAE is frozen (eval mode, no gradients).

Loss (Eqs. 5, 6)::

    L = w_cls · CE(z_S, y) + (1 − α) · τ² · H(p_T^τ, p_S^τ) + λ · ‖c‖²

with w_cls = 1 (Eq. 6; ``cls_weight="alpha"`` gives the Keras-example α·CE instead), the soft
cross-entropy H (same gradient as KL; KL is logged), and by default c = W, the weight of the classifier
after the concatenation (Keras ``kernel_regularizer=l2(λ)`` on that layer: no ½, bias excluded).
Alternatives: ``penalty="all"`` (λ Σ‖θ‖² over every trainable weight) and ``penalty="features"``
(λ · mean over the batch of ‖[f, g]‖², an activity penalty on the concatenated vector).

Images enter every model here in [0, 1]; models normalise internally (``mean``/``std``) for their CNN,
while the CAE sees the raw image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from e2kd_fast.explain.gradcam import linear_head_cam, split_forward
from e2kd_fast.xdistill.cae import ConvAutoencoder
from e2kd_fast.xdistill.explainers import gradcam_pixels

PENALTIES = ("classifier", "all", "features")
CLS_WEIGHTS = ("one", "alpha")


class Normaliser(nn.Module):
    """(x − mean) / std with fixed per-channel statistics (identity when both are None)."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.enabled = mean is not None
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0])[None, :, None, None])
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0])[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std if self.enabled else x


class SmallCNN(nn.Module):
    """A small conv net (conv3×3-BN-ReLU-maxpool blocks, global average pool, linear head).

    The "Net"-like CNN for tests and small data; as a teacher use larger ``widths``.

    Args:
        in_channels: image channels.
        num_classes: outputs.
        widths: channels of the conv blocks (each block halves the resolution except the last).
        mean, std: input normalisation (None: the image is used as it is).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("SmallCNN: widths must name at least one conv block")
        self.normalise = Normaliser(mean, std)
        blocks: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            blocks += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                blocks.append(nn.MaxPool2d(2))
            c = w
        self.trunk = nn.Sequential(*blocks)
        self.num_features = c
        self.fc = nn.Linear(c, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in [0, 1] -> last-stage activations A [N, K, h, w]."""
        return self.trunk(self.normalise(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))

    @torch.no_grad()
    def gradcam(self, x: Tensor, target: Tensor) -> Tensor:
        """ReLU-GradCAM [N, 1, H, W] of the last conv stage (closed form: the head is pooling + linear)."""
        return linear_head_cam(self.features(x), self.fc.weight[target.long()], x.shape[-2:])


class TorchvisionTrunk(nn.Module):
    """A torchvision ResNet/DenseNet without its classifier: features(x) -> A [N, K, h, w]."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        if isinstance(model, torchvision.models.ResNet):
            self.num_features = model.fc.in_features
            model.fc = nn.Identity()
        elif isinstance(model, torchvision.models.DenseNet):
            self.num_features = model.classifier.in_features
            model.classifier = nn.Identity()
        else:
            raise TypeError(f"XDistillation students take torchvision ResNets/DenseNets or SmallCNN, not {model!r}")
        self.model = model
        self.normalise = Normaliser(mean, std)

    def features(self, x: Tensor) -> Tensor:
        return split_forward(self.model, self.normalise(x))[0]


class Normalised(nn.Module):
    """Wraps a model that expects normalised input so that it takes images in [0, 1] (teachers)."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.model = model
        self.normalise = Normaliser(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalise(x))

    def gradcam(self, x: Tensor, target: Tensor) -> Tensor:
        return gradcam_pixels(self.model, self.normalise(x), target)


class XDistillStudent(nn.Module):
    """CNN branch + frozen CAE branch, concatenated before one linear classifier.

    Args:
        backbone: a `SmallCNN` (its own ``fc`` is unused) or a `TorchvisionTrunk`.
        cae: the trained CAE; frozen here (``requires_grad_(False)``, kept in eval mode).
        num_classes: outputs.
        image_size: (H, W) of the inputs (fixes the flattened CAE feature size).
        fusion_size: average-pool the CAE map to this side before flattening; None keeps the full
            map (the paper's CIFAR/MNIST setting).
        use_cae: False drops the CAE branch (the plain student, for baselines with the same loss).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cae: ConvAutoencoder | None,
        num_classes: int,
        image_size: tuple[int, int],
        fusion_size: int | None = None,
        use_cae: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(backbone, SmallCNN):
            backbone.fc = nn.Identity()  # its own head is replaced by the fused classifier
        self.backbone = backbone
        self.use_cae = use_cae and cae is not None
        self.cae = cae.requires_grad_(False).eval() if self.use_cae else None
        self.fusion_size = fusion_size
        h, w = image_size
        cae_dim = 0
        if self.use_cae:
            cae_dim = fusion_size * fusion_size if fusion_size else h * w
        self.cae_dim = cae_dim
        self.classifier = nn.Linear(backbone.num_features + cae_dim, num_classes)

    def train(self, mode: bool = True) -> XDistillStudent:
        super().train(mode)
        if self.cae is not None:
            self.cae.eval()  # frozen: its (absent) norm statistics must never update
        return self

    def cae_features(self, x: Tensor) -> Tensor:
        """The flattened CAE map [N, P] (no gradient flows into the CAE)."""
        with torch.no_grad():
            g = self.cae(x)
        if self.fusion_size:
            g = F.adaptive_avg_pool2d(g, self.fusion_size)
        return g.flatten(1)

    def fused(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(A [N, K, h, w], concatenated features [N, K + P])."""
        a = self.backbone.features(x)
        f = a.mean((2, 3))
        if self.use_cae:
            f = torch.cat([f, self.cae_features(x)], 1)
        return a, f

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fused(x)[1])

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, concatenated features) for the ``"features"`` penalty."""
        _, f = self.fused(x)
        return self.classifier(f), f

    @torch.no_grad()
    def gradcam(self, x: Tensor, target: Tensor) -> Tensor:
        """GradCAM of the CNN branch's last conv stage. The classifier is linear in the pooled features,
        so the CAE features do not change ∂y_c/∂A: only the classifier columns of the CNN features count."""
        a = self.backbone.features(x)
        return linear_head_cam(a, self.classifier.weight[target.long(), : a.shape[1]], x.shape[-2:])

    def penalty(self, mode: str = "classifier", features: Tensor | None = None) -> Tensor:
        """‖c‖² for the chosen c (see the module docstring)."""
        if mode == "classifier":
            return self.classifier.weight.square().sum()
        if mode == "all":
            return sum(p.square().sum() for p in self.parameters() if p.requires_grad)
        if mode == "features":
            if features is None:
                raise ValueError("penalty 'features' needs the concatenated features of the batch")
            return features.square().sum(1).mean()
        raise ValueError(f"unknown penalty {mode!r}; available: {', '.join(PENALTIES)}")


def xdistill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    penalty: Tensor,
    *,
    alpha: float = 0.9,
    tau: float = 1.0,
    lam: float = 5e-4,
    cls_weight: str = "one",
) -> tuple[Tensor, dict[str, float]]:
    """The XDistillation loss ``w_cls·CE + (1 − α)·τ²·H(p_T^τ, p_S^τ) + λ·penalty``.

    Args:
        student_logits, teacher_logits: [N, C].
        labels: [N] class indices.
        penalty: the scalar ‖c‖² (`XDistillStudent.penalty`).
        alpha, tau, lam: α, τ, λ (paper: 0.9, 1, 5e-4).
        cls_weight: ``"one"`` (Eq. 6) or ``"alpha"`` (α·CE).

    Returns:
        (loss, parts) with parts ``ce``, ``kd`` (soft cross-entropy · τ²), ``kl`` (KL · τ², logged only),
        ``penalty``.
    """
    if cls_weight not in CLS_WEIGHTS:
        raise ValueError(f"cls_weight must be one of {', '.join(map(repr, CLS_WEIGHTS))}; got {cls_weight!r}")
    ce = F.cross_entropy(student_logits, labels)
    log_ps = F.log_softmax(student_logits / tau, 1)
    pt = F.softmax(teacher_logits.detach() / tau, 1)
    soft_ce = -(pt * log_ps).sum(1).mean() * tau**2
    kl = (pt * (pt.clamp_min(1e-12).log() - log_ps)).sum(1).mean() * tau**2
    w = 1.0 if cls_weight == "one" else alpha
    loss = w * ce + (1 - alpha) * soft_ce + lam * penalty
    parts = {"ce": ce.item(), "kd": soft_ce.item(), "kl": kl.item(), "penalty": float(penalty.detach())}
    return loss, parts


__all__ = [
    "CLS_WEIGHTS",
    "PENALTIES",
    "Normalised",
    "Normaliser",
    "SmallCNN",
    "TorchvisionTrunk",
    "XDistillStudent",
    "xdistill_loss",
]
