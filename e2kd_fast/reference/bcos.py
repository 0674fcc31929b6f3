"""B-cos layer maths in plain PyTorch: the specification every fast path is tested against.

Everything here is dtype-generic, runs in float64 on the CPU and is twice differentiable.
Formulas (B-cos/B-cos-v2: ``bcos/modules/bcosconv2d.py``, ``bcos/modules/bcoslinear.py``), for output
unit j, input patch x_p and exponent B:

    ŵ_j = w_j / ‖w_j‖₂                       unit-norm weights, recomputed on every call
    l_j = ŵ_jᵀ x_p                            the linear part (conv or linear, no bias)
    n   = sqrt(Σ x_p² + 1e-6)   (conv)        patch norm over the receptive field and channels
        = ‖x‖₂ + 1e-12          (linear)
    s_j = |l_j| / n                 (B = 2)   the dynamic scale, |cos|^(B−1)·‖ŵ_j‖
        = (|l_j / n| + 1e-6)^(B−1)  (B ≠ 2)
    y_j = s_j · l_j                           (B = 1: y = l, no scale)

The constants (1e-6, 1e-12) and the order of operations follow the official `bcos` package 0.1.3
so that float64 results agree to rounding. Each registered ``e2kd::`` layer op has its maths here:
``bcos_conv2d`` ↔ `bcos_conv2d_parts`, ``bcos_linear`` ↔ `bcos_linear_parts`, ``patch_norm`` ↔
`patch_norm`, ``box_sum`` ↔ `box_sum`, ``avg_pool_adjoint`` ↔ `avg_pool_adjoint`,
``scaled_conv_adjoint`` ↔ `scaled_conv_adjoint` (the sweep's step through a conv),
``bcos_dense_head`` ↔ `bcos_dense_head` (the sweep's taped step through a dense layer's head),
``contribution_map`` ↔ `contribution_map`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IntPair = int | tuple[int, int]

PATCH_NORM_EPS = 1e-6  # n = sqrt(Σ x² + ε) over a conv's receptive field
LINEAR_NORM_EPS = 1e-12  # n = ‖x‖₂ + ε for a linear layer
SCALE_EPS = 1e-6  # s = (|l/n| + ε)^(B−1) for B ≠ 2


def pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def transposed_output_padding(in_size, out_size, kernel, stride, padding, dilation=(1, 1)) -> list[int]:
    """The ``output_padding`` that makes ``conv_transpose2d`` return exactly ``in_size``: the adjoint
    of a conv (or pooling) that mapped ``in_size`` to ``out_size`` (strided convs drop remainders)."""
    return [
        in_size[i] - ((out_size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
        for i in range(2)
    ]


def unit_norm_weight(weight: Tensor) -> Tensor:
    """Normalises each output unit's weight to unit L2 norm.

    Args:
        weight: [O, ...] conv ([O, C/groups, kH, kW]) or linear ([O, C]) weight.

    Returns:
        Tensor of the same shape with ‖weight[o]‖₂ = 1 for every o.
    """
    dims = tuple(range(1, weight.dim()))
    return weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def channel_sums_of_squares(x: Tensor, groups: int = 1) -> Tensor:
    """Σ_c x² per group of input channels: [N, C, H, W] → [N, groups, H, W], what a conv's patch norm
    reads of x. The op that makes x can compute it while x is at hand (see `patch_norm_from_sums`)."""
    squares = x * x
    if groups == 1:
        return squares.sum(1, keepdim=True)
    return squares.unflatten(1, (groups, x.shape[1] // groups)).sum(2)


def box_sum(sums: Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0) -> Tensor:
    """The sum over every patch (zero padding counts): [N, G, H, W] → [N, G, H_out, W_out].

    An average pool times the patch size, as the official code does it (``divisor_override`` does
    not compile)."""
    kernel = pair(kernel_size)
    return F.avg_pool2d(sums, kernel, stride=pair(stride), padding=pair(padding)) * math.prod(kernel)


BoxSum = Callable[[Tensor, IntPair, IntPair, IntPair], Tensor]


def patch_norm_from_sums(
    sums: Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    out_channels: int | None = None,
    box_sum: BoxSum = box_sum,
) -> Tensor:
    """The patch norm from the channel sums of squares: `box_sum`, sqrt.

    Args:
        sums: [N, G, H, W] `channel_sums_of_squares` of the conv's input (G = the conv's groups).
        kernel_size, stride, padding: the conv's geometry (no dilation; see `patch_norm_slow`).
        out_channels: required when G > 1: each group's norm is repeated to its outputs.
        box_sum: what computes `box_sum`: that function by default; a layer may pass a registered
            op that runs it.

    Returns:
        [N, 1, H_out, W_out] for G == 1, else [N, out_channels, H_out, W_out].
    """
    norms = (box_sum(sums, kernel_size, stride, padding) + PATCH_NORM_EPS).sqrt()
    if sums.shape[1] > 1:
        if out_channels is None:
            raise ValueError("patch_norm: out_channels is required when groups > 1")
        norms = norms.repeat_interleave(out_channels // sums.shape[1], dim=1)
    return norms


def patch_norm(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    groups: int = 1,
    out_channels: int | None = None,
    box_sum: BoxSum = box_sum,
) -> Tensor:
    """The L2 norm of every input patch a conv sees: square, channel sum, box sum, sqrt.

    Args:
        x: [N, C, H, W] input of the conv.
        kernel_size, stride, padding: the conv's geometry (no dilation; see `patch_norm_slow`).
        groups: the conv's groups; the norm is taken per group of input channels.
        out_channels: required when groups > 1: each group's norm is repeated to its outputs
            (ignored when groups == 1).
        box_sum: as in `patch_norm_from_sums`.

    Returns:
        [N, 1, H_out, W_out] for groups == 1, else [N, out_channels, H_out, W_out].
    """
    sums = channel_sums_of_squares(x, groups)
    return patch_norm_from_sums(sums, kernel_size, stride, padding, out_channels if groups > 1 else None, box_sum)


def patch_norm_slow(
    x: Tensor,
    weight_shape: tuple[int, ...] | torch.Size,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """Obviously-correct patch norm: a conv of x² with a kernel of ones. Also handles dilation.

    Args:
        x: [N, C, H, W] input of the conv.
        weight_shape: the conv weight's shape [O, C/groups, kH, kW].

    Returns:
        [N, O, H_out, W_out].
    """
    ones = torch.ones(weight_shape, dtype=x.dtype, device=x.device)
    return (F.conv2d(x * x, ones, None, pair(stride), pair(padding), pair(dilation), groups) + PATCH_NORM_EPS).sqrt()


def dynamic_scale(linear_out: Tensor, norm: Tensor, b: float) -> Tensor:
    """The B-cos scale s = |cos|^(B−1) (times ‖ŵ‖ = 1), so that the output is s · l.

    Args:
        linear_out: l = ŵᵀx, any shape.
        norm: the input norm, broadcastable to ``linear_out``.
        b: the exponent B (> 1; for B = 1 there is no scale).

    Returns:
        s with the shape of ``linear_out``.
    """
    if b == 2:
        return linear_out.abs() / norm
    return ((linear_out / norm).abs() + SCALE_EPS).pow(b - 1)


def max_out(linear_out: Tensor, units: int, dim: int) -> Tensor:
    """MaxOut: views ``dim`` of size O·M as (O, M) and keeps the max over the M units."""
    if units == 1:
        return linear_out
    out_size = linear_out.shape[dim] // units
    # max(...).values, as the official code: its gradient goes to one unit even on ties.
    return linear_out.unflatten(dim, (out_size, units)).max(dim=dim + 1 if dim >= 0 else dim).values


def bcos_conv2d_parts(
    x: Tensor,
    weight: Tensor,
    b: float = 2,
    max_out_units: int = 1,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    box_sum: BoxSum = box_sum,
) -> tuple[Tensor, Tensor | None]:
    """The two factors of a B-cos conv: output = scale · linear (scale is None for B = 1).

    Args:
        x: [N, C, H, W] input.
        weight: [O·M, C/groups, kH, kW] raw (unnormalised) weight, M = ``max_out_units``.
        box_sum: as in `patch_norm_from_sums`.

    Returns:
        (linear, scale), both [N, O, H_out, W_out]; scale is None when b == 1.
    """
    linear = max_out(bcos_conv_linear(x, weight, stride, padding, dilation, groups), max_out_units, dim=1)
    if b == 1:
        return linear, None
    if pair(dilation) != (1, 1):
        norm = patch_norm_slow(x, (linear.shape[1], *weight.shape[1:]), stride, padding, dilation, groups)
        return linear, dynamic_scale(linear, norm, b)
    return linear, conv_dynamic_scale(linear, x, weight.shape[-2:], b, stride, padding, groups, box_sum)


def bcos_conv_linear(
    x: Tensor, weight: Tensor, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1
) -> Tensor:
    """The linear part l = conv(x, ŵ): [N, C, H, W] → [N, O, H_out, W_out] (weight raw, [O, C/groups, kH, kW])."""
    return conv_linear(x, unit_norm_weight(weight), stride, padding, dilation, groups)


def conv_linear(
    x: Tensor, w_hat: Tensor, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1
) -> Tensor:
    """`bcos_conv_linear` for a ŵ already at hand (the sweep keeps it for `conv_adjoint`)."""
    return F.conv2d(x, w_hat, None, pair(stride), pair(padding), pair(dilation), groups)


def conv_dynamic_scale(
    linear: Tensor,
    x: Tensor,
    kernel_size: IntPair,
    b: float,
    stride: IntPair = 1,
    padding: IntPair = 0,
    groups: int = 1,
    box_sum: BoxSum = box_sum,
) -> Tensor:
    """The scale of a (non-dilated) B-cos conv's linear part [N, O, H_out, W_out] from its input x
    [N, C, H, W] (``box_sum``: as in `patch_norm_from_sums`)."""
    norm = patch_norm(x, kernel_size, stride, padding, groups, linear.shape[1], box_sum)
    return dynamic_scale(linear, norm, b)


def conv_adjoint(
    g: Tensor,
    weight: Tensor,
    in_size,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """The adjoint of ``conv2d(·, weight, stride, padding, dilation, groups)`` for an input of ``in_size``.

    Args:
        g: [N, O, h, w]; weight: [O, C/groups, kH, kW] (cast to g's dtype: under mixed precision the
            sweep's g is bf16/fp16 while the weight stays fp32).
        in_size: (H, W) of the conv's input (strided convs drop remainders; the output padding restores them).

    Returns:
        [N, C, H, W].
    """
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out_pad = transposed_output_padding(in_size, g.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return F.conv_transpose2d(g, weight.to(g.dtype), None, stride, padding, out_pad, groups, dilation)


def avg_pool_adjoint(g: Tensor, in_shape, kernel_size: IntPair, stride: IntPair, padding: IntPair = 0) -> Tensor:
    """The adjoint of ``avg_pool2d(·, kernel_size, stride, padding)`` (zero padding counted, floor mode)
    for an input of ``in_shape`` [N, C, H, W]: g [N, C, h, w] → [N, C, H, W].

    Autograd's own adjoint: unlike a depthwise transposed conv, whose CPU kernel and meta function
    disagree on the output strides of 1×1 inputs, it gives compiled graphs consistent layouts.
    """
    shape_only = g.new_empty(()).expand(in_shape)
    return torch.ops.aten.avg_pool2d_backward(
        g, shape_only, list(pair(kernel_size)), list(pair(stride)), list(pair(padding)), False, True, None
    )


def scaled_conv_adjoint(
    g: Tensor,
    scale: Tensor,
    weight: Tensor,
    in_size,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """The explanation sweep's step back through a B-cos conv: conv_adjoint(scale ⊙ g, ŵ).

    Args:
        g: [N, O, h, w] the sweep's vector at the conv's output; scale: the layer's dynamic scale,
            broadcastable to g; weight: the unit-norm ŵ [O, C/groups, kH, kW].

    Returns:
        [N, C, *in_size].
    """
    # g first: the product takes g's layout (channels_last or not), which the transposed conv keeps.
    return conv_adjoint(g * scale, weight, in_size, stride, padding, dilation, groups)


def bcos_conv2d(x: Tensor, weight: Tensor, b: float = 2, max_out_units: int = 1, **conv: IntPair) -> Tensor:
    """A B-cos conv: [N, C, H, W] → [N, O, H_out, W_out]; ``conv`` holds stride/padding/dilation/groups."""
    linear, scale = bcos_conv2d_parts(x, weight, b, max_out_units, **conv)
    return linear if scale is None else scale * linear


def bcos_dense_head(
    features: list[Tensor], running_var: Tensor, norm_weight: Tensor | None, eps: float, weight: Tensor, b: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The head of a dense layer in eval mode: an uncentred batch norm over the concatenation of the
    features, with its running variance, then a 1×1 B-cos conv (stride 1, one group, B > 1).

        a = γ / sqrt(running_var + eps),   y = a ⊙ cat(features),   (linear, scale) = the conv's parts on y

    Args:
        features: [N, C_i, H, W] maps; their concatenation has C = Σ C_i channels.
        running_var, norm_weight: [C] (``norm_weight`` None: γ = 1).
        weight: [K, C, 1, 1] the conv's raw weight; b: its exponent.

    Returns:
        (scale · linear, scale), both [N, K, H, W], and the matrix the head's adjoint applies,
        ŵ·diag(a) [K, C].
    """
    norm_scale = (running_var + eps).rsqrt()
    if norm_weight is not None:
        norm_scale = norm_weight * norm_scale
    x = norm_scale[:, None, None] * torch.cat(features, 1)
    w_hat = unit_norm_weight(weight)
    linear = conv_linear(x, w_hat)
    scale = conv_dynamic_scale(linear, x, 1, b)
    return scale * linear, scale, folded_head_weight(w_hat, norm_scale)


def folded_head_weight(w_hat: Tensor, norm_scale: Tensor) -> Tensor:
    """ŵ·diag(a): a 1×1 conv's unit-norm weight [K, C, 1, 1] with the per-channel scale a of the norm
    before it ([C], or [1, C, 1, 1] as a norm records it) folded in → [K, C], the matrix a dense
    head's adjoint applies. In ŵ's own order, so that a compiled graph computes it in the loop that
    normalises ŵ."""
    return w_hat.flatten(1) * norm_scale.reshape(1, -1)


def bcos_linear_parts(x: Tensor, weight: Tensor, b: float = 2, max_out_units: int = 1) -> tuple[Tensor, Tensor | None]:
    """The two factors of a B-cos linear layer: output = scale · linear.

    Args:
        x: [*, C] input.
        weight: [O·M, C] raw weight.

    Returns:
        (linear, scale), both [*, O]; scale is None when b == 1.
    """
    linear = max_out(F.linear(x, unit_norm_weight(weight)), max_out_units, dim=-1)
    if b == 1:
        return linear, None
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + LINEAR_NORM_EPS
    return linear, dynamic_scale(linear, norm, b)


def bcos_linear(x: Tensor, weight: Tensor, b: float = 2, max_out_units: int = 1) -> Tensor:
    """A B-cos linear layer: [*, C] → [*, O]."""
    linear, scale = bcos_linear_parts(x, weight, b, max_out_units)
    return linear if scale is None else scale * linear


def contribution_map(x: Tensor, weights: Tensor) -> Tensor:
    """Σ_c x·W per pixel, the contributions W(x)ᵀx of a B-cos model spatially resolved.

    Args:
        x, weights: [N, C, H, W] the input and its dynamic weights W(x).

    Returns:
        [N, H, W].
    """
    return (x * weights).sum(dim=1)
