"""Registered ``e2kd::`` ops: one contract each, a reference CPU implementation, fake and autograd.

Importing this package registers the ops. Fast kernels (Triton, C++/CUDA) register as further
implementations of the same ops; the reference stays the spec they are tested against.
"""

from e2kd_fast.ops._registry import OPS, register_op_test
from e2kd_fast.ops.loss import distill_loss

__all__ = ["OPS", "distill_loss", "register_op_test"]
