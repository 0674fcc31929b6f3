"""``e2kd::bcos_conv2d``, ``e2kd::patch_norm``, ``e2kd::scaled_conv_adjoint``,
``e2kd::box_sum`` and ``e2kd::avg_pool_adjoint``: their kernels
(``kernels/bcos_conv2d.py``, ``csrc/{cpu,cuda}/bcos_conv2d.*``) and the ops under every back end against
the reference maths, and the layers that route through them.

Triton runs under the interpreter on CPU (fp32/fp16; CI sets TRITON_INTERPRET=1), the C++ kernels
natively (fp32/fp64). Outputs written by a launcher are poisoned with NaN before each run, so an
element a kernel forgets stays NaN. GPU tests compare bf16/fp16 against float64 with a budget of
twice the reference's own low-precision error.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from e2kd_fast import ops
from e2kd_fast.ops import backends
from e2kd_fast.ops._common import empty_like_format, memory_format_of
from e2kd_fast.ops.bcos_conv2d import pooling_as_ops, reads_producer_sums
from e2kd_fast.reference.bcos import bcos_conv2d_parts, channel_sums_of_squares, dynamic_scale, unit_norm_weight
from e2kd_fast.reference.bcos import patch_norm as patch_norm_reference

# The fast back ends of the layer ops on CPU tensors here: Triton under TRITON_INTERPRET=1, C++ when
# the loaded extension has the B-cos kernels (`backends` checks both).
FAST_BACKENDS = [b for b in backends.candidates("e2kd::bcos_conv2d", "cpu") if b != "reference"]
needs_interpreter = pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="needs triton and TRITON_INTERPRET=1")
needs_cpp = pytest.mark.skipif(
    "cpp" not in FAST_BACKENDS,
    reason=backends.unavailable_reason("cpp") or "the loaded extension was built without csrc/*/bcos_conv2d.*",
)

# (N, C, H, W, O, k, stride, padding, groups, B): odd images, strides, paddings, groups, exponents.
GEOMETRIES = [
    (2, 3, 5, 7, 4, 3, 1, 1, 1, 2.0),
    (1, 4, 7, 5, 6, 3, 2, 0, 2, 1.5),
    (2, 6, 9, 8, 5, 7, 2, 3, 1, 2.5),
    (2, 8, 5, 7, 8, 1, 2, 0, 4, 2.0),
    (1, 2, 5, 7, 3, 1, 1, 0, 1, 2.0),
]
LAYOUTS = ["nchw", "channels_last"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _case(geometry, dtype=torch.float64, layout="nchw"):
    """(x, l, expected scale, expected norm) in float64 (expected) and ``dtype`` (inputs)."""
    n, c, h, w, o, k, s, p, g, b = geometry
    gen = torch.Generator().manual_seed(hash(geometry) % 2**31)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c // g, k, k, generator=gen, dtype=torch.float64)
    lin = F.conv2d(x, unit_norm_weight(weight), None, s, p, 1, g)
    norm = patch_norm_reference(x, k, s, p, g, o if g > 1 else None)
    scale = dynamic_scale(lin, norm, b)
    return _layout(x.to(dtype), layout), _layout(lin.to(dtype), layout), scale, norm, weight


def _low_precision_budget(geometry, dtype, expected: torch.Tensor) -> float:
    """Twice the reference's own error in ``dtype`` (vs float64), plus a floor for tiny cases."""
    n, c, h, w, o, k, s, p, g, b = geometry
    x, lin, _, _, _ = _case(geometry, dtype)
    ref = dynamic_scale(lin, patch_norm_reference(x, k, s, p, g, o if g > 1 else None), b)
    return 2 * (ref.double() - expected).abs().max().item() + 1e-3


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype, budget: float | None = None) -> None:
    assert not got.isnan().any(), "an output element was not written (still NaN)"
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        err = (got.double() - expected).abs().max().item()
        assert err <= budget, f"{dtype}: max error {err:.3g} > budget {budget:.3g}"


# ---------------------------------------------------------------------------------------------- Triton


@needs_interpreter
def test_triton_kernels_run_in_the_interpreter():
    from e2kd_fast.kernels import bcos_conv2d as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._epilogue_kernel, InterpretedFunction)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_triton_epilogue_matches_reference(geometry, dtype, layout):
    from e2kd_fast.kernels import bcos_conv2d as kernels

    n, c, h, w, o, k, s, p, g, b = geometry
    x, lin, scale, _, _ = _case(geometry, dtype, layout)
    out = torch.full_like(lin, float("nan"))  # poisoned
    y = torch.full_like(lin, float("nan"))
    kernels._launch_epilogue(lin, x, out, y, [k, k], [s, s], [p, p], g, o // g, b)
    budget = _low_precision_budget(geometry, dtype, scale) if dtype == torch.float16 else None
    _assert_close(out, scale, dtype, budget)
    _assert_close(y, scale * lin.double(), dtype, None if budget is None else budget * 8)
    # The public launcher keeps the memory format.
    _, s_only = kernels.bcos_conv2d_epilogue(lin, x, [k, k], [s, s], [p, p], g, b, write_out=False)
    assert s_only.is_contiguous(memory_format=memory_format_of(lin))


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_triton_patch_norm_and_product(geometry, layout):
    from e2kd_fast.kernels import bcos_conv2d as kernels

    n, c, h, w, o, k, s, p, g, b = geometry
    x, lin, scale, norm, _ = _case(geometry, torch.float32, layout)
    channels = o if g > 1 else 1
    out = _layout(torch.full((n, channels, *lin.shape[-2:]), float("nan")), layout)
    kernels._launch_epilogue(None, x, out, None, [k, k], [s, s], [p, p], g, channels // g, 2.0)
    _assert_close(out, norm, torch.float32)
    gsig = torch.randn(lin.shape)
    _assert_close(kernels.scale_product(lin, gsig), lin.double() * gsig.double(), torch.float32)


# ---------------------------------------------------------------------------------------------- Triton implicit GEMM

# (N, C, H, W, O, k, stride, padding, B), groups = 1: the stem's 7×7, strided 3×3 and 1×1, and maps that
# reach 2×2 and 1×1 (the late layers of a small input).
GEMM_GEOMETRIES = [
    (2, 3, 5, 7, 4, 3, 1, 1, 2.0),
    (2, 6, 9, 8, 5, 7, 2, 3, 2.5),
    (2, 8, 5, 7, 8, 1, 2, 0, 2.0),
    (1, 5, 4, 3, 6, 3, 2, 1, 1.5),
    (2, 4, 2, 2, 5, 3, 2, 1, 2.0),
    (1, 4, 1, 1, 3, 1, 1, 0, 2.0),
]


def _gemm_case(geometry, dtype, layout):
    n, c, h, w, o, k, s, p, b = geometry
    x, lin, scale, norm, weight = _case((n, c, h, w, o, k, s, p, 1, b), dtype, layout)
    return x, lin, scale, norm, unit_norm_weight(weight)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", GEMM_GEOMETRIES, ids=str)
def test_triton_implicit_gemm_conv_matches_reference(geometry, dtype, layout):
    """l and s from one launch, against float64; fp16 within twice the reference's own error."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    n, c, h, w, o, k, s, p, b = geometry
    x, lin, scale, _, w_hat = _gemm_case(geometry, dtype, layout)
    got_lin, got_scale = kernels.bcos_conv2d_gemm(x, w_hat, b, [s, s], [p, p])
    assert got_lin.dtype == got_scale.dtype == dtype
    assert got_scale.stride() == got_lin.stride() == empty_like_format(x, lin.shape).stride()  # as the fake
    budgets = [None, None]
    if dtype == torch.float16:  # the reference layer's own error in fp16, weights rounded too
        from e2kd_fast.reference.bcos import bcos_conv2d_parts

        low = bcos_conv2d_parts(x, w_hat.to(dtype), b, 1, [s, s], [p, p], 1, 1)
        budgets = [
            2 * (a.double() - e).abs().max().item() + 1e-3 for a, e in zip(low, (lin.double(), scale), strict=True)
        ]
    _assert_close(got_lin, lin.double(), dtype, budgets[0])
    _assert_close(got_scale, scale, dtype, budgets[1])


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("geometry", GEMM_GEOMETRIES, ids=str)
def test_triton_implicit_gemm_adjoint_and_its_backward_match_reference(geometry, dtype, layout):
    """conv2dᵀ(s ⊙ g, ŵ) with the product in the prologue, for a full and a one-channel scale, and
    the backward's (s ⊙ d, g ⊙ d) from one conv."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    from e2kd_fast.reference.bcos import scaled_conv_adjoint

    n, c, h, w, o, k, s, p, b = geometry
    _, lin, _, _, w_hat = _gemm_case(geometry, torch.float64, layout)
    gen = torch.Generator().manual_seed(5)
    g = _layout(torch.randn(lin.shape, generator=gen, dtype=torch.float64), layout)
    for scale in (torch.rand(lin.shape, generator=gen, dtype=torch.float64), torch.rand(n, 1, *lin.shape[-2:])):
        expected = scaled_conv_adjoint(g, scale.double(), w_hat, [h, w], [s, s], [p, p])
        got = kernels.scaled_conv_adjoint_gemm(g.to(dtype), scale.to(dtype), w_hat, [h, w], [s, s], [p, p])
        assert got.shape == (n, c, h, w) and got.is_contiguous(memory_format=memory_format_of(g))
        _assert_close(got, expected, dtype)
        grad = _layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64), layout)
        # The backward's (s ⊙ d, g ⊙ d) are the reference adjoint's gradients for g and s (the second
        # summed over the channels where s is one channel, as autograd does for a broadcast).
        inputs = (g.clone().requires_grad_(), scale.double().requires_grad_())
        adjoint = scaled_conv_adjoint(*inputs, w_hat, [h, w], [s, s], [p, p])
        grad_g, grad_scale = torch.autograd.grad(adjoint, inputs, grad)
        first, second = kernels.conv2d_product(grad.to(dtype), w_hat, [s, s], [p, p], scale.to(dtype), g.to(dtype))
        _assert_close(first, grad_g, dtype)
        _assert_close(second.double().sum_to_size(grad_scale.shape), grad_scale, dtype)


@needs_interpreter
@pytest.mark.parametrize("geometry", [(2, 6, 9, 8, 7, 2, 3), (1, 3, 4, 5, 3, 1, 1), (2, 2, 1, 1, 1, 1, 0)], ids=str)
def test_triton_separable_box_sum_is_the_patch_norm(geometry):
    """Rows, then columns (with the sqrt) of a one-channel Σx² map, in any strides."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    n, c, h, w, k, s, p = geometry
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    sums = channel_sums_of_squares(x)
    for q in (sums, sums.contiguous(memory_format=torch.channels_last), sums.transpose(2, 3).contiguous().mT):
        got = kernels.patch_norm_from_sums(q, [k, k], [s, s], [p, p])
        torch.testing.assert_close(got, patch_norm_reference(x, k, s, p, 1, None), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one channel"):
        kernels.patch_norm_from_sums(torch.ones(1, 2, 3, 3), [1, 1], [1, 1], [0, 0])


def test_conv_kernel_choice_names_the_variable_and_the_choices(monkeypatch):
    pytest.importorskip("triton")
    from e2kd_fast.kernels import bcos_conv2d as kernels

    monkeypatch.delenv("E2KD_TRITON_CONV", raising=False)
    assert kernels.conv_kernel_choice() == "cudnn-epilogue"
    monkeypatch.setenv("E2KD_TRITON_CONV", " Implicit-GEMM ")
    assert kernels.conv_kernel_choice() == "implicit-gemm"
    monkeypatch.setenv("E2KD_TRITON_CONV", "winograd")
    with pytest.raises(ValueError, match="E2KD_TRITON_CONV='winograd'; expected one of cudnn-epilogue, implicit-gemm"):
        kernels.conv_kernel_choice()


@needs_interpreter
def test_ops_route_through_the_implicit_gemm_kernels_and_differentiate(monkeypatch):
    """With ``E2KD_TRITON_CONV=implicit-gemm`` the ops call the GEMM launchers on channels_last inputs
    (grouped convs and NCHW inputs keep the cuDNN epilogue); gradients equal the reference's; the
    adjoint's first-order eager backward comes from `conv2d_product`, a double backward or a
    compiled one from torch ops."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    calls: dict[str, int] = {}
    for name in ("bcos_conv2d_gemm", "scaled_conv_adjoint_gemm", "conv2d_product", "bcos_conv2d_epilogue"):
        original = getattr(kernels, name)

        def spy(*args, original=original, name=name, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    monkeypatch.setenv("E2KD_TRITON_CONV", "implicit-gemm")
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return _layout(t, "channels_last").requires_grad_()

    x, w = rand(2, 3, 6, 5), rand(4, 3, 3, 3)
    g, scale, w_hat = rand(2, 4, 3, 3), rand(2, 1, 3, 3), rand(4, 3, 3, 3)
    adjoint_args = ([6, 5], [2, 2], [1, 1], [1, 1], 1)
    with backends.use_backend("reference"):
        expected = ops.bcos_conv2d(x, w, 2.0, [2, 2], [1, 1], 1)
        expected_adjoint = ops.scaled_conv_adjoint(g, scale, w_hat, *adjoint_args)
        expected_grads = torch.autograd.grad(expected_adjoint.square().sum(), (g, scale, w_hat))
    with backends.use_backend("triton"):
        got = ops.bcos_conv2d(x, w, 2.0, [2, 2], [1, 1], 1)
        assert calls == {"bcos_conv2d_gemm": 1}
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        ops.bcos_conv2d(x, rand(6, 1, 3, 3), 2.0, [1, 1], [1, 1], 3)  # grouped: the cuDNN epilogue
        ops.bcos_conv2d(x.detach().contiguous(), w, 2.0, [2, 2], [1, 1], 1)  # NCHW: likewise
        assert calls["bcos_conv2d_epilogue"] == 2
        adjoint = ops.scaled_conv_adjoint(g, scale, w_hat, *adjoint_args)
        assert calls["scaled_conv_adjoint_gemm"] == 1
        torch.testing.assert_close(adjoint, expected_adjoint, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(adjoint.square().sum(), (g, scale, w_hat))
        assert calls["conv2d_product"] == 1
        for a, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *t: ops.bcos_conv2d(*t, 2.0, [2, 2], [1, 1], 1), (x, w), fast_mode=True)
        assert torch.autograd.gradgradcheck(
            lambda *t: ops.scaled_conv_adjoint(*t, *adjoint_args), (g, scale, w_hat), fast_mode=True
        )
        torch._dynamo.reset()
        compiled = torch.compile(lambda *t: ops.scaled_conv_adjoint(*t, *adjoint_args), backend="aot_eager")
        grads = torch.autograd.grad(compiled(g, scale, w_hat).square().sum(), (g, scale, w_hat))
        for a, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_layer_hands_the_implicit_gemm_the_sums_of_squares(monkeypatch):
    """With the implicit GEMM chosen, `BcosConv2d` computes Σ_c x² in torch (under torch.compile
    Inductor fuses it into the kernel that makes x) and the op reads it instead of x; the layer's
    values and gradients equal the reference layer's, eager and compiled."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    from e2kd_fast.nn import BcosConv2d

    handed = []
    original = kernels.bcos_conv2d_gemm

    def spy(x, weight, b, stride, padding, sums=None):
        handed.append(sums)
        return original(x, weight, b, stride, padding, sums)

    monkeypatch.setattr(kernels, "bcos_conv2d_gemm", spy)
    monkeypatch.setenv("E2KD_TRITON_CONV", "implicit-gemm")
    layer = BcosConv2d(4, 6, 3, stride=2, padding=1).double()
    x = _layout(torch.randn(2, 4, 7, 5, dtype=torch.float64), "channels_last").requires_grad_()
    params = (x, layer.linear.weight)
    with backends.use_backend("reference"):
        expected = layer(x)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
    with backends.use_backend("triton"):
        assert reads_producer_sums("cpu")
        got = layer(x)
        grads = torch.autograd.grad(got.square().sum(), params)
        assert len(handed) == 1 and handed[0] is not None and handed[0].shape == (2, 1, 7, 5)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        got_compiled = compiled(x)
        grads_compiled = torch.autograd.grad(got_compiled.square().sum(), params)
    for a, e in zip((got, *grads), (expected, *expected_grads), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    for a, e in zip((got_compiled, *grads_compiled), (expected, *expected_grads), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("E2KD_TRITON_CONV", "cudnn-epilogue")
    with backends.use_backend("triton"):
        assert not reads_producer_sums("cpu")


def test_conv_design_comes_from_the_variable_then_from_autos_record(monkeypatch):
    pytest.importorskip("triton")
    from e2kd_fast.ops.bcos_conv2d import _conv_kernel

    def recorded(op_name, device_type, shape_class):
        return "implicit-gemm" if shape_class == "k3x3-s1x1" else None

    monkeypatch.delenv("E2KD_TRITON_CONV", raising=False)
    monkeypatch.setattr(backends, "recorded_variant", recorded)
    assert _conv_kernel("e2kd::bcos_conv2d", "cuda", "k3x3-s1x1") == "implicit-gemm"
    assert _conv_kernel("e2kd::bcos_conv2d", "cuda", "k1x1-s1x1") == "cudnn-epilogue"
    monkeypatch.setenv("E2KD_TRITON_CONV", "cudnn-epilogue")
    assert _conv_kernel("e2kd::bcos_conv2d", "cuda", "k3x3-s1x1") == "cudnn-epilogue"
    monkeypatch.delenv("E2KD_TRITON_CONV")
    monkeypatch.setattr(backends, "recorded_variant", lambda *args: "implicit_gemm")
    with pytest.raises(ValueError, match=r"fastest.json: the record for e2kd::bcos_conv2d on cuda \(k1x1-s1x1\)"):
        _conv_kernel("e2kd::bcos_conv2d", "cuda", "k1x1-s1x1")


def test_sums_of_the_wrong_shape_are_refused_and_a_bf16_layer_takes_fp32_sums():
    """The kernels index the sums map as [N, groups, H, W]: anything else is a clear error. A bf16
    layer with fp32 sums (what `BcosConv2d` hands over) keeps bf16 outputs, and its backward runs."""
    x = torch.randn(2, 4, 6, 5, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"sums must be .* shape \(2, 1, 6, 5\) .* got \(2, 1, 3, 3\)"):
        ops.bcos_conv2d(x, w, 2.0, [1, 1], [1, 1], 1, torch.ones(2, 1, 3, 3))
    with backends.use_backend("reference"):
        sums = channel_sums_of_squares(x.float())
        linear, scale = ops.bcos_conv2d(x, w.to(torch.bfloat16), 2.0, [1, 1], [1, 1], 1, sums)
        assert linear.dtype == scale.dtype == torch.bfloat16
        grad_x, grad_w = torch.autograd.grad((scale * linear).float().square().sum(), (x, w))
        expected = ops.bcos_conv2d(x, w.to(torch.bfloat16), 2.0, [1, 1], [1, 1], 1)
        expected_grads = torch.autograd.grad((expected[0] * expected[1]).float().square().sum(), (x, w))
    assert grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    for got, want in zip((scale, grad_x, grad_w), (expected[1], *expected_grads), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------- C++


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_cpp_epilogue_and_patch_norm_match_reference(geometry, dtype, layout):
    n, c, h, w, o, k, s, p, g, b = geometry
    x, lin, scale, norm, _ = _case(geometry, dtype, layout)
    # Best-effort poisoning: freed NaN blocks of the output size are what the allocator hands out next.
    poison = [torch.full_like(lin, float("nan")) for _ in range(4)]
    del poison
    got_scale, got_out = torch.ops.e2kd_cpp.bcos_conv2d_epilogue(lin, x, [k, k], [s, s], [p, p], g, b, True)
    _assert_close(got_scale, scale, dtype)
    _assert_close(got_out, scale * lin.double(), dtype)
    assert got_scale.is_contiguous(memory_format=memory_format_of(x))
    got_norm = torch.ops.e2kd_cpp.bcos_conv2d_patch_norm(x, [k, k], [s, s], [p, p], g, o)
    _assert_close(got_norm, norm, dtype)


@needs_cpp
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)])
def test_cpp_rejects_bad_input_with_a_clear_error(device):
    # The error arrives as a Python exception only when the extension shares torch's C++ types
    # (setup.py builds it for torch's C++ standard).
    if device not in backends.cpp_device_types():
        pytest.skip(f"the extension was built without {device} kernels")
    x = torch.randn(1, 3, 5, 5, device=device)
    with pytest.raises(RuntimeError, match="groups=2 must divide the 3 input channels"):
        torch.ops.e2kd_cpp.bcos_conv2d_patch_norm(x, [3, 3], [1, 1], [1, 1], 2, 4)
    lin = torch.randn(1, 2, 5, 5, device=device)
    with pytest.raises(RuntimeError, match="b must be > 1"):
        torch.ops.e2kd_cpp.bcos_conv2d_epilogue(lin, x, [3, 3], [1, 1], [1, 1], 1, 1.0, False)


# ---------------------------------------------------------------------------------------------- the ops, per back end


def _op_cases():
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [
        ("e2kd::bcos_conv2d", ops.bcos_conv2d, (rand(1, 2, 5, 4), rand(3, 2, 3, 3), 2.0, [2, 2], [1, 1], 1)),
        ("e2kd::bcos_conv2d", ops.bcos_conv2d, (rand(1, 4, 4, 3), rand(4, 2, 1, 1), 1.5, [1, 1], [0, 0], 2)),
        ("e2kd::patch_norm", ops.patch_norm, (rand(1, 2, 5, 4), [3, 3], [1, 1], [1, 1], 1, 3)),
        (
            "e2kd::scaled_conv_adjoint",
            ops.scaled_conv_adjoint,
            (rand(1, 3, 3, 2), rand(1, 3, 3, 2), rand(3, 2, 3, 3), [5, 4], [2, 2], [1, 1], [1, 1], 1),
        ),
    ]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_ops_with_each_backend_forced_match_and_differentiate(backend):
    for name, op, args in _op_cases():
        if backend not in backends.candidates(name, "cpu"):
            continue
        with backends.use_backend("reference"):
            expected = op(*args)
        with backends.use_backend(backend):
            assert backends.choose(name, "cpu") == backend
            got = op(*args)
            for a, e in zip(
                got if isinstance(got, tuple) else (got,),
                expected if isinstance(expected, tuple) else (expected,),
                strict=True,
            ):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
            tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

            def f(*ts, args=args, tensors=tensors, op=op):
                full = list(args)
                for i, t in zip(tensors, ts, strict=True):
                    full[i] = t
                return op(*full)

            inputs = tuple(args[i] for i in tensors)
            assert torch.autograd.gradcheck(f, inputs, fast_mode=True), name
            assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True), name
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_bcos_conv2d_op_in_channels_last_passes_opcheck(backend):
    x = torch.randn(1, 4, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with backends.use_backend(backend):
        linear, scale = ops.bcos_conv2d(x, w, 2.0, [2, 2], [1, 1], 1)
        assert linear.is_contiguous(memory_format=torch.channels_last)
        assert scale.is_contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(ops.bcos_conv2d, (x, w, 2.0, [2, 2], [1, 1], 1))


# ---------------------------------------------------------------------------------------------- layers


@needs_cpp
def test_a_kernel_missing_from_the_extension_routes_ops_and_layers_to_the_reference(monkeypatch):
    """An extension built before a kernel existed: `backends` drops cpp for that op, so the op and
    `use_fused` agree on the reference (no per-op fallback in the implementations)."""
    key = ("e2kd::bcos_conv2d", "cpp")
    monkeypatch.setitem(backends._IMPLS, key, dataclasses.replace(backends._IMPLS[key], available=lambda: False))
    with backends.use_backend("cpp"):
        assert "cpp" not in backends.candidates("e2kd::bcos_conv2d", "cpu")
        assert backends.choose("e2kd::bcos_conv2d", "cpu") == "reference"
        assert not ops.use_fused("e2kd::bcos_conv2d", "cpu")
        assert backends.choose("e2kd::patch_norm", "cpu") == "cpp"


@needs_cpp
def test_layers_follow_the_record_of_their_shape_class(monkeypatch):
    """``auto`` with a record for strided 3×3 convs only: that layer runs the fast op, a 1×1 the
    inline reference maths."""
    from e2kd_fast.nn import BcosConv2d

    table = {"e2kd::bcos_conv2d@cpu": "reference", "e2kd::bcos_conv2d@cpu@k3x3-s2x2": "cpp"}
    monkeypatch.delenv("E2KD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_fastest_table", lambda: table)
    key = ("e2kd::bcos_conv2d", "cpp")
    calls = []
    impl = backends._IMPLS[key]

    def spy(*args, fn=impl.fn):
        calls.append(args[3])
        return fn(*args)

    monkeypatch.setitem(backends._IMPLS, key, dataclasses.replace(impl, fn=spy))
    strided, pointwise = BcosConv2d(4, 6, 3, stride=2, padding=1).double(), BcosConv2d(4, 6, 1).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    with backends.use_backend("auto"):
        assert strided.fused_parts(x) is not None and pointwise.fused_parts(x) is None
        strided(x), pointwise(x)
    assert calls == [[2, 2], [2, 2]]


@needs_interpreter
def test_auto_never_routes_to_the_interpreter_even_when_recorded_fastest(monkeypatch):
    monkeypatch.setattr(backends, "_fastest_table", lambda: {"e2kd::bcos_conv2d@cpu": "triton"})
    with backends.use_backend("auto"):
        assert backends.choose("e2kd::bcos_conv2d", "cpu") != "triton"
    with backends.use_backend("triton"):
        assert ops.use_fused("e2kd::bcos_conv2d", "cpu")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_layer_routes_through_the_fast_op_and_compiles_in_one_graph(backend):
    from e2kd_fast.nn import BcosConv2d

    layer = BcosConv2d(4, 6, 3, stride=2, padding=1).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64, requires_grad=True)
    with backends.use_backend("reference"):
        expected = layer(x)
        (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    with backends.use_backend(backend):
        assert ops.use_fused("e2kd::bcos_conv2d", "cpu")
        got = layer(x)
        (gx,) = torch.autograd.grad(got.sum(), x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


def test_cpu_layers_pool_through_the_ops_outside_autocast(monkeypatch):
    """On the CPU a layer's inline patch norm takes its box sum from ``e2kd::box_sum`` (its backward
    ``e2kd::avg_pool_adjoint``), with the reference's values and first and second derivatives, eager
    and traced; a 1×1 window with stride 1, autocast and CUDA keep the reference's pooling."""
    from e2kd_fast.nn import BcosConv2d

    conv_ops = importlib.import_module("e2kd_fast.ops.bcos_conv2d")  # the module, not its op of that name
    assert pooling_as_ops("cpu") and not pooling_as_ops("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pooling_as_ops("cpu")

    windows, adjoints = [], []
    box_sum, adjoint = conv_ops.box_sum, conv_ops.avg_pool_adjoint
    monkeypatch.setattr(conv_ops, "box_sum", lambda *args: windows.append(args[1:]) or box_sum(*args))
    monkeypatch.setattr(conv_ops, "avg_pool_adjoint", lambda *args: adjoints.append(args[2:]) or adjoint(*args))
    torch.manual_seed(0)
    layers = [
        BcosConv2d(4, 6, 3, stride=2, padding=1, b=2.5),
        BcosConv2d(4, 6, 1, stride=2, groups=2),
        BcosConv2d(4, 6, 3, padding=1),
        BcosConv2d(4, 6, 1),
    ]
    for layer in layers:
        layer = layer.double()
        x = torch.randn(2, 4, 7, 5, dtype=torch.float64, requires_grad=True)
        weight = layer.linear.weight
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        linear, scale = bcos_conv2d_parts(x, weight, layer.b, 1, *geometry)
        expected = scale * linear
        truth = torch.autograd.grad(expected.square().sum(), (x, weight))
        with backends.use_backend("reference"):
            assert layer.fused_parts(x) is None
            for run in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
                got = run(x)
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
                grads = torch.autograd.grad(got.square().sum(), (x, weight))
                torch.testing.assert_close(grads, truth, rtol=1e-10, atol=1e-12)

            def f(x, w, layer=layer):
                return torch.func.functional_call(layer, {"linear.weight": w}, (x,))

            inputs = (x, weight.detach().requires_grad_())
            assert torch.autograd.gradcheck(f, inputs) and torch.autograd.gradgradcheck(f, inputs)
        torch._dynamo.reset()
    pooled = {((3, 3), (2, 2), (1, 1)), ((1, 1), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1))}
    assert {(tuple(k), tuple(s), tuple(p)) for k, s, p in windows} == pooled
    assert {(tuple(k), tuple(s), tuple(p)) for k, s, p in adjoints} == pooled  # the box sums' backwards
    windows.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        BcosConv2d(4, 6, 3, stride=2, padding=1)(torch.randn(1, 4, 5, 5))
    assert windows == []


def test_compiled_cpu_graphs_hold_the_pooling_ops_and_no_pooling_of_their_own():
    """What the pooling ops are for: the graphs Inductor would lower for a strided and a stride-1
    layer, forward and backward, call ``e2kd::box_sum`` and ``e2kd::avg_pool_adjoint`` and hold no
    ATen pooling."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from e2kd_fast.nn import BcosConv2d

    graphs = []

    def keep(graph, example_inputs):
        graphs.append({node.target for node in graph.graph.nodes if node.op == "call_function"})
        return make_boxed_func(graph.forward)

    model = torch.nn.Sequential(BcosConv2d(4, 6, 3, stride=2, padding=1), BcosConv2d(6, 6, 3, padding=1))
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    torch._dynamo.reset()
    with backends.use_backend("reference"):
        compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
        compiled(x).square().sum().backward()
    torch._dynamo.reset()
    forward, backward = graphs
    aten = torch.ops.aten
    assert torch.ops.e2kd.box_sum.default in forward and torch.ops.e2kd.avg_pool_adjoint.default in backward
    assert not (forward | backward) & {aten.avg_pool2d.default, aten.avg_pool2d_backward.default}


def test_the_sweeps_average_pool_adjoint_is_the_op_on_the_cpu(monkeypatch):
    """A B-cos DenseNet's stem and transitions: the sweep's adjoint of each average pool runs
    ``e2kd::avg_pool_adjoint`` on the CPU, and the explanation equals autograd's."""
    from e2kd_fast.explain.sweep import dynamic_weights_sweep
    from e2kd_fast.models.bcos_densenet import BcosDenseNet
    from e2kd_fast.reference.explain import dynamic_weights_autograd

    conv_ops = importlib.import_module("e2kd_fast.ops.bcos_conv2d")
    sizes = []
    adjoint = conv_ops.avg_pool_adjoint
    monkeypatch.setattr(conv_ops, "avg_pool_adjoint", lambda *args: sizes.append(args[1]) or adjoint(*args))
    torch.manual_seed(0)
    model = BcosDenseNet(8, (2, 1, 1, 1), 16, num_classes=3).double().eval()
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)
    expected = dynamic_weights_autograd(model, x)  # its backward runs the box sums' adjoints too
    sizes.clear()
    with backends.use_backend("reference"):
        got = dynamic_weights_sweep(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert sizes == [[2, 2], [4, 4], [8, 8], [16, 16]]  # the transitions' inputs, the last first, and the stem pool's


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_sweep_with_each_backend_equals_autograd_and_calls_only_fused_ops(backend, monkeypatch):
    """The sweep routes its patch norms and adjoints like the layers: through the registered op where
    a fast back end runs it, else as the reference maths inline (which Inductor fuses)."""
    from e2kd_fast.explain.sweep import dynamic_weights_sweep
    from e2kd_fast.models.bcos_resnet import BasicBlock, BcosResNet
    from e2kd_fast.reference.explain import dynamic_weights_autograd

    called = set()
    for name in ("patch_norm", "scaled_conv_adjoint"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op, _name=name: called.add(_name) or _op(*args))
    torch.manual_seed(0)
    model = BcosResNet(BasicBlock, [1, 1, 1], num_classes=3, in_chans=6, inplanes=4, small_inputs=True).double().eval()
    x = torch.rand(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    expected = dynamic_weights_autograd(model, x)
    with backends.use_backend(backend):
        got = dynamic_weights_sweep(model, x)
        fused = {name for name in ("patch_norm", "scaled_conv_adjoint") if ops.use_fused(f"e2kd::{name}", "cpu")}
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert called <= fused
    assert ("scaled_conv_adjoint" in called) == ("scaled_conv_adjoint" in fused)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "triton-implicit-gemm", "cpp"])
def test_gpu_epilogue_in_low_precision(backend, dtype, layout, monkeypatch):
    if backend == "cpp" and "cpp" not in backends.candidates("e2kd::bcos_conv2d", "cuda"):
        pytest.skip("the extension was built without CUDA")
    if backend == "triton-implicit-gemm":
        backend = "triton"
        monkeypatch.setenv("E2KD_TRITON_CONV", "implicit-gemm")
    for geometry in GEOMETRIES:
        n, c, h, w, o, k, s, p, g, b = geometry
        x, lin, scale, _, weight = _case(geometry, dtype, layout)
        x, weight = x.cuda(), weight.cuda().to(dtype)
        ref_x = x.double()
        ref_lin = F.conv2d(ref_x, unit_norm_weight(weight.double()), None, s, p, 1, g)
        ref_scale = dynamic_scale(ref_lin, patch_norm_reference(ref_x, k, s, p, g, o if g > 1 else None), b)
        with backends.use_backend("reference"):
            low_lin, low_scale = ops.bcos_conv2d(x, weight, b, [s, s], [p, p], g)
        with backends.use_backend(backend):
            got_lin, got_scale = ops.bcos_conv2d(x, weight, b, [s, s], [p, p], g)
        assert got_scale.is_contiguous(memory_format=memory_format_of(x))
        for got, low, ref in ((got_scale, low_scale, ref_scale), (got_lin, low_lin, ref_lin)):
            ref_err = (low.double() - ref).abs().max().item()
            err = (got.double() - ref).abs().max().item()
            assert err <= 2 * ref_err + 1e-6, f"{geometry}: {err:.3g} > 2 × {ref_err:.3g}"
