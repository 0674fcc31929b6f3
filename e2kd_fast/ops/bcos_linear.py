"""The B-cos linear layer as a registered op: ``e2kd::bcos_linear``.

The two factors (linear, scale) of a B-cos linear layer (B > 1, no MaxOut), as
`e2kd_fast.reference.bcos.bcos_linear_parts` states them; the layer's output is scale · linear. The
reference is its only back end (no kernel yet: docs/kernels.md says why); the backward is plain
torch ops, so it is differentiable again (gradgradcheck).
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._common import scale_slope
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import bcos as reference
from e2kd_fast.reference.bcos import LINEAR_NORM_EPS


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
    ds_dratio = scale_slope(ratio, b)
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


__all__ = ["bcos_linear"]
