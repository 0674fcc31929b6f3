"""Registered ``e2kd::`` ops: one contract each, a reference CPU implementation, fake and autograd.

Importing this package registers the ops. Fast kernels (Triton, C++/CUDA) register as further
implementations of the same ops; the reference stays the spec they are tested against.

Every op's files share one stem (``csrc/README.md``): ``e2kd_fast/ops/<stem>.py`` (this package),
``kernels/<stem>.py``, ``csrc/{cpu,cuda}/<stem>.*``, ``tests/test_<stem>.py``. The public functions
below carry the names of their modules, so ``e2kd_fast.ops.<stem>`` is the function; import a module's
other names with ``from e2kd_fast.ops.<stem> import ...``.
"""

from e2kd_fast.ops._registry import OPS, register_op_test
from e2kd_fast.ops.backends import use_fused
from e2kd_fast.ops.bcos_conv2d import avg_pool_adjoint, bcos_conv2d, box_sum, patch_norm, scaled_conv_adjoint
from e2kd_fast.ops.bcos_dense_head import bcos_dense_head
from e2kd_fast.ops.bcos_linear import bcos_linear
from e2kd_fast.ops.contribution_map import contribution_map
from e2kd_fast.ops.distill_loss import distill_loss

__all__ = [
    "OPS",
    "avg_pool_adjoint",
    "bcos_conv2d",
    "bcos_dense_head",
    "bcos_linear",
    "box_sum",
    "contribution_map",
    "distill_loss",
    "patch_norm",
    "register_op_test",
    "scaled_conv_adjoint",
    "use_fused",
]
