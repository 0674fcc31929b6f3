"""Helpers shared by the op modules of `e2kd_fast.ops` and the Triton kernels in ``kernels/``.

A leaf module: it imports torch and `e2kd_fast.reference` only, so every op module and every kernel
module can import it without importing another op (kernels import nothing else of the package but
`e2kd_fast.reference`). Which back end runs is `e2kd_fast.ops.backends`' business (``use_fused`` is
there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from e2kd_fast.reference.bcos import SCALE_EPS


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor dense in that order (and not plain contiguous), else contiguous.

    Every op returns its outputs in the memory format of its main input, and its fake says so, so
    compiled graphs see the strides the kernels write. A tensor that is both (H = W = 1 or C = 1)
    counts as contiguous, in the fakes and in the kernels alike.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_like_format(like: Tensor, shape: Sequence[int]) -> Tensor:
    """An empty tensor of ``shape`` in ``like``'s dtype and device, in ``like``'s memory format when
    ``shape`` is 4-D (contiguous otherwise): how fakes and launchers allocate their outputs."""
    fmt = memory_format_of(like) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output length of a convolution or pooling (no dilation) along one spatial dimension."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_shape_class(kernel: Sequence[int], stride: Sequence[int] | int) -> str:
    """A conv's shape class for the per-shape back-end records of ``fastest.json``: its kernel and
    stride, e.g. ``k3x3-s2x2``."""
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(stride), int(stride)) if isinstance(stride, int) else (int(v) for v in stride)
    return f"k{kh}x{kw}-s{sh}x{sw}"


def scale_slope(ratio: Tensor, b: float) -> Tensor:
    """ds/dr of the B-cos dynamic scale s(r), r = l/n (`e2kd_fast.reference.bcos.dynamic_scale`):
    sign(r) for B = 2 (s = |r|), else (B−1)(|r| + ε)^(B−2) sign(r). Shared by the conv and linear
    layer ops' backwards; same shape as ``ratio``."""
    if b == 2:
        return torch.sign(ratio)
    return (b - 1) * (ratio.abs() + SCALE_EPS).pow(b - 2) * torch.sign(ratio)
