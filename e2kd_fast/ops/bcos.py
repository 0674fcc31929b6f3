"""B-cos layer ops: the patch norm and the sweep's scaled adjoint, as registered ``e2kd::`` ops.

``e2kd::patch_norm``: n = sqrt(boxsum_k(Σ_c x²) + 1e-6), the L2 norm of every receptive field
(per group of input channels, repeated to that group's outputs).
    ∂n/∂x: with S = n², dS = dn / (2n), dx = 2x · boxsumᵀ(dS) (boxsumᵀ = the transposed box sum).

``e2kd::scaled_conv_adjoint``: the explanation sweep's step through a B-cos conv,
    y = conv2dᵀ(s ⊙ g, ŵ)  (the input-adjoint of conv2d(·, ŵ) applied to s ⊙ g)
    with  d(s ⊙ g) = conv2d(dy, ŵ),  dg = s · d(s ⊙ g),  ds = g · d(s ⊙ g),
          dŵ = conv2d weight-gradient with input dy and output-gradient s ⊙ g.

The backwards are plain torch ops, so they are differentiable again (gradgradcheck); CPU
implementations are the reference maths of `e2kd_fast.reference.bcos`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference.bcos import dynamic_scale, transposed_output_padding, unit_norm_weight
from e2kd_fast.reference.bcos import patch_norm as patch_norm_reference


def _box_sum_adjoint(g: Tensor, kernel: list[int], stride: list[int], padding: list[int], in_size) -> Tensor:
    """The transpose of ``avg_pool2d(·, kernel, stride, padding) · prod(kernel)`` for an input of ``in_size``."""
    channels = g.shape[1]
    ones = torch.ones(channels, 1, *kernel, dtype=g.dtype, device=g.device)
    out_pad = transposed_output_padding(in_size, g.shape[-2:], kernel, stride, padding)
    return F.conv_transpose2d(g, ones, None, stride, padding, out_pad, channels)


@torch.library.custom_op("e2kd::patch_norm", mutates_args=())
def patch_norm(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], groups: int, out_channels: int
) -> Tensor:
    """[N, C, H, W] → [N, 1 or out_channels, H_out, W_out]: the norm of every receptive field."""
    return patch_norm_reference(x, kernel, stride, padding, groups, out_channels if groups > 1 else None)


@patch_norm.register_fake
def _(x, kernel, stride, padding, groups, out_channels):
    h = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return x.new_empty(x.shape[0], out_channels if groups > 1 else 1, h, w)


def _patch_norm_setup(ctx, inputs, output) -> None:
    x, kernel, stride, padding, groups, out_channels = inputs
    ctx.save_for_backward(x, output)
    ctx.geometry = (kernel, stride, padding, groups, out_channels)


def _patch_norm_backward(ctx, grad: Tensor):
    x, norm = ctx.saved_tensors
    kernel, stride, padding, groups, out_channels = ctx.geometry
    grad_sq = grad / (2 * norm)  # d/dS of sqrt(S + eps)
    if groups > 1:  # the adjoint of repeat_interleave: sum the copies of each group
        grad_sq = grad_sq.unflatten(1, (groups, out_channels // groups)).sum(2)
    grad_box = _box_sum_adjoint(grad_sq, kernel, stride, padding, x.shape[-2:])
    if groups > 1:
        grad_box = grad_box.repeat_interleave(x.shape[1] // groups, dim=1)
    return 2 * x * grad_box, None, None, None, None, None


patch_norm.register_autograd(_patch_norm_backward, setup_context=_patch_norm_setup)


@torch.library.custom_op("e2kd::scaled_conv_adjoint", mutates_args=())
def scaled_conv_adjoint(
    g: Tensor,
    scale: Tensor,
    weight: Tensor,
    in_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """conv2dᵀ(scale ⊙ g, weight): [N, O, h, w] → [N, C, *in_size] (weight: the unit-norm ŵ)."""
    out_pad = transposed_output_padding(in_size, g.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return F.conv_transpose2d(scale * g, weight, None, stride, padding, out_pad, groups, dilation)


@scaled_conv_adjoint.register_fake
def _(g, scale, weight, in_size, stride, padding, dilation, groups):
    return g.new_empty(g.shape[0], weight.shape[1] * groups, *in_size)


def _adjoint_setup(ctx, inputs, output) -> None:
    g, scale, weight, in_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(g, scale, weight)
    ctx.geometry = (stride, padding, dilation, groups)


def _adjoint_backward(ctx, grad: Tensor):
    g, scale, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    grad_scaled = F.conv2d(grad, weight, None, stride, padding, dilation, groups)  # adjoint of the transpose
    grad_weight = None
    if ctx.needs_input_grad[2]:
        grad_weight = torch.nn.grad.conv2d_weight(grad, weight.shape, scale * g, stride, padding, dilation, groups)
    return scale * grad_scaled, g * grad_scaled, grad_weight, None, None, None, None, None


scaled_conv_adjoint.register_autograd(_adjoint_backward, setup_context=_adjoint_setup)


def _patch_norm_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    return [(x1, [3, 3], [2, 2], [1, 1], 1, 4), (x2, [3, 2], [1, 2], [1, 0], 2, 6), (x1, [1, 1], [1, 1], [0, 0], 1, 2)]


def _adjoint_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [
        (rand(2, 4, 3, 3), rand(2, 4, 3, 3), rand(4, 3, 3, 3), [6, 5], [2, 2], [1, 1], [1, 1], 1),
        (rand(1, 6, 5, 5), rand(1, 6, 5, 5), rand(6, 2, 3, 3), [5, 5], [1, 1], [1, 1], [1, 1], 2),
        (rand(2, 3, 4, 4), rand(2, 1, 4, 4), rand(3, 5, 1, 1), [4, 4], [1, 1], [0, 0], [1, 1], 1),
    ]


register_op_test(patch_norm, _patch_norm_inputs)
register_op_test(scaled_conv_adjoint, _adjoint_inputs)


@torch.library.custom_op("e2kd::bcos_conv2d", mutates_args=())
def bcos_conv2d(
    x: Tensor, weight: Tensor, b: float, stride: list[int], padding: list[int], groups: int
) -> tuple[Tensor, Tensor]:
    """The two factors of a B-cos conv (B > 1, no MaxOut, no dilation): (linear, scale).

    x [N, C, H, W], weight [O, C/groups, kH, kW] (raw; normalised per output unit inside) →
    linear = conv(x, ŵ) and scale = |cos|^(B−1), both [N, O, H_out, W_out]; the layer's output is
    scale · linear, and the scale is what the explanation sweep needs. Returning the linear part
    lets the backward reuse it instead of recomputing the conv.
    """
    linear = F.conv2d(x, unit_norm_weight(weight), None, stride, padding, 1, groups)
    norm = patch_norm_reference(x, weight.shape[-2:], stride, padding, groups, weight.shape[0] if groups > 1 else None)
    return linear, dynamic_scale(linear, norm, b)


@bcos_conv2d.register_fake
def _(x, weight, b, stride, padding, groups):
    h = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    linear = x.new_empty(x.shape[0], weight.shape[0], h, w)
    return linear, linear.new_empty(linear.shape)


def _bcos_conv_setup(ctx, inputs, output) -> None:
    x, weight, b, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight, output[0])
    ctx.geometry = (b, stride, padding, groups)


def _bcos_conv_backward(ctx, grad_linear: Tensor, grad_scale: Tensor):
    """s = f(l/n) with l = conv(x, ŵ) and n = patch_norm(x) (recomputed: a pooling of x²):
    dl = g_l + g_s·∂s/∂l and dn = g_s·∂s/∂n, then through the conv, the patch norm and ŵ = w/‖w‖."""
    x, weight, linear = ctx.saved_tensors
    b, stride, padding, groups = ctx.geometry
    out_channels, kernel = weight.shape[0], list(weight.shape[-2:])
    w_norm = torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)
    w_hat = weight / w_norm
    norm = patch_norm_reference(x, kernel, stride, padding, groups, out_channels if groups > 1 else None)
    ratio = linear / norm
    if b == 2:  # s = |l| / n
        ds_dratio = torch.sign(linear)
    else:  # s = (|l/n| + 1e-6)^(B−1)
        ds_dratio = (b - 1) * (ratio.abs() + 1e-6).pow(b - 2) * torch.sign(ratio)
    grad_linear = grad_linear + grad_scale * ds_dratio / norm
    grad_norm = -grad_scale * ds_dratio * ratio / norm
    if groups == 1:
        grad_norm = grad_norm.sum(1, keepdim=True)  # n was broadcast over the output channels
    # Through the patch norm n = sqrt(S + 1e-6): dS = dn / 2n, dx = 2x · boxsumᵀ(dS).
    grad_sq = grad_norm / (2 * norm)
    if groups > 1:
        grad_sq = grad_sq.unflatten(1, (groups, out_channels // groups)).sum(2)
    grad_box = _box_sum_adjoint(grad_sq, kernel, stride, padding, x.shape[-2:])
    if groups > 1:
        grad_box = grad_box.repeat_interleave(x.shape[1] // groups, dim=1)
    # Through l = conv(x, ŵ).
    out_pad = transposed_output_padding(x.shape[-2:], linear.shape[-2:], kernel, stride, padding)
    grad_x = 2 * x * grad_box + F.conv_transpose2d(grad_linear, w_hat, None, stride, padding, out_pad, groups)
    grad_w_hat = torch.nn.grad.conv2d_weight(x, weight.shape, grad_linear, stride, padding, 1, groups)
    # Through ŵ = w / ‖w‖ (per output unit): dw = (dŵ − ŵ ⟨ŵ, dŵ⟩) / ‖w‖.
    grad_weight = (grad_w_hat - w_hat * (w_hat * grad_w_hat).sum(dim=(1, 2, 3), keepdim=True)) / w_norm
    return grad_x, grad_weight, None, None, None, None


bcos_conv2d.register_autograd(_bcos_conv_backward, setup_context=_bcos_conv_setup)


def _bcos_conv_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [
        (rand(2, 3, 5, 5), rand(4, 3, 3, 3), 2.0, [1, 1], [1, 1], 1),
        (rand(1, 4, 6, 5), rand(6, 2, 3, 3), 2.0, [2, 2], [1, 1], 2),
        (rand(2, 3, 4, 4), rand(2, 3, 1, 1), 2.5, [1, 1], [0, 0], 1),
        (rand(1, 2, 7, 7), rand(3, 2, 7, 7), 1.5, [2, 2], [3, 3], 1),
    ]


register_op_test(bcos_conv2d, _bcos_conv_inputs)

__all__ = ["bcos_conv2d", "patch_norm", "scaled_conv_adjoint"]
