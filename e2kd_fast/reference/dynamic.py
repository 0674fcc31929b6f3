"""Explanation-mode products with the official e²KD ("dynamic multiplication") gradient semantics.

In explanation mode a B-cos network is dynamic-linear: every data-dependent factor (a B-cos scale,
a norm's 1/std, an attention matrix) multiplies the signal as a *dynamic weight*. The explanation
W = ∂logit/∂x treats those weights as constants with respect to x, yet anything later computed from
W (the e²KD loss) must still be differentiated through them into the parameters: the total
derivative, not the truncated one a `detach()` gives (docs/architecture.md has the numbers, under
"The student's dynamic factors stay attached").

GoodTeachersExplain implements this with a product whose backward reads the owner's explanation
flag *when the backward runs*: inside explanation mode it returns no gradient for the weight (so the
explanation sees the weight as constant), outside it returns the full gradient (so the final
`loss.backward()` differentiates through the weight). The graph recorded by a `create_graph=True`
explanation backward keeps the weight attached, which gives the exact second-order path.

These products are the autograd *reference*; they are used only inside explanation mode and never
inside a compiled region (the compiled engine uses an explicit reverse sweep instead).
`explanation_mode` switches a model's modules into and out of that mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn


class ExplanationFlag(Protocol):
    """Anything with an ``explaining`` attribute: read at backward time, not at forward time."""

    explaining: bool


class _DynamicMultiply(torch.autograd.Function):
    """y = weight · x (broadcasting); the weight's gradient is cut while ``owner.explaining``."""

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor, owner: ExplanationFlag) -> Tensor:
        ctx.owner = owner
        ctx.save_for_backward(weight, x)
        return weight * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, x = ctx.saved_tensors
        grad_x = (grad * weight).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[0] and not ctx.owner.explaining:
            grad_weight = (grad * x).sum_to_size(weight.shape)
        return grad_weight, grad_x, None


class _DynamicMatmul(torch.autograd.Function):
    """y = weight @ x for attention (weight [..., N, N], x [..., N, d]); same gradient rule.

    A matmul instead of GTE's broadcast product, which materialises a [B, heads, N, N, d] tensor.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor, owner: ExplanationFlag) -> Tensor:
        ctx.owner = owner
        ctx.save_for_backward(weight, x)
        return weight @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, x = ctx.saved_tensors
        grad_x = weight.transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[0] and not ctx.owner.explaining:
            grad_weight = grad @ x.transpose(-1, -2)
        return grad_weight, grad_x, None


def dynamic_multiply(weight: Tensor, x: Tensor, owner: ExplanationFlag) -> Tensor:
    """weight · x, with the weight a dynamic weight of ``owner`` while it is in explanation mode.

    Args:
        weight: the dynamic weight, broadcastable to ``x`` (e.g. [N, O, H, W] or [1, C, 1, 1]).
        x: the signal.
        owner: the module whose ``explaining`` flag decides, at backward time, whether the weight
            receives a gradient.

    Returns:
        weight · x with the broadcast shape.
    """
    if not owner.explaining:
        return weight * x
    return _DynamicMultiply.apply(weight, x, owner)


def dynamic_matmul(weight: Tensor, x: Tensor, owner: ExplanationFlag) -> Tensor:
    """weight @ x with the same semantics as `dynamic_multiply` (attention: [.., N, N] @ [.., N, d])."""
    if not owner.explaining:
        return weight @ x
    return _DynamicMatmul.apply(weight, x, owner)


@contextlib.contextmanager
def explanation_mode(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Puts every module of ``model`` that supports it into explanation mode for the block.

    Works on any model: modules with a ``set_explanation_mode`` method (these and the official
    `bcos` modules) are switched; others are left alone. Nesting is safe: each module's previous
    state is restored on exit, also when the block raises.

    Note that with the official semantics the flag is read when a backward runs: compute the
    explanation inside the block, and call the final ``loss.backward()`` after it.

    Example:
        >>> with explanation_mode(model):
        ...     logits = model(x6)
        ...     (W,) = torch.autograd.grad(logits[:, c].sum(), x6, create_graph=True)
    """
    switched = [m for m in model.modules() if callable(getattr(m, "set_explanation_mode", None))]
    previous = [_current_state(m) for m in switched]
    try:
        for m in switched:
            m.set_explanation_mode(active)
        yield model
    finally:
        for m, state in zip(switched, previous, strict=True):
            m.set_explanation_mode(state)


def _current_state(module: nn.Module) -> bool:
    # Our modules expose `explaining`; the official `bcos` modules expose `detach`.
    for attr in ("explaining", "detach"):
        value = getattr(module, attr, None)
        if isinstance(value, bool):
            return value
    return False
