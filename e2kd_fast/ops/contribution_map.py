"""The contribution map of a B-cos explanation as a registered op: ``e2kd::contribution_map``.

Σ_c x·W per pixel for an input x and its dynamic weights W (`e2kd_fast.reference.bcos.contribution_map`
states it). Back ends: the reference and ``triton`` (``kernels/contribution_map.py``: one reduction
over the channels, any strides). The backward is plain torch ops, so it is differentiable again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import bcos as reference


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


# Triton: CUDA tensors (CPU only under TRITON_INTERPRET=1, see backends). The kernels module is
# imported lazily, so importing the op needs neither Triton nor a GPU.


@backends.register("e2kd::contribution_map", "triton", ("cuda",))
def contribution_map_triton(x: Tensor, weights: Tensor) -> Tensor:
    from e2kd_fast.kernels import contribution_map as kernels

    return kernels.contribution_map(x, weights)


__all__ = ["contribution_map"]
