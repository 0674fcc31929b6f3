"""The one-pass Triton forward of ``e2kd::distill_loss`` (``kernels/distill_loss.py``, ``one-pass``).

In the interpreter (TRITON_INTERPRET=1) against the float64 reference, value and gradients, with map
tiles that give several chunks per sample and several samples per row block, so that the
per-row-block combine and the last-arrival sum both run; and against the split kernels, which
add the same partials. The memory ordering between concurrent programs needs a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from e2kd_fast.ops import backends
from e2kd_fast.ops.distill_loss import distill_loss
from e2kd_fast.reference import losses as reference

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)

TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
# (N, C, map shape, zeroed maps, (rows, columns, chunk) per map program or None for the launcher's)
CASES = {
    "chunks-and-row-blocks": (5, 7, (3, 5, 7), "", (2, 16, 32)),
    "one-column-steps": (4, 9, (1, 33, 1), "", (1, 8, 8)),
    "one-element-maps": (1, 2, (1, 1, 1), "", (1, 1, 1)),
    "launcher-tiles": (3, 11, (2, 4, 4), "", None),
    "zero-student-map": (3, 7, (6, 5, 7), "s", (1, 64, 128)),
    "zero-teacher-map": (2, 5, (2, 3, 3), "t", (2, 4, 8)),
}


def _inputs(n: int, c: int, shape: tuple[int, ...], dtype: torch.dtype, zero: str = "") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7 * n + c)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * 3).to(dtype)

    zs, zt, es, et = rand(n, c), rand(n, c), rand(n, *shape), rand(n, *shape)
    if "s" in zero:
        es.zero_()
    if "t" in zero:
        et.zero_()
    return zs, zt, es, et


def _kernel(args: tuple, with_grad: bool, kernel: str, tiles) -> tuple:
    from e2kd_fast.kernels.distill_loss import distill_loss_triton

    return distill_loss_triton(*args, 2.5, 0.7, reference.COSINE_EPS, with_grad, kernel, map_tiles=tiles)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 at a zero student map: ~1/ε
def test_one_pass_matches_the_reference_and_the_split_kernels(dtype, case):
    n, c, shape, zero, tiles = CASES[case]
    args = _inputs(n, c, shape, dtype, zero)
    got = _kernel(args, True, "one-pass", tiles)
    wide = [a.double() for a in args]
    loss, kd, exp = reference.distill_loss(*wide, 2.5, 0.7)
    grad_logits, grad_maps = reference.distill_loss_grads(*wide, 2.5)
    for name, g, e in zip(
        ("loss", "kd", "exp", "grad_logits", "grad_maps"), got, (loss, kd, exp, grad_logits, grad_maps), strict=True
    ):
        assert g.dtype == dtype and g.shape == e.shape, name
        if name == "grad_maps" and "s" in zero and dtype == torch.float16:
            continue  # beyond float16's range, as the float16 reference's
        scale = e.abs().max().clamp_min(1.0) if name == "grad_maps" else 1.0
        torch.testing.assert_close(g.double() / scale, e / scale, **TOL[dtype], msg=name)
    # The forward without gradients gives the same scalars; the split kernels add the same partials.
    forward = _kernel(args, False, "one-pass", tiles)
    split = _kernel(args, True, "split", tiles)
    assert forward[3] is None and forward[4] is None
    for g, f, s in zip(got[:3], forward[:3], split[:3], strict=True):
        torch.testing.assert_close(f, g, rtol=0, atol=0)
        torch.testing.assert_close(s.double(), g.double(), **TOL[dtype])
    torch.testing.assert_close(got[4], split[4], equal_nan=True, **TOL[dtype])


def test_the_environment_chooses_the_kernel_of_the_op(monkeypatch):
    """``E2KD_TRITON_LOSS=one-pass`` routes the triton back end's op through it; autograd agrees."""
    monkeypatch.setenv("E2KD_TRITON_LOSS", "one-pass")
    zs, zt, es, et = _inputs(3, 7, (2, 5, 4), torch.float64)
    results = []
    for backend in ("triton", "reference"):
        s, m = zs.clone().requires_grad_(True), es.clone().requires_grad_(True)
        with backends.use_backend(backend):
            loss, _, _ = distill_loss(s, zt, m, et, 2.0, 5.0)
        results.append((loss.detach(), *torch.autograd.grad(loss, (s, m))))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **TOL[torch.float64])


def test_an_unknown_kernel_is_named(monkeypatch):
    from e2kd_fast.kernels.distill_loss import loss_kernel_choice

    monkeypatch.setenv("E2KD_TRITON_LOSS", "fast")
    with pytest.raises(ValueError, match="E2KD_TRITON_LOSS='fast'; expected one of split, one-pass"):
        loss_kernel_choice()
    with pytest.raises(ValueError, match="kernel='x'"):
        loss_kernel_choice("x")
    monkeypatch.delenv("E2KD_TRITON_LOSS")
    assert loss_kernel_choice() == "split"
