"""The e²KD loss is the official one in every regime, on every back end.

The official loss is ``1 − F.cosine_similarity(s, t)``: each norm clamped at ε = 1e-8 on its own,
the gradient that torch's autograd gives it. Each back end (reference, C++, Triton in the
interpreter) is checked against autograd of `e2kd_fast.reference.losses` and against central
differences, for norms from 1e-12 to 1e3, products ‖s‖‖t‖ below and above ε, all-zero maps, and
random shapes, magnitudes and dtypes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from e2kd_fast.ops import backends
from e2kd_fast.ops.distill_loss import FUSED_OP, distill_loss, distill_loss_fused
from e2kd_fast.reference import losses as reference

BACKENDS = backends.candidates(FUSED_OP, "cpu")  # reference, cpp (when built), triton (interpreter)
EPS = reference.COSINE_EPS
NORMS = [0.0, 1e-12, 3e-9, 2e-8, 1e-6, 1.0, 1e3]
TAU, LAM = 2.0, 5.0


def _maps_with_norms(s_norms, t_norms, shape=(6, 3, 2), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 maps [N, *shape] whose rows have exactly the given L2 norms (0 gives a zero map)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(s_norms)

    def rows(norms):
        x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        x = x / torch.linalg.vector_norm(x.flatten(1), dim=1).view(n, *[1] * len(shape))
        return x * torch.tensor(norms, dtype=torch.float64).view(n, *[1] * len(shape))

    return rows(s_norms), rows(t_norms)


def _logits(n: int, c: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, c, generator=gen, dtype=torch.float64) * 2 for _ in range(2))


def _grads(backend: str, zs, zt, es, et) -> tuple[torch.Tensor, ...]:
    """(loss, ∂loss/∂z_S, ∂loss/∂s) through the public function on ``backend``."""
    zs, es = zs.detach().requires_grad_(True), es.detach().requires_grad_(True)
    with backends.use_backend(backend):
        loss, _, _ = distill_loss(zs, zt, es, et, TAU, LAM)
    return (loss.detach(), *torch.autograd.grad(loss, (zs, es)))


def _autograd_of_reference(zs, zt, es, et) -> tuple[torch.Tensor, ...]:
    zs, es = zs.detach().requires_grad_(True), es.detach().requires_grad_(True)
    loss, _, _ = reference.distill_loss(zs, zt, es, et, TAU, LAM)
    return (loss.detach(), *torch.autograd.grad(loss, (zs, es)))


# Every pair of norms, one sample each: below, at and above the clamp, products on both sides of ε.
PAIRS = list(itertools.product(NORMS, NORMS))


def test_reference_is_the_official_cosine():
    """`explanation_cosine` is F.cosine_similarity with its defaults, value and gradient."""
    es, et = _maps_with_norms(*zip(*PAIRS, strict=True))
    es.requires_grad_(True)
    ours = reference.explanation_cosine(es, et)
    official = F.cosine_similarity(es.flatten(1), et.flatten(1))
    assert torch.equal(ours, official)
    assert torch.equal(*(torch.autograd.grad(c.sum(), es)[0] for c in (ours, official)))


def test_gradient_formula_is_autograd_of_the_reference():
    """`distill_loss_grads` (the double-backward path) equals autograd of `distill_loss` in every regime."""
    es, et = _maps_with_norms(*zip(*PAIRS, strict=True))
    zs, zt = _logits(len(PAIRS))
    _, g_logits, g_maps = _autograd_of_reference(zs, zt, es, et)
    f_logits, f_maps = reference.distill_loss_grads(zs, zt, es, et, TAU)
    torch.testing.assert_close(f_logits, g_logits, rtol=1e-12, atol=0)
    torch.testing.assert_close(LAM * f_maps, g_maps, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_equals_autograd_of_the_reference(backend):
    es, et = _maps_with_norms(*zip(*PAIRS, strict=True))
    zs, zt = _logits(len(PAIRS))
    got = _grads(backend, zs, zt, es, et)
    expected = _autograd_of_reference(zs, zt, es, et)
    for name, g, e in zip(("loss", "grad_logits", "grad_maps"), got, expected, strict=True):
        # Per sample, relative to that sample's largest gradient (they span 1e-3 to 1e16).
        scale = e.flatten(1).abs().amax(1).clamp_min(1e-300).view(-1, *[1] * (e.dim() - 1)) if e.dim() else 1.0
        torch.testing.assert_close(g / scale, e / scale, rtol=1e-10, atol=1e-12, msg=f"{backend} {name}")


def _central_difference(zs, zt, es, et, direction: torch.Tensor, h: float, on: str) -> float:
    """d/dh loss(x + h·v) at h = 0 by central differences, x the maps or the student logits."""

    def loss(sign: float) -> float:
        args = (zs, zt, es + sign * h * direction, et) if on == "maps" else (zs + sign * h * direction, zt, es, et)
        return reference.distill_loss(*args, TAU, LAM)[0].item()

    return (loss(1.0) - loss(-1.0)) / (2 * h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("s_norm", "t_norm"), PAIRS, ids=[f"s{s:g}-t{t:g}" for s, t in PAIRS])
def test_gradient_matches_central_differences(backend, s_norm, t_norm):
    """Where ‖s‖ ∉ (0, ε) torch's gradient is the derivative of the loss. Inside, torch's gradient
    (and so ours) differs from it by the term λ/N·cos·s/(ε‖s‖), of norm at most (‖s‖/ε)·λ/(N ε)."""
    es, et = _maps_with_norms([s_norm, 1.0], [t_norm, 0.5])
    zs, zt = _logits(2)
    _, g_logits, g_maps = _grads(backend, zs, zt, es, et)
    gen = torch.Generator().manual_seed(7)
    v_maps = torch.randn(es.shape, generator=gen, dtype=torch.float64)
    v_maps[1] = 0  # perturb the sample under test only, by far less than its distance to the clamp
    v_logits = torch.randn(zs.shape, generator=gen, dtype=torch.float64)
    # Below the clamp the loss is linear in s: any step that stays below it is exact; above, a
    # step relative to ‖s‖ keeps the truncation error O(1e-8).
    h_maps = (0.1 * (EPS - s_norm) if s_norm < EPS else 1e-4 * s_norm) / v_maps.norm().item()
    fd_maps = _central_difference(zs, zt, es, et, v_maps, h_maps, "maps")
    fd_logits = _central_difference(zs, zt, es, et, v_logits, 1e-5, "logits")
    assert (g_logits * v_logits).sum().item() == pytest.approx(fd_logits, rel=1e-6, abs=1e-9)
    analytic = (g_maps * v_maps).sum().item()
    scale = (g_maps.abs() * v_maps.abs()).sum().item()
    allowed = 1e-6 * scale + 1e-12
    if 0 < s_norm < EPS:
        allowed += (s_norm / EPS) * LAM / (2 * EPS) * v_maps.norm().item()
    assert abs(analytic - fd_maps) <= allowed, (analytic, fd_maps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_product_of_norms_below_the_clamp(backend):
    """‖s‖‖t‖ = 7.6e-9 < ε with both norms above it: no clamp applies, exactly as the official loss."""
    es, et = _maps_with_norms([7.6e-9 / 0.5, 1.0], [0.5, 1.0])
    zs, zt = _logits(2)
    with backends.use_backend(backend):
        _, _, exp = distill_loss(zs, zt, es, et, TAU, LAM)
    official = (1 - F.cosine_similarity(es.flatten(1), et.flatten(1))).mean()
    torch.testing.assert_close(exp, official, rtol=1e-13, atol=0)
    _, _, g_maps = _grads(backend, zs, zt, es, et)
    direction = torch.zeros_like(es)
    direction[0] = torch.randn(es[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fd = _central_difference(zs, zt, es, et, direction, 1e-4 * es[0].norm().item(), "maps")
    assert (g_maps * direction).sum().item() == pytest.approx(fd, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# hypothesis: shapes, magnitudes and dtypes; low precision within budgets set by the reference's own
# error in that dtype
# --------------------------------------------------------------------------------------------------

LOW_RANGE = {torch.float64: (-12, 3), torch.float32: (-12, 3), torch.bfloat16: (-12, 3), torch.float16: (-2, 2)}


@st.composite
def _problems(draw):
    dtype = draw(st.sampled_from(list(LOW_RANGE)))
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 9))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    lo, hi = LOW_RANGE[dtype]
    exponent = st.floats(lo, hi)
    s_norms = [10 ** draw(exponent) for _ in range(n)]
    t_norms = [10 ** draw(exponent) for _ in range(n)]
    # float16 cannot hold the ~1/ε gradients of an all-zero map (neither can the reference in it).
    zero = draw(st.sampled_from(["", "s", "t"])) if dtype != torch.float16 else ""
    if zero:
        (s_norms if zero == "s" else t_norms)[draw(st.integers(0, n - 1))] = 0.0
    seed = draw(st.integers(0, 2**16))
    return dtype, n, c, shape, s_norms, t_norms, seed


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item() if got.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(problem=_problems())
def test_random_problems_within_the_reference_error(backend, problem):
    dtype, n, c, shape, s_norms, t_norms, seed = problem
    es, et = _maps_with_norms(s_norms, t_norms, shape, seed)
    zs, zt = _logits(n, c, seed)
    args = [x.to(dtype) for x in (zs, zt, es, et)]
    # The float64 truth of the rounded inputs, and the reference's own error in this dtype.
    truth = reference.distill_loss(*(x.double() for x in args), TAU, LAM)
    truth_grads = reference.distill_loss_grads(*(x.double() for x in args), TAU)
    low = reference.distill_loss(*args, TAU, LAM)
    low_grads = reference.distill_loss_grads(*args, TAU)
    with backends.use_backend(backend):
        got = distill_loss_fused(*args, TAU, LAM)
    # The size of the map gradient's two terms, λ/N · 1/max(‖s‖, ε), before they cancel.
    s_norms64 = args[2].double().flatten(1).norm(dim=1).clamp_min(reference.COSINE_EPS)
    map_term_scale = (LAM / n / s_norms64).max().item()
    for name, g, lo, e in zip(
        ("loss", "kd", "exp", "grad_logits", "grad_maps"), got, (*low, *low_grads), (*truth, *truth_grads), strict=True
    ):
        assert g.shape == e.shape and g.dtype == lo.dtype, name
        assert torch.isfinite(g).all(), name
        # Rounding: a few ulps, in this dtype (at least 16 float64 ulps, where the float64 reference is the
        # truth itself), of the terms a kernel combines, which may cancel to a much smaller result (a
        # KD term, the exactly-0 gradient of a one-element map from two ~1/‖s‖ terms).
        terms = max(e.abs().max().item(), 1.0, LAM, map_term_scale if name == "grad_maps" else 0.0)
        floor = 4 * max(torch.finfo(dtype).eps, 16 * torch.finfo(torch.float64).eps) * terms
        assert _error(g, e) <= 2 * _error(lo, e) + floor, (name, dtype)
