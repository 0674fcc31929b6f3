"""Optimisers, the warm-up + cosine schedule and adaptive gradient clipping of the B-cos recipes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Adam (the B-cos recipes: lr 1e-3, no weight decay), AdamW or SGD with momentum."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def warmup_cosine_factor(t: float, total: float, warmup: float, start_factor: float = 0.01) -> float:
    """The learning-rate factor at time ``t`` (epochs or steps, as ``total`` and ``warmup``).

    Linear warm-up from ``start_factor`` to 1 over ``warmup``, then cosine annealing to 0 at
    ``total``: the official recipe (LinearLR followed by CosineAnnealingLR).
    """
    if warmup > 0 and t < warmup:
        return start_factor + (1 - start_factor) * t / warmup
    span = max(total - warmup, 1e-12)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Sets every group's lr to base_lr · factor (a pure function of the step: exact on resume)."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def unitwise_norm(x: Tensor) -> Tensor:
    # Per output unit for weights, whole-tensor for vectors (as the official B-cos trainer / timm).
    if x.squeeze().ndim <= 1:
        return x.norm(2)
    if x.ndim in (2, 3):
        return x.norm(2, dim=1, keepdim=True)
    if x.ndim == 4:
        return x.norm(2, dim=(1, 2, 3), keepdim=True)
    raise ValueError(f"adaptive gradient clipping expects tensors of 1 to 4 dims, got {x.ndim}")


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), in place.

    Each unit's gradient is rescaled to at most ``clip_factor · max(‖unit weight‖, eps)``.
    """
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))
