"""A dense layer's head in eval mode as one registered op: ``e2kd::bcos_dense_head``.

The explanation sweep's taped forward through the head of a DenseNet layer whose norm uses its
running variance (a teacher): the uncentred batch norm over the concatenation of the block's
features, the 1×1 B-cos conv after it, and the matrix ŵ·diag(a) the head's adjoint applies, as
`e2kd_fast.reference.bcos.bcos_dense_head` states them.

The op exists for the compiler. Inline, every head is compiled for its own channel count (each
dense layer reads one more feature map than the one before), two generated kernels per layer, 82
in a DenseNet-169, each costing a second or more of code generation and build on two CPU cores.
As one op, a head is an external call that no layer compiles. The reference is its only back end;
the backward is the reference's own derivative (`torch.func.vjp`), differentiable again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._common import empty_like_format, memory_format_of
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import bcos as reference


@torch.library.custom_op("e2kd::bcos_dense_head", mutates_args=())
def bcos_dense_head(
    features: list[Tensor], running_var: Tensor, norm_weight: Tensor | None, eps: float, weight: Tensor, b: float
) -> tuple[Tensor, Tensor, Tensor]:
    """A dense layer's head in eval mode: (scale · linear, scale, ŵ·diag(a)).

    features [N, C_i, H, W] (C = Σ C_i), running_var and norm_weight [C], weight [K, C, 1, 1] raw,
    B > 1 → [N, K, H, W] twice, in the memory format of ``features[0]``, and [K, C] contiguous.
    """
    _check_inputs(features, running_var, norm_weight, weight, b)
    impl = backends.implementation("e2kd::bcos_dense_head", features[0].device.type)
    return impl(features, running_var, norm_weight, eps, weight, b)


@backends.register("e2kd::bcos_dense_head", "reference", ("cpu", "cuda"))
def bcos_dense_head_ref(
    features: list[Tensor], running_var: Tensor, norm_weight: Tensor | None, eps: float, weight: Tensor, b: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference forward of `bcos_dense_head`."""
    out, scale, folded = reference.bcos_dense_head(features, running_var, norm_weight, eps, weight, b)
    fmt = memory_format_of(features[0])
    return out.contiguous(memory_format=fmt), scale.contiguous(memory_format=fmt), folded.contiguous()


def _check_inputs(features, running_var, norm_weight, weight, b) -> int:
    """The concatenation's channel count C, after checking the shapes against it and B."""
    first = features[0] if features else None
    if first is None or any(
        f.dim() != 4 or f.shape[0] != first.shape[0] or f.shape[2:] != first.shape[2:] for f in features
    ):
        shapes = [tuple(f.shape) for f in features]
        raise ValueError(f"bcos_dense_head: the features must be [N, C_i, H, W] sharing N, H and W, got {shapes}")
    channels = sum(f.shape[1] for f in features)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (channels, 1, 1):
        raise ValueError(
            f"bcos_dense_head: the weight must be [K, {channels}, 1, 1] for features of {channels} channels, "
            f"got {tuple(weight.shape)}"
        )
    if running_var.shape != (channels,) or (norm_weight is not None and norm_weight.shape != (channels,)):
        raise ValueError(f"bcos_dense_head: the norm's running variance and weight must be [{channels}]")
    if b == 1:
        raise ValueError("bcos_dense_head: B = 1 has no scale; call the conv itself")
    return channels


@bcos_dense_head.register_fake
def _(features, running_var, norm_weight, eps, weight, b):
    channels = _check_inputs(features, running_var, norm_weight, weight, b)
    n, _, h, w = features[0].shape
    shape = (n, weight.shape[0], h, w)
    return (
        empty_like_format(features[0], shape),
        empty_like_format(features[0], shape),
        weight.new_empty(shape[1], channels),
    )


def _dense_head_setup(ctx, inputs, output) -> None:
    features, running_var, norm_weight, eps, weight, b = inputs
    ctx.count, ctx.has_norm_weight, ctx.eps, ctx.b = len(features), norm_weight is not None, eps, b
    ctx.save_for_backward(*features, running_var, weight, *([norm_weight] if norm_weight is not None else []))


def _dense_head_backward(ctx, grad_out: Tensor, grad_scale: Tensor, grad_folded: Tensor):
    saved = ctx.saved_tensors
    features, running_var, weight = list(saved[: ctx.count]), saved[ctx.count], saved[ctx.count + 1]
    norm_weight = saved[ctx.count + 2] if ctx.has_norm_weight else None

    def head(features, running_var, weight, *norm_weight):
        return reference.bcos_dense_head(features, running_var, *(norm_weight or [None]), ctx.eps, weight, ctx.b)

    primals = (features, running_var, weight) + ((norm_weight,) if norm_weight is not None else ())
    _, pullback = torch.func.vjp(head, *primals)
    grad_features, grad_var, grad_weight, *grad_norm_weight = pullback((grad_out, grad_scale, grad_folded))
    return grad_features, grad_var, (grad_norm_weight or [None])[0], None, grad_weight, None


bcos_dense_head.register_autograd(_dense_head_backward, setup_context=_dense_head_setup)


def _dense_head_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(7)

    def rand(*shape, positive=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (t.abs() + 0.5 if positive else t).requires_grad_()

    return [
        ([rand(2, 3, 4, 5), rand(2, 2, 4, 5)], rand(5, positive=True), rand(5), 1e-5, rand(4, 5, 1, 1), 2.0),
        ([rand(1, 3, 1, 1)], rand(3, positive=True), None, 1e-5, rand(2, 3, 1, 1), 1.5),
    ]


register_op_test(bcos_dense_head, _dense_head_inputs, reference.bcos_dense_head)


__all__ = ["bcos_dense_head"]
