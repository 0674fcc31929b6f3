"""B-cos convolution and linear layers (v2 semantics; state-dict compatible with the `bcos` package)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast import ops
from e2kd_fast.nn.explanation import DynamicLinearModule
from e2kd_fast.ops._common import conv_shape_class
from e2kd_fast.ops.backends import use_fused
from e2kd_fast.ops.bcos_conv2d import inline_box_sum, reads_producer_sums
from e2kd_fast.reference.bcos import (
    IntPair,
    bcos_conv2d_parts,
    bcos_linear_parts,
    channel_sums_of_squares,
    pair,
    unit_norm_weight,
)


def _check_bcos_args(layer: str, b: float, max_out: int) -> None:
    if b < 1:
        raise ValueError(f"{layer}: b must be >= 1, got {b}")
    if max_out < 1:
        raise ValueError(f"{layer}: max_out must be >= 1, got {max_out}")


class NormedConv2d(nn.Conv2d):
    """A conv with unit-norm weights per output channel (normalised on every forward)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, unit_norm_weight(self.weight), self.bias)


class NormedLinear(nn.Linear):
    """A linear layer with unit-norm weight rows (normalised on every forward)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, unit_norm_weight(self.weight), self.bias)


class BcosConv2d(DynamicLinearModule):
    """B-cos convolution: y = |cos(x_p, w)|^(B−1) · ŵᵀx_p, no bias.

    The weight lives in ``self.linear`` (a `NormedConv2d`), so state-dict keys end in
    ``.linear.weight`` as in the official models.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as `nn.Conv2d`.
        b: the exponent B ≥ 1 (B = 1 is the plain normalised conv).
        max_out: MaxOut units M; the conv computes out_channels·M maps and keeps the max of each M.
        **kwargs: accepted and ignored (``bias`` is always False), as in the official constructor.

    Shapes:
        input [N, in_channels, H, W] → output [N, out_channels, H_out, W_out].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 1,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        b: float = 2,
        max_out: int = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        _check_bcos_args(type(self).__name__, b, max_out)
        if padding_mode != "zeros":
            raise ValueError(f"BcosConv2d: only padding_mode='zeros' is supported, got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        self.dilation, self.groups = pair(dilation), groups
        self.b, self.max_out = b, max_out
        self.linear = NormedConv2d(
            in_channels,
            out_channels * max_out,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            device=device,
            dtype=dtype,
        )
        self.patch_size = math.prod(self.kernel_size)
        self.shape_class = conv_shape_class(self.kernel_size, self.stride)  # picks its ops' back end

    def fused_parts(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(linear, scale) from the registered op ``e2kd::bcos_conv2d`` when a fast back end runs it
        for this layer, else None (the reference maths stays inline, visible to Inductor). The op
        covers B > 1 without MaxOut or dilation, every zoo layer."""
        if self.b == 1 or self.max_out != 1 or self.dilation != (1, 1):
            return None
        if not use_fused("e2kd::bcos_conv2d", x.device.type, self.shape_class):
            return None
        sums = None
        if reads_producer_sums(x.device.type, self.shape_class):  # compiled, Inductor fuses it into x's producer
            sums = channel_sums_of_squares(x.to(torch.promote_types(x.dtype, torch.float32)), self.groups)
        geometry = (list(self.stride), list(self.padding), self.groups)
        return ops.bcos_conv2d(x, self.linear.weight, float(self.b), *geometry, sums)

    def forward(self, x: Tensor) -> Tensor:
        parts = self.fused_parts(x)
        if parts is not None:
            linear, scale = parts
            return self.dyn_mul(scale, linear)
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        box_sum = inline_box_sum(x.device.type)
        linear, scale = bcos_conv2d_parts(x, self.linear.weight, self.b, self.max_out, *geometry, box_sum)
        return linear if scale is None else self.dyn_mul(scale, linear)

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class BcosLinear(DynamicLinearModule):
    """B-cos linear layer: y = |cos(x, w)|^(B−1) · ŵᵀx, no bias.

    Args:
        in_features, out_features: as `nn.Linear`.
        bias: must be False (accepted for drop-in compatibility).
        b: the exponent B ≥ 1.
        max_out: MaxOut units M.

    Shapes:
        input [*, in_features] → output [*, out_features].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        b: float = 2,
        max_out: int = 1,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("BcosLinear has no bias: an additive bias would make the network affine")
        _check_bcos_args(type(self).__name__, b, max_out)
        self.in_features, self.out_features = in_features, out_features
        self.b, self.max_out = b, max_out
        self.linear = NormedLinear(in_features, out_features * max_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.b != 1 and self.max_out == 1 and use_fused("e2kd::bcos_linear", x.device.type):
            linear, scale = ops.bcos_linear(x, self.linear.weight, float(self.b))
            return self.dyn_mul(scale, linear)
        linear, scale = bcos_linear_parts(x, self.linear.weight, self.b, self.max_out)
        return linear if scale is None else self.dyn_mul(scale, linear)

    def extra_repr(self) -> str:
        return f"B={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")
