"""The explanation by autograd, as the official code computes it: the ground truth for the sweep."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from e2kd_fast.reference.dynamic import explanation_mode


def dynamic_weights_autograd(
    model: nn.Module,
    x6: Tensor,
    target: Tensor | None = None,
    *,
    create_graph: bool | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """W = ∂logit_target/∂x in explanation mode, by one backward through the model.

    With the official e²KD semantics: the dynamic weights (B-cos scales, norms' 1/std, attention)
    are constants for the derivative with respect to x, but with ``create_graph`` the returned W
    stays attached to them, so the gradient of anything computed from W reaches the parameters
    through them too (the exact total derivative).

    Args:
        model: a B-cos model (its current train/eval mode is used as it is).
        x6: [N, C, H, W] input (the 6-channel encoding for B-cos models).
        target: [N] integer class to explain per sample; None explains the model's own top-1 (one
            forward, as the official code explains the teacher's prediction).
        create_graph: record the graph of W for a later backward; default: when grad mode is on
            and the model has parameters that require grad (a student, not a frozen teacher).
        return_logits: also return the logits of the same forward.

    Returns:
        W with the shape of ``x6`` (and the logits [N, num_classes] if asked).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("explanations need autograd: compute them outside torch.inference_mode()")
    if target is not None:
        check_target(target, x6.shape[0])
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    x = x6.detach().requires_grad_(True)
    with torch.enable_grad(), explanation_mode(model):
        logits = model(x)
        target = logits.argmax(1) if target is None else target
        check_target(target, logits.shape[0], logits.shape[1])
        selected = logits.gather(1, target.to(logits.device)[:, None].long()).sum()
        (weights,) = torch.autograd.grad(
            selected, x, create_graph=create_graph, retain_graph=create_graph or return_logits
        )
    return (weights, logits) if return_logits else weights


def check_target(target: Tensor, batch: int, num_classes: int | None = None) -> None:
    """Raises a ValueError unless ``target`` is [batch] integer class indices in [0, num_classes)."""
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must be a 1-d tensor of {batch} class indices, got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if num_classes is None or torch.compiler.is_compiling():  # a data-dependent check cannot be traced
        return
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target holds class indices outside [0, {num_classes}): {target.tolist()}")
