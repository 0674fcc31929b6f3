"""``e2kd::contribution_map``: its Triton kernel (``kernels/contribution_map.py``) and the op under every
back end against the reference maths.

Triton runs under the interpreter on CPU (CI sets TRITON_INTERPRET=1). Its opcheck, gradcheck and
gradgradcheck with the reference back end run with every registered op in ``tests/test_opcheck.py``.
"""

from __future__ import annotations

import pytest
import torch

from e2kd_fast import ops
from e2kd_fast.ops import backends

OP = "e2kd::contribution_map"
FAST_BACKENDS = [b for b in backends.candidates(OP, "cpu") if b != "reference"]
needs_interpreter = pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
LAYOUTS = ["nchw", "channels_last"]
# [N, C, H, W]: odd sizes, one channel, one pixel row.
SHAPES = [(2, 3, 5, 7), (1, 1, 7, 5), (2, 6, 1, 8)]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_contribution_map_matches_reference(shape, layout):
    from e2kd_fast.kernels import contribution_map as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._contribution_kernel, InterpretedFunction)
    gen = torch.Generator().manual_seed(sum(shape))
    x = _layout(torch.randn(shape, generator=gen), layout)
    weights = _layout(torch.randn(shape, generator=gen), layout)
    got = kernels.contribution_map(x, weights)
    assert not got.isnan().any(), "an output element was not written (still NaN)"
    assert got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), (x.double() * weights.double()).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_op_with_each_backend_forced_matches_and_differentiates(backend):
    gen = torch.Generator().manual_seed(7)
    x, weights = (torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with backends.use_backend("reference"):
        expected = ops.contribution_map(x, weights)
    with backends.use_backend(backend):
        assert backends.choose(OP, "cpu") == backend
        assert ops.use_fused(OP, "cpu")
        torch.testing.assert_close(ops.contribution_map(x, weights), expected, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(ops.contribution_map, (x, weights), fast_mode=True)
        assert torch.autograd.gradgradcheck(ops.contribution_map, (x, weights), fast_mode=True)
        torch.library.opcheck(ops.contribution_map, (x, weights))
