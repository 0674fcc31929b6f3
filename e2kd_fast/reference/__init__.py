"""The maths as plain PyTorch: float64-safe, twice differentiable, the spec for every fast path."""

from e2kd_fast.reference.bcos import (
    bcos_conv2d,
    bcos_conv2d_parts,
    bcos_linear,
    bcos_linear_parts,
    dynamic_scale,
    max_out,
    patch_norm,
    patch_norm_slow,
    unit_norm_weight,
)
from e2kd_fast.reference.dynamic import dynamic_matmul, dynamic_multiply
from e2kd_fast.reference.explain import dynamic_weights_autograd

__all__ = [
    "bcos_conv2d",
    "bcos_conv2d_parts",
    "bcos_linear",
    "bcos_linear_parts",
    "dynamic_matmul",
    "dynamic_multiply",
    "dynamic_scale",
    "dynamic_weights_autograd",
    "max_out",
    "patch_norm",
    "patch_norm_slow",
    "unit_norm_weight",
]
