"""Explanations: B-cos dynamic weights, contribution maps, pictures."""

from __future__ import annotations

from torch import Tensor, nn

from e2kd_fast.explain.gradcam import gradcam
from e2kd_fast.explain.sweep import dynamic_weights_sweep
from e2kd_fast.explain.visualize import (
    GRADCAM_COLORMAP,
    contribution_map,
    explanation_to_rgba,
    gradcam_heat,
    gradcam_overlay,
)
from e2kd_fast.reference.explain import dynamic_weights_autograd

ALGORITHMS = ("autograd", "sweep")


def dynamic_weights(
    model: nn.Module,
    x6: Tensor,
    target: Tensor | None = None,
    *,
    algorithm: str = "autograd",
    create_graph: bool | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The dynamic linear weights W = ∂logit_target/∂x6 of a B-cos model in explanation mode.

    Args:
        model: a B-cos model.
        x6: [N, 6, H, W] input in the [x, 1 − x] encoding.
        target: [N] LongTensor, the class explained for each sample; None explains the model's top-1.
        algorithm: ``"autograd"`` (the reference: one backward through the model in explanation mode,
            official semantics) or ``"sweep"`` (an explicit reverse sweep of the saved dynamic
            factors: no double backward, first-order autograd only; `e2kd_fast.explain.sweep`).
        create_graph: keep W differentiable (default: when the model has trainable parameters and
            grad mode is on). Gradients of functions of W then include the paths through the
            dynamic scales, as in the official e²KD implementation.
        return_logits: also return the logits of the same forward.

    Returns:
        W [N, 6, H, W] (and logits [N, num_classes] if asked).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown dynamic_weights algorithm {algorithm!r}; available: {', '.join(ALGORITHMS)}")
    if algorithm == "sweep":
        return dynamic_weights_sweep(model, x6, target, create_graph=create_graph, return_logits=return_logits)
    return dynamic_weights_autograd(model, x6, target, create_graph=create_graph, return_logits=return_logits)


__all__ = [
    "ALGORITHMS",
    "GRADCAM_COLORMAP",
    "contribution_map",
    "dynamic_weights",
    "explanation_to_rgba",
    "gradcam",
    "gradcam_heat",
    "gradcam_overlay",
]
