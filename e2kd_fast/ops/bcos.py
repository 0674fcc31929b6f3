"""B-cos layer ops: the patch norm and the sweep's scaled adjoint, as registered ``e2kd::`` ops.

``e2kd::patch_norm``: n = sqrt(boxsum_k(Σ_c x²) + 1e-6), the L2 norm of every receptive field
(per group of input channels, repeated to that group's outputs).
    ∂n/∂x: with S = n², dS = dn / (2n), dx = 2x · boxsumᵀ(dS) (boxsumᵀ = the transposed box sum).

``e2kd::scaled_conv_adjoint``: the explanation sweep's step through a B-cos conv,
    y = conv2dᵀ(s ⊙ g, ŵ)  (the input-adjoint of conv2d(·, ŵ) applied to s ⊙ g)
    with  d(s ⊙ g) = conv2d(dy, ŵ),  dg = s · d(s ⊙ g),  ds = g · d(s ⊙ g),
          dŵ = conv2d weight-gradient with input dy and output-gradient s ⊙ g.

The maths of every op here is stated once, in `e2kd_fast.reference.bcos` (``bcos_conv2d_parts``,
``bcos_linear_parts``, ``patch_norm``, ``scaled_conv_adjoint``, ``contribution_map``): each op's
reference back end calls it and fixes the output layout. The backwards are plain torch ops, so
they are differentiable again (gradgradcheck).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import bcos as reference
from e2kd_fast.reference.bcos import LINEAR_NORM_EPS, SCALE_EPS, transposed_output_padding


@torch.compiler.assume_constant_result
def use_fused(op_name: str, device_type: str) -> bool:
    """Whether a layer should call the registered op ``op_name`` instead of its inline reference maths.

    True when the back end chosen for ``device_type`` is not the reference: the plain torch ops stay
    visible to Inductor on the reference path (an opaque reference op was slower). (`backends.choose`
    never picks the Triton interpreter on CPU under ``auto``, nor a C++ kernel missing from the
    loaded extension.) Under ``torch.compile`` the answer is a trace-time constant (no guard, no
    graph break): choose the back end before compiling.
    """
    return backends.choose(op_name, device_type) != "reference"


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in that order (and not plain contiguous), else contiguous.

    Every op here returns its outputs in the memory format of its main input, and its fake says so,
    so compiled graphs see the strides the kernels write.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty(like: Tensor, shape) -> Tensor:
    """An output of ``shape`` in ``like``'s dtype, device and memory format (fakes use this)."""
    fmt = memory_format_of(like) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _box_sum_adjoint(g: Tensor, kernel: list[int], stride: list[int], padding: list[int], in_size) -> Tensor:
    """The transpose of ``avg_pool2d(·, kernel, stride, padding) · prod(kernel)`` for an input of ``in_size``."""
    return reference.avg_pool_adjoint(g * math.prod(kernel), (*g.shape[:2], *in_size), kernel, stride, padding)


@torch.library.custom_op("e2kd::patch_norm", mutates_args=())
def patch_norm(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], groups: int, out_channels: int
) -> Tensor:
    """[N, C, H, W] → [N, 1 or out_channels, H_out, W_out]: the norm of every receptive field."""
    impl = backends.implementation("e2kd::patch_norm", x.device.type)
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
    h = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return _empty(x, (x.shape[0], out_channels if groups > 1 else 1, h, w))


def _patch_norm_setup(ctx, inputs, output) -> None:
    x, kernel, stride, padding, groups, out_channels = inputs
    ctx.save_for_backward(x, output)
    ctx.geometry = (kernel, stride, padding, groups, out_channels)


def _patch_norm_vjp(x: Tensor, norm: Tensor, grad: Tensor, kernel, stride, padding, groups: int, out_channels: int):
    """∂/∂x of ⟨grad, n⟩ for n = patch_norm(x): dS = dn / 2n, dx = 2x · boxsumᵀ(dS)."""
    grad_sq = grad / (2 * norm)  # d/dS of sqrt(S + eps)
    if groups > 1:  # the adjoint of repeat_interleave: sum the copies of each group
        grad_sq = grad_sq.unflatten(1, (groups, out_channels // groups)).sum(2)
    grad_box = _box_sum_adjoint(grad_sq, kernel, stride, padding, x.shape[-2:])
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
    impl = backends.implementation("e2kd::scaled_conv_adjoint", g.device.type)
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
    return _empty(g, (g.shape[0], weight.shape[1] * groups, *in_size))


def _adjoint_setup(ctx, inputs, output) -> None:
    g, scale, weight, in_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(g, scale, weight)
    ctx.geometry = (stride, padding, dilation, groups)


def _adjoint_backward(ctx, grad: Tensor):
    g, scale, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    # Mixed precision: grad, g and the scale may be bf16/fp16 while the weight stays fp32.
    grad_scaled = F.conv2d(
        grad, weight.to(grad.dtype), None, stride, padding, dilation, groups
    )  # adjoint of the transpose
    grad_weight = None
    if ctx.needs_input_grad[2]:
        scaled = (scale * g).to(grad.dtype)
        grad_weight = torch.nn.grad.conv2d_weight(grad, weight.shape, scaled, stride, padding, dilation, groups)
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


register_op_test(patch_norm, _patch_norm_inputs, reference.patch_norm)
register_op_test(scaled_conv_adjoint, _adjoint_inputs, reference.scaled_conv_adjoint)


@torch.library.custom_op("e2kd::bcos_conv2d", mutates_args=())
def bcos_conv2d(
    x: Tensor, weight: Tensor, b: float, stride: list[int], padding: list[int], groups: int
) -> tuple[Tensor, Tensor]:
    """The two factors of a B-cos conv (B > 1, no MaxOut, no dilation): (linear, scale).

    x [N, C, H, W], weight [O, C/groups, kH, kW] (raw; normalised per output unit inside) →
    linear = conv(x, ŵ) and scale = |cos|^(B−1), both [N, O, H_out, W_out]; the layer's output is
    scale · linear, and the scale is what the explanation sweep needs. Returning the linear part
    lets the backward reuse it instead of recomputing the conv. Both outputs are in x's memory
    format (NCHW or channels_last).
    """
    impl = backends.implementation("e2kd::bcos_conv2d", x.device.type)
    return impl(x, weight, b, stride, padding, groups)


@backends.register("e2kd::bcos_conv2d", "reference", ("cpu", "cuda"))
def bcos_conv2d_ref(
    x: Tensor, weight: Tensor, b: float, stride: list[int], padding: list[int], groups: int
) -> tuple[Tensor, Tensor]:
    """The reference forward of `bcos_conv2d`: conv, patch norm and scale as separate torch ops."""
    linear, scale = reference.bcos_conv2d_parts(x, weight, b, 1, stride, padding, 1, groups)
    fmt = memory_format_of(x)
    return linear.contiguous(memory_format=fmt), scale.contiguous(memory_format=fmt)


def _reference_scale(linear: Tensor, x: Tensor, weight: Tensor, b: float, stride, padding, groups: int) -> Tensor:
    """The dynamic scale of the conv output ``linear``, in x's memory format."""
    scale = reference.conv_dynamic_scale(linear, x, weight.shape[-2:], b, stride, padding, groups)
    return scale.contiguous(memory_format=memory_format_of(x))


def _conv_linear(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], groups: int) -> Tensor:
    """The linear part on cuDNN/oneDNN, in x's memory format (what the fused epilogues read)."""
    linear = reference.bcos_conv_linear(x, weight, stride, padding, 1, groups)
    return linear.contiguous(memory_format=memory_format_of(x))


@bcos_conv2d.register_fake
def _(x, weight, b, stride, padding, groups):
    h = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    shape = (x.shape[0], weight.shape[0], h, w)
    return _empty(x, shape), _empty(x, shape)


def _scale_slope(ratio: Tensor, b: float) -> Tensor:
    """ds/dr of the dynamic scale s(r), r = l/n (`reference.bcos.dynamic_scale`): sign(r) for B = 2
    (s = |r|), else (B−1)(|r| + ε)^(B−2) sign(r)."""
    if b == 2:
        return torch.sign(ratio)
    return (b - 1) * (ratio.abs() + SCALE_EPS).pow(b - 2) * torch.sign(ratio)


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
    norm = reference.patch_norm(x, kernel, stride, padding, groups, out_channels)
    ratio = linear / norm
    ds_dratio = _scale_slope(ratio, b)
    grad_linear = grad_linear + grad_scale * ds_dratio / norm
    grad_norm = -grad_scale * ds_dratio * ratio / norm
    if groups == 1:
        grad_norm = grad_norm.sum(1, keepdim=True)  # n was broadcast over the output channels
    # Through the patch norm and through l = conv(x, ŵ).
    out_pad = transposed_output_padding(x.shape[-2:], linear.shape[-2:], kernel, stride, padding)
    grad_x = _patch_norm_vjp(x, norm, grad_norm, kernel, stride, padding, groups, out_channels)
    grad_x = grad_x + F.conv_transpose2d(grad_linear, w_hat, None, stride, padding, out_pad, groups)
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


register_op_test(bcos_conv2d, _bcos_conv_inputs, reference.bcos_conv2d_parts)


@torch.library.custom_op("e2kd::bcos_linear", mutates_args=())
def bcos_linear(x: Tensor, weight: Tensor, b: float) -> tuple[Tensor, Tensor]:
    """The two factors of a B-cos linear layer (B > 1, no MaxOut): (linear, scale).

    x [*, C], weight [O, C] (raw; rows normalised inside) → linear = x ŵᵀ and
    scale = |cos|^(B−1) with the input norm ‖x‖₂ + 1e-12 (`reference.bcos.bcos_linear_parts`), both
    [*, O] and contiguous.
    """
    impl = backends.implementation("e2kd::bcos_linear", x.device.type)
    return impl(x, weight, b)


@backends.register("e2kd::bcos_linear", "reference", ("cpu", "cuda"))
def bcos_linear_ref(x: Tensor, weight: Tensor, b: float) -> tuple[Tensor, Tensor]:
    """The reference forward of `bcos_linear`."""
    linear, scale = reference.bcos_linear_parts(x, weight, b)
    return linear.contiguous(), scale.contiguous()


@bcos_linear.register_fake
def _(x, weight, b):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def _bcos_linear_setup(ctx, inputs, output) -> None:
    x, weight, b = inputs
    ctx.save_for_backward(x, weight, output[0])
    ctx.b = b


def _bcos_linear_backward(ctx, grad_linear: Tensor, grad_scale: Tensor):
    """s = f(l/n), l = x ŵᵀ, n = ‖x‖ + ε: dl = g_l + g_s·∂s/∂l, dn = Σ_o g_s·∂s/∂n, then
    dx = dl ŵ + dn · x/‖x‖ and dw through ŵ = w/‖w‖ (plain torch ops: differentiable again)."""
    x, weight, linear = ctx.saved_tensors
    b = ctx.b
    w_norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    w_hat = weight / w_norm
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    norm = x_norm + LINEAR_NORM_EPS
    ratio = linear / norm
    ds_dratio = _scale_slope(ratio, b)
    grad_linear = grad_linear + grad_scale * ds_dratio / norm
    grad_norm = -(grad_scale * ds_dratio * ratio / norm).sum(-1, keepdim=True)
    # d‖x‖/dx = x/‖x‖, taken as 0 at x = 0 (as vector_norm's own backward).
    unit_x = x / x_norm.clamp_min(torch.finfo(x.dtype).tiny)
    grad_x = grad_linear @ w_hat + grad_norm * unit_x
    grad_w_hat = grad_linear.reshape(-1, weight.shape[0]).transpose(0, 1) @ x.reshape(-1, weight.shape[1])
    grad_weight = (grad_w_hat - w_hat * (w_hat * grad_w_hat).sum(dim=1, keepdim=True)) / w_norm
    return grad_x, grad_weight, None


bcos_linear.register_autograd(_bcos_linear_backward, setup_context=_bcos_linear_setup)


def _bcos_linear_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [(rand(3, 5), rand(4, 5), 2.0), (rand(2, 3, 6), rand(5, 6), 1.5), (rand(1, 4), rand(2, 4), 2.5)]


register_op_test(bcos_linear, _bcos_linear_inputs, reference.bcos_linear_parts)


@torch.library.custom_op("e2kd::contribution_map", mutates_args=())
def contribution_map(x: Tensor, weights: Tensor) -> Tensor:
    """Σ_c x·W per pixel: x, W [N, C, H, W] (same dtype) → [N, H, W], contiguous."""
    impl = backends.implementation("e2kd::contribution_map", x.device.type)
    return impl(x, weights)


@backends.register("e2kd::contribution_map", "reference", ("cpu", "cuda"))
def contribution_map_ref(x: Tensor, weights: Tensor) -> Tensor:
    """The reference forward of `contribution_map`."""
    return reference.contribution_map(x, weights).contiguous()


@contribution_map.register_fake
def _(x, weights):
    if x.shape != weights.shape or x.dim() != 4:
        raise ValueError(f"contribution_map: expected equal [N, C, H, W] shapes, got {x.shape} and {weights.shape}")
    return x.new_empty(x.shape[0], *x.shape[2:])


def _contribution_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _contribution_backward(ctx, grad: Tensor):
    x, weights = ctx.saved_tensors
    grad = grad.unsqueeze(1)
    return grad * weights, grad * x


contribution_map.register_autograd(_contribution_backward, setup_context=_contribution_setup)


def _contribution_inputs() -> list[tuple]:
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [(rand(2, 6, 3, 4), rand(2, 6, 3, 4)), (rand(1, 1, 5, 7), rand(1, 1, 5, 7))]


register_op_test(contribution_map, _contribution_inputs, reference.contribution_map)


# ---------------------------------------------------------------------------------------------- fast back ends
# Triton: CUDA tensors (CPU only under TRITON_INTERPRET=1, see backends). The kernels module is
# imported lazily, so importing the ops needs neither Triton nor a GPU.


@backends.register("e2kd::patch_norm", "triton", ("cuda",))
def patch_norm_triton(x, kernel, stride, padding, groups, out_channels):
    from e2kd_fast.kernels import bcos_layer

    return bcos_layer.patch_norm(x, kernel, stride, padding, groups, out_channels)


@backends.register("e2kd::bcos_conv2d", "triton", ("cuda",))
def bcos_conv2d_triton(x, weight, b, stride, padding, groups):
    """cuDNN conv, then the fused epilogue (channel sum of squares, box sum, sqrt, scale) in Triton."""
    from e2kd_fast.kernels import bcos_layer

    linear = _conv_linear(x, weight, stride, padding, groups)
    # Under autocast the conv runs in the low precision: the epilogue reads x in that dtype too.
    x = x.to(linear.dtype)
    _, scale = bcos_layer.bcos_epilogue(linear, x, list(weight.shape[-2:]), stride, padding, groups, b, False)
    return linear, scale


@backends.register("e2kd::scaled_conv_adjoint", "triton", ("cuda",))
def scaled_conv_adjoint_triton(g, scale, weight, in_size, stride, padding, dilation, groups):
    """s ⊙ g in one Triton pass (in g's memory format), then cuDNN's transposed conv."""
    from e2kd_fast.kernels import bcos_layer

    product = bcos_layer.scale_product(scale.to(g.dtype).expand_as(g), g)
    return _conv_transpose(product, weight, in_size, stride, padding, dilation, groups)


@backends.register("e2kd::contribution_map", "triton", ("cuda",))
def contribution_map_triton(x, weights):
    from e2kd_fast.kernels import bcos_layer

    return bcos_layer.contribution_map(x, weights)


# C++ (CPU) / CUDA: the kernels of csrc/{cpu,cuda}/bcos_epilogue.*, private ops e2kd_cpp::*.
# CUDA is listed only where setup.py recorded a CUDA build (`backends.cpp_device_types`).


@backends.register(
    "e2kd::patch_norm",
    "cpp",
    backends.cpp_device_types(),
    available=functools.partial(backends.cpp_op_current, "bcos_patch_norm"),
)
def patch_norm_cpp(x, kernel, stride, padding, groups, out_channels):
    return torch.ops.e2kd_cpp.bcos_patch_norm(x, kernel, stride, padding, groups, out_channels)


@backends.register(
    "e2kd::bcos_conv2d",
    "cpp",
    backends.cpp_device_types(),
    available=functools.partial(backends.cpp_op_current, "bcos_epilogue"),
)
def bcos_conv2d_cpp(x, weight, b, stride, padding, groups):
    """oneDNN/cuDNN conv, then the C++/CUDA epilogue (patch norm and scale in one pass over l)."""
    linear = _conv_linear(x, weight, stride, padding, groups)
    if linear.device.type == "cpu" and linear.dtype not in (torch.float32, torch.float64):
        return linear, _reference_scale(linear, x, weight, b, stride, padding, groups)  # the CPU kernel: fp32/fp64
    args = (linear, x.to(linear.dtype), list(weight.shape[-2:]), stride, padding, groups, b, False)
    scale, _ = torch.ops.e2kd_cpp.bcos_epilogue(*args)
    return linear, scale


__all__ = ["bcos_conv2d", "bcos_linear", "contribution_map", "patch_norm", "scaled_conv_adjoint"]
