"""Registered ``e2kd::`` ops: one contract each, a reference CPU implementation, fake and autograd.

Importing this package registers the ops. Fast kernels (Triton, C++/CUDA) register as further
implementations of the same ops; the reference stays the spec they are tested against.
"""

from e2kd_fast.ops._registry import OPS, register_op_test
from e2kd_fast.ops.bcos import (
    bcos_conv2d,
    bcos_linear,
    contribution_map,
    patch_norm,
    scaled_conv_adjoint,
    use_fused,
)
from e2kd_fast.ops.distill_loss import distill_loss

__all__ = [
    "OPS",
    "bcos_conv2d",
    "bcos_linear",
    "contribution_map",
    "distill_loss",
    "patch_norm",
    "register_op_test",
    "scaled_conv_adjoint",
    "use_fused",
]
