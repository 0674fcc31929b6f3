"""The B-cos conv layer as registered ops: ``e2kd::bcos_conv2d``, its patch norm, its adjoint and its pooling.

``e2kd::bcos_conv2d``: the two factors (linear, scale) of a B-cos conv (B > 1, no MaxOut, no
dilation); the layer's output is scale · linear, and the scale is what the explanation sweep needs.

``e2kd::patch_norm``: n = sqrt(boxsum_k(Σ_c x²) + 1e-6), the L2 norm of every receptive field
(per group of input channels, repeated to that group's outputs).
    ∂n/∂x: with S = n², dS = dn / (2n), dx = 2x · boxsumᵀ(dS) (boxsumᵀ = the transposed box sum).

``e2kd::scaled_conv_adjoint``: the explanation sweep's step through a B-cos conv,
    y = conv2dᵀ(s ⊙ g, ŵ)  (the input-adjoint of conv2d(·, ŵ) applied to s ⊙ g)
    with  d(s ⊙ g) = conv2d(dy, ŵ),  dg = s · d(s ⊙ g),  ds = g · d(s ⊙ g),
          dŵ = conv2d weight-gradient with input dy and output-gradient s ⊙ g.

``e2kd::box_sum`` and ``e2kd::avg_pool_adjoint``: the patch norm's box sum and the adjoint of an
average pool, each the reference's pooling (ATen's kernels); the second is the first's backward.
They keep the pooling out of compiled CPU graphs (`pooling_as_ops`).

The maths of every op here is stated once, in `e2kd_fast.reference.bcos` (``bcos_conv2d_parts``,
``patch_norm``, ``scaled_conv_adjoint``, ``box_sum``, ``avg_pool_adjoint``): each op's reference
back end calls it and fixes the output layout. The backwards are plain torch ops or these
registered ops, so they are differentiable again (gradgradcheck); the one exception is a
first-order backward of the adjoint in eager mode under the Triton ``implicit-gemm`` kernels, which
writes (s ⊙ d, g ⊙ d) from one conv launch.

Back ends: ``triton`` (``kernels/bcos_conv2d.py``: by default the epilogue, the patch norm and the
scale product after or before cuDNN's conv; with ``E2KD_TRITON_CONV=implicit-gemm`` the conv and
transposed conv themselves, with the scale as epilogue and prologue) and ``cpp``
(``csrc/{cpu,cuda}/bcos_conv2d.*``, library ops ``e2kd_cpp::bcos_conv2d_epilogue`` and
``e2kd_cpp::bcos_conv2d_patch_norm``).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _python_dispatch

from e2kd_fast.ops import backends
from e2kd_fast.ops._common import (
    conv_output_size,
    conv_shape_class,
    empty_like_format,
    memory_format_of,
    scale_slope,
)
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import bcos as reference
from e2kd_fast.reference.bcos import transposed_output_padding

# ---------------------------------------------------------------------------------------------- pooling
# Average pooling and its adjoint as ops, so that compiled CPU graphs call ATen's pooling kernels:
# Inductor's C++ back end spends up to a fifth of a second per index expression of a pooling
# lowering simplifying it in sympy (windows clipped by Min/Max, strides by floor division), several
# per kernel, and there is such a kernel for every B-cos conv. The patch norm's box sum pools small
# maps: the channel sums of squares, one channel per conv group.


@torch.library.custom_op("e2kd::box_sum", mutates_args=())
def box_sum(sums: Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """[N, G, H, W] → [N, G, H_out, W_out]: the sum over every patch, in the input's memory format."""
    return backends.implementation("e2kd::box_sum", sums.device.type)(sums, kernel, stride, padding)


@backends.register("e2kd::box_sum", "reference", ("cpu", "cuda"))
def box_sum_ref(sums: Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """The reference forward of `box_sum`, in the input's memory format (as the fake says)."""
    out = reference.box_sum(sums, kernel, stride, padding)
    return out.contiguous(memory_format=memory_format_of(sums))


@box_sum.register_fake
def _(sums, kernel, stride, padding):
    h = conv_output_size(sums.shape[2], kernel[0], stride[0], padding[0])
    w = conv_output_size(sums.shape[3], kernel[1], stride[1], padding[1])
    return empty_like_format(sums, (*sums.shape[:2], h, w))


def _box_sum_setup(ctx, inputs, output) -> None:
    sums, *ctx.geometry = inputs
    ctx.in_size = sums.shape[-2:]


def _box_sum_backward(ctx, grad: Tensor):
    return _box_sum_adjoint(grad, *ctx.geometry, ctx.in_size), None, None, None


box_sum.register_autograd(_box_sum_backward, setup_context=_box_sum_setup)


def pooling_as_ops(device_type: str) -> bool:
    """Whether layers, the sweep and the ops' backwards should pool through `box_sum` and
    `avg_pool_adjoint` rather than the reference's plain pooling: on the CPU outside autocast. On
    the GPU the pooling stays where Inductor fuses it into Triton kernels (whether that back end pays
    a like compile cost was not measured); under autocast too, so that the ops never see the low
    precision (the CPU's low-precision step was not measured with them). A trace-time constant
    under torch.compile."""
    return device_type == "cpu" and not torch.is_autocast_enabled(device_type)


def inline_box_sum(device_type: str) -> reference.BoxSum:
    """The box sum for a layer's inline patch norm (the ``box_sum`` argument of the reference's
    patch norms): the op `box_sum` where `pooling_as_ops`, else the reference's."""
    return _box_sum_call if pooling_as_ops(device_type) else reference.box_sum


def _box_sum_call(sums: Tensor, kernel_size, stride, padding) -> Tensor:
    """`box_sum` with the reference's signature (int or pair geometry); a 1×1 window with stride 1
    is the identity, left to the reference (nothing to pool, nothing slow to compile)."""
    kernel, stride, padding = reference.pair(kernel_size), reference.pair(stride), reference.pair(padding)
    if kernel == stride == (1, 1):
        return reference.box_sum(sums, kernel, stride, padding)
    return box_sum(sums, list(kernel), list(stride), list(padding))


@torch.library.custom_op("e2kd::avg_pool_adjoint", mutates_args=())
def avg_pool_adjoint(g: Tensor, in_size: list[int], kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """[N, C, h, w] → [N, C, *in_size]: the adjoint of ``avg_pool2d(·, kernel, stride, padding)``
    (zero padding counted), in g's memory format."""
    impl = backends.implementation("e2kd::avg_pool_adjoint", g.device.type)
    return impl(g, in_size, kernel, stride, padding)


@backends.register("e2kd::avg_pool_adjoint", "reference", ("cpu", "cuda"))
def avg_pool_adjoint_ref(
    g: Tensor, in_size: list[int], kernel: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    """The reference forward of `avg_pool_adjoint`, in g's memory format (as the fake says)."""
    out = reference.avg_pool_adjoint(g, (*g.shape[:2], *in_size), kernel, stride, padding)
    return out.contiguous(memory_format=memory_format_of(g))


@avg_pool_adjoint.register_fake
def _(g, in_size, kernel, stride, padding):
    return empty_like_format(g, (*g.shape[:2], *in_size))


def _avg_pool_adjoint_setup(ctx, inputs, output) -> None:
    ctx.geometry = inputs[2:]


def _avg_pool_adjoint_backward(ctx, grad: Tensor):
    kernel, stride, padding = ctx.geometry
    pooled = F.avg_pool2d(grad, kernel, stride, padding, ceil_mode=False, count_include_pad=True)
    return pooled, None, None, None, None  # the adjoint's adjoint: the pool the reference's adjoint transposes


avg_pool_adjoint.register_autograd(_avg_pool_adjoint_backward, setup_context=_avg_pool_adjoint_setup)


def route_avg_pool_adjoint(g: Tensor, in_size, kernel_size, stride, padding) -> Tensor:
    """`reference.bcos.avg_pool_adjoint` of g [N, C, h, w] for an input of ``in_size`` (H, W), with the
    reference's int or pair geometry: the op `avg_pool_adjoint` where `pooling_as_ops`, else the
    reference inline."""
    if pooling_as_ops(g.device.type):
        geometry = (reference.pair(kernel_size), reference.pair(stride), reference.pair(padding))
        return avg_pool_adjoint(g, list(in_size), *(list(v) for v in geometry))
    return reference.avg_pool_adjoint(g, (*g.shape[:2], *in_size), kernel_size, stride, padding)


def _box_sum_adjoint(g: Tensor, kernel: list[int], stride: list[int], padding: list[int], in_size) -> Tensor:
    """The transpose of ``avg_pool2d(·, kernel, stride, padding) · prod(kernel)`` for an input of ``in_size``."""
    return route_avg_pool_adjoint(g * math.prod(kernel), in_size, kernel, stride, padding)


@torch.library.custom_op("e2kd::patch_norm", mutates_args=())
def patch_norm(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], groups: int, out_channels: int
) -> Tensor:
    """[N, C, H, W] → [N, 1 or out_channels, H_out, W_out]: the norm of every receptive field."""
    impl = backends.implementation("e2kd::patch_norm", x.device.type, conv_shape_class(kernel, stride))
    return impl(x, kernel, stride, padding, groups, out_channels)


@backends.register("e2kd::patch_norm", "reference", ("cpu", "cuda"))
def patch_norm_ref(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], groups: int, out_channels: int
) -> Tensor:
    """The reference forward of `patch_norm` (output in x's memory format, as the fake says)."""
    norm = reference.patch_norm(x, kernel, stride, padding, groups, out_channels)
    return norm.contiguous(memory_format=memory_format_of(x))


@patch_norm.register_fake
def _(x, kernel, stride, padding, groups, out_channels):
    h = conv_output_size(x.shape[2], kernel[0], stride[0], padding[0])
    w = conv_output_size(x.shape[3], kernel[1], stride[1], padding[1])
    return empty_like_format(x, (x.shape[0], out_channels if groups > 1 else 1, h, w))


def _patch_norm_setup(ctx, inputs, output) -> None:
    x, kernel, stride, padding, groups, out_channels = inputs
    ctx.save_for_backward(x, output)
    ctx.geometry = (kernel, stride, padding, groups, out_channels)


def _sums_vjp(norm: Tensor, grad: Tensor, kernel, stride, padding, groups: int, out_channels: int, in_size):
    """∂/∂q of ⟨grad, n⟩ for n = patch_norm_from_sums(q) ([N, groups, *in_size]): boxsumᵀ(dn / 2n)."""
    grad_sq = grad / (2 * norm)  # d/dS of sqrt(S + eps)
    if groups > 1:  # the adjoint of repeat_interleave: sum the copies of each group
        grad_sq = grad_sq.unflatten(1, (groups, out_channels // groups)).sum(2)
    return _box_sum_adjoint(grad_sq, kernel, stride, padding, in_size)


def _patch_norm_vjp(x: Tensor, norm: Tensor, grad: Tensor, kernel, stride, padding, groups: int, out_channels: int):
    """∂/∂x of ⟨grad, n⟩ for n = patch_norm(x): dS = dn / 2n, dx = 2x · boxsumᵀ(dS)."""
    grad_box = _sums_vjp(norm, grad, kernel, stride, padding, groups, out_channels, x.shape[-2:])
    if groups > 1:
        grad_box = grad_box.repeat_interleave(x.shape[1] // groups, dim=1)
    return 2 * x * grad_box


def _patch_norm_backward(ctx, grad: Tensor):
    x, norm = ctx.saved_tensors
    return _patch_norm_vjp(x, norm, grad, *ctx.geometry), None, None, None, None, None


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
    shape_class = conv_shape_class(weight.shape[-2:], stride)
    impl = backends.implementation("e2kd::scaled_conv_adjoint", g.device.type, shape_class)
    return impl(g, scale, weight, in_size, stride, padding, dilation, groups)


def _conv_transpose(product: Tensor, weight: Tensor, in_size, stride, padding, dilation, groups: int) -> Tensor:
    """`reference.bcos.conv_adjoint` of an already scaled product, in the product's memory format."""
    out = reference.conv_adjoint(product, weight, in_size, stride, padding, dilation, groups)
    return out.contiguous(memory_format=memory_format_of(product))


@backends.register("e2kd::scaled_conv_adjoint", "reference", ("cpu", "cuda"))
def scaled_conv_adjoint_ref(
    g: Tensor,
    scale: Tensor,
    weight: Tensor,
    in_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """The reference forward of `scaled_conv_adjoint`, in g's memory format."""
    out = reference.scaled_conv_adjoint(g, scale, weight, in_size, stride, padding, dilation, groups)
    return out.contiguous(memory_format=memory_format_of(g))


@scaled_conv_adjoint.register_fake
def _(g, scale, weight, in_size, stride, padding, dilation, groups):
    return empty_like_format(g, (g.shape[0], weight.shape[1] * groups, *in_size))


def _adjoint_setup(ctx, inputs, output) -> None:
    g, scale, weight, in_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(g, scale, weight)
    ctx.geometry = (stride, padding, dilation, groups)


def _fused_adjoint_backward(grad: Tensor, weight: Tensor, stride: list[int], groups: int, dilation: list[int]):
    """The Triton kernels for the adjoint's backward, or None: only a first-order backward outside
    compiled graphs (a kernel launch is not differentiable again, nor traceable with fake tensors)
    where the Triton ``implicit-gemm`` kernels run this op."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    # Tracing (AOTAutograd, opcheck, make_fx) runs the backward under a dispatch mode or on
    # tensor subclasses; a kernel launch needs real storage.
    if _python_dispatch._get_current_dispatch_mode() is not None or type(grad) is not torch.Tensor:
        return None
    op_name, shape_class = "e2kd::scaled_conv_adjoint", conv_shape_class(weight.shape[-2:], stride)
    if backends.choose(op_name, grad.device.type, shape_class) != "triton":
        return None
    return _gemm_kernels(op_name, grad, shape_class, groups, dilation)


def _adjoint_backward(ctx, grad: Tensor):
    g, scale, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    grad_weight = None
    if ctx.needs_input_grad[2]:
        scaled = (scale * g).to(grad.dtype)
        grad_weight = torch.nn.grad.conv2d_weight(grad, weight.shape, scaled, stride, padding, dilation, groups)
    fused = _fused_adjoint_backward(grad, weight, stride, groups, dilation)
    if fused is not None:  # (s ⊙ d, g ⊙ d) written by the conv d = conv2d(grad, ŵ) itself
        grad_g, grad_scale = fused.conv2d_product(grad, weight, stride, padding, scale, g)
        return grad_g, grad_scale, grad_weight, None, None, None, None, None
    # Mixed precision: grad, g and the scale may be bf16/fp16 while the weight stays fp32.
    grad_scaled = F.conv2d(
        grad, weight.to(grad.dtype), None, stride, padding, dilation, groups
    )  # adjoint of the transpose
    return scale * grad_scaled, g * grad_scaled, grad_weight, None, None, None, None, None


scaled_conv_adjoint.register_autograd(_adjoint_backward, setup_context=_adjoint_setup)


def _patch_norm_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    return [(x1, [3, 3], [2, 2], [1, 1], 1, 4), (x2, [3, 2], [1, 2], [1, 0], 2, 6), (x1, [1, 1], [1, 1], [0, 0], 1, 2)]


def _leaf_maker(seed: int):
    """rand(*shape, channels_last=False): float64 leaves that require grad, drawn from one generator."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, channels_last: bool = False) -> Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return t.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        ).requires_grad_()

    return rand


def _adjoint_inputs() -> list[tuple]:
    rand = _leaf_maker(2)
    return [
        (rand(2, 4, 3, 3), rand(2, 4, 3, 3), rand(4, 3, 3, 3), [6, 5], [2, 2], [1, 1], [1, 1], 1),
        (rand(1, 6, 5, 5), rand(1, 6, 5, 5), rand(6, 2, 3, 3), [5, 5], [1, 1], [1, 1], [1, 1], 2),
        (rand(2, 3, 4, 4), rand(2, 1, 4, 4), rand(3, 5, 1, 1), [4, 4], [1, 1], [0, 0], [1, 1], 1),
    ]


def _avg_pool_adjoint_inputs() -> list[tuple]:
    rand = _leaf_maker(3)
    return [
        (rand(2, 1, 3, 3), [6, 5], [3, 3], [2, 2], [1, 1]),
        (rand(2, 3, 3, 3, channels_last=True), [6, 6], [3, 3], [2, 2], [1, 1]),
        (rand(1, 2, 2, 3), [4, 6], [1, 1], [2, 2], [0, 0]),
        (rand(1, 1, 1, 1), [2, 2], [2, 2], [2, 2], [0, 0]),
    ]


def _box_sum_inputs() -> list[tuple]:
    rand = _leaf_maker(4)
    return [
        (rand(2, 1, 6, 5), [3, 3], [2, 2], [1, 1]),
        (rand(2, 3, 6, 5, channels_last=True), [3, 3], [1, 1], [1, 1]),
        (rand(1, 2, 4, 6), [1, 1], [2, 2], [0, 0]),
        (rand(1, 1, 2, 2), [7, 7], [2, 2], [3, 3]),
    ]


register_op_test(patch_norm, _patch_norm_inputs, reference.patch_norm)
register_op_test(box_sum, _box_sum_inputs, reference.box_sum)
register_op_test(avg_pool_adjoint, _avg_pool_adjoint_inputs, reference.avg_pool_adjoint)
register_op_test(scaled_conv_adjoint, _adjoint_inputs, reference.scaled_conv_adjoint)


@torch.library.custom_op("e2kd::bcos_conv2d", mutates_args=())
def bcos_conv2d(
    x: Tensor,
    weight: Tensor,
    b: float,
    stride: list[int],
    padding: list[int],
    groups: int,
    sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two factors of a B-cos conv (B > 1, no MaxOut, no dilation): (linear, scale).

    x [N, C, H, W], weight [O, C/groups, kH, kW] (raw; normalised per output unit inside) →
    linear = conv(x, ŵ) and scale = |cos|^(B−1), both [N, O, H_out, W_out]; the layer's output is
    scale · linear, and the scale is what the explanation sweep needs. Returning the linear part
    lets the backward reuse it instead of recomputing the conv. Both outputs are in x's memory
    format (NCHW or channels_last).

    sums: [N, groups, H, W] Σ_c x² per group (`reference.bcos.channel_sums_of_squares`), made where
    x was made so that the conv need not read x twice; the patch norm is taken from it (and its
    gradient goes to it, not to x). None: computed from x inside.
    """
    _check_sums(x, groups, sums)
    impl = backends.implementation("e2kd::bcos_conv2d", x.device.type, conv_shape_class(weight.shape[-2:], stride))
    return impl(x, weight, b, stride, padding, groups, sums)


def _check_sums(x: Tensor, groups: int, sums: Tensor | None) -> None:
    """A clear error for a sums map that is not [N, groups, H, W] of x (the kernels index it as such)."""
    expected = (x.shape[0], groups, *x.shape[2:])
    if sums is not None and tuple(sums.shape) != expected:
        raise ValueError(
            f"e2kd::bcos_conv2d: sums must be Σ_c x² per group, shape {expected} for x of shape "
            f"{tuple(x.shape)} and groups={groups}; got {tuple(sums.shape)}"
        )


@backends.register("e2kd::bcos_conv2d", "reference", ("cpu", "cuda"))
def bcos_conv2d_ref(
    x: Tensor,
    weight: Tensor,
    b: float,
    stride: list[int],
    padding: list[int],
    groups: int,
    sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference forward of `bcos_conv2d`: conv, patch norm and scale as separate torch ops."""
    if sums is None:
        linear, scale = reference.bcos_conv2d_parts(x, weight, b, 1, stride, padding, 1, groups)
    else:
        linear = reference.bcos_conv_linear(x, weight, stride, padding, 1, groups)
        scale = _reference_scale(linear, x, weight, b, stride, padding, groups, sums)
    fmt = memory_format_of(x)
    return linear.contiguous(memory_format=fmt), scale.contiguous(memory_format=fmt)


def _reference_scale(
    linear: Tensor, x: Tensor, weight: Tensor, b: float, stride, padding, groups: int, sums: Tensor | None = None
) -> Tensor:
    """The dynamic scale of the conv output ``linear`` (norm from ``sums`` when given), in x's memory format."""
    if sums is None:
        scale = reference.conv_dynamic_scale(linear, x, weight.shape[-2:], b, stride, padding, groups)
    else:
        norm = reference.patch_norm_from_sums(sums, weight.shape[-2:], stride, padding, linear.shape[1])
        scale = reference.dynamic_scale(linear, norm.to(linear.dtype), b)  # fp32 sums, bf16 layer: bf16
    return scale.contiguous(memory_format=memory_format_of(x))


def _conv_linear(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], groups: int) -> Tensor:
    """The linear part on cuDNN/oneDNN, in x's memory format (what the fused epilogues read)."""
    linear = reference.bcos_conv_linear(x, weight, stride, padding, 1, groups)
    return linear.contiguous(memory_format=memory_format_of(x))


@bcos_conv2d.register_fake
def _(x, weight, b, stride, padding, groups, sums=None):
    _check_sums(x, groups, sums)
    h = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0])
    w = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1])
    shape = (x.shape[0], weight.shape[0], h, w)
    return empty_like_format(x, shape), empty_like_format(x, shape)


def _bcos_conv_setup(ctx, inputs, output) -> None:
    x, weight, b, stride, padding, groups, sums = inputs
    ctx.save_for_backward(x, weight, output[0], sums)
    ctx.geometry = (b, stride, padding, groups)


def _bcos_conv_backward(ctx, grad_linear: Tensor, grad_scale: Tensor):
    """s = f(l/n) with l = conv(x, ŵ) and n = patch_norm(x) (recomputed: a pooling of x², or of the
    given sums q): dl = g_l + g_s·∂s/∂l and dn = g_s·∂s/∂n, then through the conv, the patch norm
    (to x, or to q) and ŵ = w/‖w‖."""
    x, weight, linear, sums = ctx.saved_tensors
    b, stride, padding, groups = ctx.geometry
    out_channels, kernel = weight.shape[0], list(weight.shape[-2:])
    w_norm = torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)
    w_hat = weight / w_norm
    pooling = inline_box_sum(x.device.type)
    if sums is None:
        norm = reference.patch_norm(x, kernel, stride, padding, groups, out_channels, pooling)
    else:  # in the layer's dtype, as the forward used it (the sums may be fp32 for a bf16 layer)
        norm = reference.patch_norm_from_sums(sums, kernel, stride, padding, out_channels, pooling).to(linear.dtype)
    ratio = linear / norm
    ds_dratio = scale_slope(ratio, b)
    grad_linear = grad_linear + grad_scale * ds_dratio / norm
    grad_norm = -grad_scale * ds_dratio * ratio / norm
    if groups == 1:
        grad_norm = grad_norm.sum(1, keepdim=True)  # n was broadcast over the output channels
    # Through the patch norm and through l = conv(x, ŵ).
    out_pad = transposed_output_padding(x.shape[-2:], linear.shape[-2:], kernel, stride, padding)
    grad_x = F.conv_transpose2d(grad_linear, w_hat, None, stride, padding, out_pad, groups)
    grad_sums = None
    if sums is None:
        grad_x = grad_x + _patch_norm_vjp(x, norm, grad_norm, kernel, stride, padding, groups, out_channels)
    else:
        grad_sums = _sums_vjp(norm, grad_norm, kernel, stride, padding, groups, out_channels, x.shape[-2:])
        grad_sums = grad_sums.to(sums.dtype)
    grad_w_hat = torch.nn.grad.conv2d_weight(x, weight.shape, grad_linear, stride, padding, 1, groups)
    # Through ŵ = w / ‖w‖ (per output unit): dw = (dŵ − ŵ ⟨ŵ, dŵ⟩) / ‖w‖.
    grad_weight = (grad_w_hat - w_hat * (w_hat * grad_w_hat).sum(dim=(1, 2, 3), keepdim=True)) / w_norm
    return grad_x, grad_weight, None, None, None, None, grad_sums


bcos_conv2d.register_autograd(_bcos_conv_backward, setup_context=_bcos_conv_setup)


def _bcos_conv_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    def positive(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()

    return [
        (rand(2, 3, 5, 5), rand(4, 3, 3, 3), 2.0, [1, 1], [1, 1], 1),
        (rand(1, 4, 6, 5), rand(6, 2, 3, 3), 2.0, [2, 2], [1, 1], 2),
        (rand(2, 3, 4, 4), rand(2, 3, 1, 1), 2.5, [1, 1], [0, 0], 1),
        (rand(1, 2, 7, 7), rand(3, 2, 7, 7), 1.5, [2, 2], [3, 3], 1),
        # With the sums of squares given (any positive map: the op takes the norm from it).
        (rand(2, 3, 5, 4), rand(4, 3, 3, 3), 2.0, [2, 2], [1, 1], 1, positive(2, 1, 5, 4)),
        (rand(1, 4, 6, 5), rand(6, 2, 3, 3), 2.5, [1, 1], [1, 1], 2, positive(1, 2, 6, 5)),
    ]


register_op_test(bcos_conv2d, _bcos_conv_inputs, reference.bcos_conv2d_parts, reference.patch_norm_from_sums)


# ---------------------------------------------------------------------------------------------- fast back ends
# Triton: CUDA tensors (CPU only under TRITON_INTERPRET=1, see backends). The kernels module is
# imported lazily, so importing the ops needs neither Triton nor a GPU.


@backends.register("e2kd::patch_norm", "triton", ("cuda",))
def patch_norm_triton(x, kernel, stride, padding, groups, out_channels):
    from e2kd_fast.kernels import bcos_conv2d as kernels

    return kernels.patch_norm(x, kernel, stride, padding, groups, out_channels)


def _conv_kernel(op_name: str, device_type: str, shape_class: str) -> str:
    """The Triton conv design for the op: ``$E2KD_TRITON_CONV``, else the variant ``auto``'s record
    names for the shape class, else ``cudnn-epilogue`` (`kernels.bcos_conv2d.conv_kernel_choice`)."""
    from e2kd_fast.kernels.bcos_conv2d import CONV_KERNEL_ENV, conv_kernel_choice

    if os.environ.get(CONV_KERNEL_ENV, "").strip():
        return conv_kernel_choice()
    variant = backends.recorded_variant(op_name, device_type, shape_class)
    try:
        return conv_kernel_choice(variant)
    except ValueError as err:
        raise ValueError(
            f"e2kd_fast/ops/fastest.json: the record for {op_name} on {device_type} ({shape_class}) names the "
            f"Triton conv design {variant!r}: {err}"
        ) from None


def _gemm_kernels(op_name: str, a: Tensor, shape_class: str, groups: int, dilation: list[int] | None = None):
    """The Triton kernel module when the op's conv design (`_conv_kernel`) is ``implicit-gemm`` and
    the conv is one its kernels cover: groups = 1, no dilation, and the GEMM's input ``a`` with its
    channels innermost (channels_last; in NCHW its K axis would be a strided gather). Else None:
    the cuDNN-epilogue kernels run."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    if groups != 1 or (dilation is not None and list(dilation) != [1, 1]) or a.stride(1) != 1:
        return None
    return kernels if _conv_kernel(op_name, a.device.type, shape_class) == "implicit-gemm" else None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the conv runs in: autocast's for a float32 input inside an autocast region, else x's."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@torch.compiler.assume_constant_result
def reads_producer_sums(device_type: str, shape_class: str | None = None) -> bool:
    """Whether `bcos_conv2d` on ``device_type`` (convs of ``shape_class``) should be handed Σ_c x² by
    the op that made x (the ``sums`` input): true for the Triton implicit GEMM, which then reads x
    once, for its GEMM only. The others read x for their own sums anyway. A trace-time constant
    under torch.compile, like `backends.use_fused`; under it the layer's Σx² becomes part of the
    producer's fused kernel."""
    op_name = "e2kd::bcos_conv2d"
    if backends.choose(op_name, device_type, shape_class) != "triton":
        return False
    return _conv_kernel(op_name, device_type, shape_class or "") == "implicit-gemm"


@backends.register("e2kd::bcos_conv2d", "triton", ("cuda",))
def bcos_conv2d_triton(x, weight, b, stride, padding, groups, sums=None):
    """``cudnn-epilogue``: cuDNN conv, then the fused epilogue (channel sum of squares, box sum, sqrt,
    scale) in Triton. ``implicit-gemm``: the conv in Triton with the scale as its epilogue."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    gemm = _gemm_kernels("e2kd::bcos_conv2d", x, conv_shape_class(weight.shape[-2:], stride), groups)
    if gemm is not None:
        dtype = _compute_dtype(x)
        w_hat = reference.unit_norm_weight(weight).to(dtype)
        return gemm.bcos_conv2d_gemm(x.to(dtype), w_hat, b, stride, padding, sums)
    linear = _conv_linear(x, weight, stride, padding, groups)
    # Under autocast the conv runs in the low precision: the epilogue reads x in that dtype too.
    x = x.to(linear.dtype)
    _, scale = kernels.bcos_conv2d_epilogue(
        linear, x, list(weight.shape[-2:]), stride, padding, groups, b, False, sums=sums
    )
    return linear, scale


@backends.register("e2kd::scaled_conv_adjoint", "triton", ("cuda",))
def scaled_conv_adjoint_triton(g, scale, weight, in_size, stride, padding, dilation, groups):
    """``cudnn-epilogue``: s ⊙ g in one Triton pass (in g's memory format), then cuDNN's transposed
    conv. ``implicit-gemm``: the transposed conv in Triton, forming s ⊙ g as it loads g."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    gemm = _gemm_kernels("e2kd::scaled_conv_adjoint", g, conv_shape_class(weight.shape[-2:], stride), groups, dilation)
    if gemm is not None:
        return gemm.scaled_conv_adjoint_gemm(g, scale.to(g.dtype), weight, in_size, stride, padding)
    product = kernels.scale_product(scale.to(g.dtype).expand_as(g), g)
    return _conv_transpose(product, weight, in_size, stride, padding, dilation, groups)


# C++ (CPU) / CUDA: the kernels of csrc/{cpu,cuda}/bcos_conv2d.*, library ops e2kd_cpp::bcos_conv2d_*.
# CUDA is listed only where setup.py recorded a CUDA build (`backends.cpp_device_types`).


@backends.register(
    "e2kd::patch_norm",
    "cpp",
    backends.cpp_device_types(),
    available=functools.partial(backends.cpp_op_current, "bcos_conv2d_patch_norm"),
)
def patch_norm_cpp(x, kernel, stride, padding, groups, out_channels):
    return torch.ops.e2kd_cpp.bcos_conv2d_patch_norm(x, kernel, stride, padding, groups, out_channels)


@backends.register(
    "e2kd::bcos_conv2d",
    "cpp",
    backends.cpp_device_types(),
    available=functools.partial(backends.cpp_op_current, "bcos_conv2d_epilogue"),
)
def bcos_conv2d_cpp(x, weight, b, stride, padding, groups, sums=None):
    """oneDNN/cuDNN conv, then the C++/CUDA epilogue (patch norm and scale in one pass over l). The
    kernel makes its own sums of squares; given ones are used through the reference maths."""
    linear = _conv_linear(x, weight, stride, padding, groups)
    if sums is not None or (linear.device.type == "cpu" and linear.dtype not in (torch.float32, torch.float64)):
        return linear, _reference_scale(linear, x, weight, b, stride, padding, groups, sums)  # CPU kernel: fp32/fp64
    args = (linear, x.to(linear.dtype), list(weight.shape[-2:]), stride, padding, groups, b, False)
    scale, _ = torch.ops.e2kd_cpp.bcos_conv2d_epilogue(*args)
    return linear, scale


__all__ = ["bcos_conv2d", "patch_norm", "reads_producer_sums", "scaled_conv_adjoint"]
