"""``e2kd::distill_loss``: its kernels (``kernels/distill_loss.py``, ``csrc/{cpu,cuda}/distill_loss.*``)
against the reference, and the build that carries them.

On the CPU the C++ kernel runs directly and the Triton kernels in the interpreter (TRITON_INTERPRET=1,
set by `make test`); the CUDA kernels run in the `requires_cuda` tests only.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from e2kd_fast import _ext
from e2kd_fast.ops import backends
from e2kd_fast.ops.distill_loss import (
    FUSED_OP,
    OP,
    distill_loss,
    distill_loss_fused,
    distill_loss_fused_reference,
    distill_loss_op,
)
from e2kd_fast.reference import losses as reference_losses

KERNELS = [b for b in backends.candidates(FUSED_OP, "cpu") if b != "reference"]
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def _inputs(n: int, c: int, map_shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", zero: str = ""):
    gen = torch.Generator().manual_seed(n * 1000 + c)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).to(device=device, dtype=dtype)

    zs, zt, es, et = rand(n, c), rand(n, c), rand(n, *map_shape), rand(n, *map_shape)
    if "s" in zero:
        es.zero_()
    if "t" in zero:
        et.zero_()
    return zs, zt, es, et


def _poison(*like: torch.Tensor) -> None:
    """Fills freed memory of the outputs' sizes with NaN, so a kernel that leaves an output unwritten
    is caught (reliable with the CUDA caching allocator, best effort with the CPU's malloc)."""
    junk = [torch.full_like(t, float("nan")) for t in like for _ in range(2)]
    del junk


def _run(backend: str, args: tuple, fused: bool = True) -> tuple[torch.Tensor, ...]:
    zs, _, es, _ = args[:4]
    _poison(zs, es, zs.new_empty(()), zs.new_empty(()))
    with backends.use_backend(backend):
        return (distill_loss_fused if fused else distill_loss_op)(*args)


def _expected(args: tuple) -> tuple[torch.Tensor, ...]:
    """The reference in float64, on the CPU."""
    wide = [a.detach().cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
    return distill_loss_fused_reference(*wide)


CASES = {
    "odd": (3, 7, (6, 5, 7), ""),
    "one-sample": (1, 2, (1, 3, 1), ""),
    "zero-student-map": (3, 7, (6, 5, 7), "s"),
    "zero-teacher-map": (2, 5, (2, 3, 3), "t"),
    "both-zero": (2, 5, (2, 3, 3), "st"),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the float16 ε path, see below
def test_kernel_matches_the_reference(backend, dtype, case):
    n, c, shape, zero = CASES[case]
    args = (*_inputs(n, c, shape, dtype, zero=zero), 2.5, 0.7)
    got = _run(backend, args)
    expected = _expected(args)
    names = ("loss", "kd", "exp", "grad_logits", "grad_maps")
    for name, g, e, like in zip(names, got, expected, (args[0],) * 4 + (args[2],), strict=True):
        assert g.dtype == (like.dtype if name.startswith("grad") else args[0].dtype), name
        assert g.shape == e.shape and g.is_contiguous(), name
        if name == "grad_maps" and "s" in zero and dtype == torch.float16:
            continue  # ~1/ε: beyond float16's range (the float16 reference overflows too)
        # The eps path makes ∂exp/∂s huge (1/ε): compare it relatively.
        scale = e.abs().max().clamp_min(1.0) if name == "grad_maps" else 1.0
        torch.testing.assert_close(g.double() / scale, e / scale, **TOL[dtype], msg=f"{backend} {name}")
    forward_only = _run(backend, args, fused=False)
    for g, e in zip(forward_only, got[:3], strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_permuted_and_mixed_dtype_inputs(backend):
    """Channels-last maps (dense, permuted) and float32 logits with float16 maps."""
    zs, zt, es, et = _inputs(4, 9, (3, 4, 5), torch.float32)
    es, et = es.to(memory_format=torch.channels_last), et.to(memory_format=torch.channels_last)
    args = (zs, zt, es.half(), et.half(), 1.5, 2.0)
    got = _run(backend, args)
    expected = _expected(args)
    assert got[0].dtype == torch.float32 and got[4].dtype == torch.float16 and got[4].shape == es.shape
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, **TOL[torch.float16])


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
def test_public_function_uses_the_fused_op_and_its_backward_only_scales(backend, monkeypatch):
    zs, zt, es, et = _inputs(3, 7, (6, 5, 7), torch.float64)
    zs.requires_grad_(True)
    es.requires_grad_(True)
    with backends.use_backend(backend):
        with _OpLog() as log:
            loss, kd, exp = distill_loss(zs, zt, es, et, 2.0, 0.3)
        assert any("distill_loss_fused" in n for n in log.names)
        # First-order backward: no reference formula runs (the saved gradients are scaled).
        with monkeypatch.context() as m:
            m.setattr(
                reference_losses, "distill_loss_grads", lambda *a: pytest.fail("the backward recomputed the gradients")
            )
            grads = torch.autograd.grad(2 * loss + kd - exp, (zs, es))
        with _OpLog() as log:
            with torch.no_grad():
                distill_loss(zs, zt, es, et, 2.0, 0.3)
        assert not any("distill_loss_fused" in n for n in log.names)
    zs_r, es_r = zs.detach().requires_grad_(True), es.detach().requires_grad_(True)
    with backends.use_backend("reference"):
        loss_r, kd_r, exp_r = distill_loss_op(zs_r, zt, es_r, et, 2.0, 0.3)
        expected = torch.autograd.grad(2 * loss_r + kd_r - exp_r, (zs_r, es_r))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
def test_gradcheck_and_gradgradcheck_through_the_public_function(backend):
    zs, zt, es, et = _inputs(3, 5, (2, 3, 2), torch.float64)
    zs.requires_grad_(True)
    es.requires_grad_(True)

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return distill_loss(a, zt, b, et, 1.7, 0.6)

    fast = backend == "triton"  # the interpreter costs ~0.1 s per call
    with backends.use_backend(backend):
        assert torch.autograd.gradcheck(f, (zs, es), fast_mode=fast)
        assert torch.autograd.gradgradcheck(f, (zs, es), fast_mode=fast)


def test_bad_inputs_are_named():
    zs, zt, es, et = _inputs(3, 7, (2, 2), torch.float32)
    with pytest.raises(ValueError, match="e2kd::distill_loss: student and teacher maps differ"):
        distill_loss(zs, zt, es, et[:, :1], 1.0, 1.0)
    with pytest.raises(ValueError, match="must be \\[N, ...\\] with the logits' N = 3"):
        distill_loss(zs, zt, es[:2], et[:2], 1.0, 1.0)


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.choose(OP, "cpu") != "triton"


@pytest.mark.skipif("triton" not in KERNELS, reason="Triton back end not available on CPU tensors")
def test_triton_kernels_are_interpreted_on_cpu():
    from e2kd_fast.kernels import distill_loss as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(kernels._map_partials, InterpretedFunction)


def test_extension_is_built_with_cuda_wherever_nvcc_exists():
    """CI builds the extension with `make venv`: a C++ or CUDA source that does not compile fails here."""
    from torch.utils.cpp_extension import CUDA_HOME

    cfg = _ext.build_config()
    if "E2KD_SKIP" in str(cfg["reason"]) or os.environ.get("E2KD_DISABLE_EXT") == "1":
        pytest.skip(f"extension build switched off ({cfg['reason']})")
    if shutil.which("c++") or shutil.which("g++"):
        assert cfg["cpp"], cfg
        assert "cpp" in backends.candidates(OP, "cpu")
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if has_nvcc and torch.version.cuda is not None:
        assert cfg["cuda"], cfg


# --------------------------------------------------------------------------------------------------
# GPU: bfloat16 / float16 within twice the reference's own low-precision error
# --------------------------------------------------------------------------------------------------


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(16, 1000, (6, 64, 64)), (5, 7, (6, 5, 7)), (3, 100, (1, 224, 224))])
def test_cuda_kernels_low_precision_error_budget(dtype, shape):
    n, c, map_shape = shape
    args = (*_inputs(n, c, map_shape, dtype, device="cuda"), 3.0, 0.5)
    expected = _expected(args)
    with backends.use_backend("reference"):
        reference = distill_loss_fused(*args)
    kernels = [b for b in backends.candidates(FUSED_OP, "cuda") if b != "reference"]
    assert kernels, "no kernel back end of the loss runs on CUDA here"
    for backend in kernels:
        got = _run(backend, args)
        torch.cuda.synchronize()
        names = ("loss", "kd", "exp", "grad_logits", "grad_maps")
        for name, g, r, e in zip(names, got, reference, expected, strict=True):
            ref_err = (r.double().cpu() - e).abs().max().item()
            err = (g.double().cpu() - e).abs().max().item()
            floor = torch.finfo(dtype).eps * e.abs().max().item()  # the final rounding to the output dtype
            assert err <= 2 * ref_err + floor, f"{backend} {name}: {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_kernels_match_in_full_precision(dtype):
    args = (*_inputs(7, 1000, (6, 33, 35), dtype, device="cuda"), 2.0, 1.0)
    expected = _expected(args)
    for backend in [b for b in backends.candidates(FUSED_OP, "cuda") if b != "reference"]:
        got = _run(backend, args)
        for g, e in zip(got, expected, strict=True):
            scale = e.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.double().cpu() / scale, e / scale, **TOL[dtype], msg=backend)
