"""``e2kd::bcos_linear`` (``e2kd_fast/ops/bcos_linear.py``) against the reference layer maths.

Its opcheck, gradcheck and gradgradcheck run with every registered op in ``tests/test_opcheck.py``.
"""

from __future__ import annotations

import torch

from e2kd_fast import ops


def test_bcos_linear_op_equals_the_reference_layer():
    from e2kd_fast.reference.bcos import bcos_linear_parts

    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for b in (2.0, 1.5):
        got = ops.bcos_linear(x, w, b)
        expected = bcos_linear_parts(x, w, b)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)
        g = torch.autograd.grad(got[0] * got[1], (x, w), torch.ones(2, 3, 4, dtype=torch.float64))
        e = torch.autograd.grad(expected[0] * expected[1], (x, w), torch.ones(2, 3, 4, dtype=torch.float64))
        for a, b_ in zip(g, e, strict=True):
            torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
