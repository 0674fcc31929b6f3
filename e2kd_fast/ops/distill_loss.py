"""The e²KD loss as registered ops: ``e2kd::distill_loss`` and its gradient-emitting twin.

The maths is `e2kd_fast.reference.losses`: ``distill_loss`` (loss = τ²·KL + λ·(1 − cos), the cosine
of ``F.cosine_similarity`` with each norm clamped at ε = 1e-8) and ``distill_loss_grads`` (the
gradients torch's autograd gives that forward). Every back end computes those two; this module
adds the op contracts, the autograd wiring and the kernels' dispatch. In the kernels' terms, for
sample i with a = max(‖s_i‖, ε), b = max(‖t_i‖, ε):

    ∂kd/∂z_S  = τ (p_S^τ − p_T^τ) / N
    ∂exp/∂s_i = α_i t_i + β_i s_i,   α_i = −1 / (N a b),   β_i = cos_i / (N a ‖s_i‖)  (0 where s_i = 0)

The teacher's logits and maps are targets: no gradient flows to them (the teacher is frozen in e²KD).

Two ops, one public function
----------------------------
- ``e2kd::distill_loss(zs, zt, es, et, τ, λ) -> (loss, kd, exp)``: the forward alone (evaluation,
  no-grad code). Its backward recomputes the gradients from the saved inputs in plain torch ops.
- ``e2kd::distill_loss_fused(...) -> (loss, kd, exp, grad_logits, grad_maps)``: the same forward that
  also emits ∂kd/∂z_S and ∂exp/∂s (unit upstream gradients) from the same kernel call. Its backward
  only scales them: ∂L/∂z_S = (ḡ_loss + ḡ_kd)·grad_logits, ∂L/∂s = (λ ḡ_loss + ḡ_exp)·grad_maps. No
  softmax or norm is recomputed and the teacher map is not read again for the backward.
- `distill_loss` (the public function) calls the fused op when autograd will need the student
  gradients (grad mode on and a student input requiring grad), the forward-only op otherwise.

Double backward (the design choice)
-----------------------------------
The saved gradients are constants to autograd (``mark_non_differentiable``): a product with them
has the right value but no second derivative. So the fused op's backward checks whether it is
itself being recorded (``torch.is_grad_enabled()`` inside a backward is true exactly under
``create_graph=True``) and then computes the gradients with the reference formula in plain,
differentiable torch ops from the saved inputs instead (`reference.losses.distill_loss_grads`).
First-order backwards (training) take the fast path; ``gradgradcheck`` and any ``create_graph``
use take the formula, which is itself differentiable to any order (`torch.compile` traces a
first-order backward through the scaling path too). The price is that the fused op saves its
four inputs, as the forward-only op does, plus the two gradients: one map-sized buffer more.

Back ends
---------
Each op's forward runs the implementation `e2kd_fast.ops.backends` picks (``E2KD_BACKEND`` or
``use_backend``): ``reference`` (below), ``cpp`` (``csrc/cpu/distill_loss.cpp`` and
``csrc/cuda/distill_loss.cu``, op ``e2kd_cpp::distill_loss``) or ``triton``
(``kernels/distill_loss.py``, imported on first use so the package does not import Triton). All
return the scalars in the logits' dtype and contiguous gradients of the student tensors' dtype
and shape; the kernels accumulate in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._registry import register_op_test
from e2kd_fast.reference import losses as reference

OP = "e2kd::distill_loss"
FUSED_OP = "e2kd::distill_loss_fused"


def _check(student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor) -> None:
    where = "e2kd::distill_loss"
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"{where}: logits must both be [N, C]; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(
            f"{where}: student and teacher maps differ in shape: {tuple(student_maps.shape)} vs "
            f"{tuple(teacher_maps.shape)}"
        )
    if student_maps.dim() < 1 or student_maps.shape[0] != student_logits.shape[0] or student_logits.shape[0] == 0:
        raise ValueError(
            f"{where}: maps {tuple(student_maps.shape)} must be [N, ...] with the logits' "
            f"N = {student_logits.shape[0]} > 0"
        )


# --------------------------------------------------------------------------------------------------
# e2kd::distill_loss: the forward alone
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op(OP, mutates_args=())
def distill_loss_op(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, exp) for logits [N, C] and explanation maps [N, ...] (flattened per sample)."""
    _check(student_logits, teacher_logits, student_maps, teacher_maps)
    impl = backends.implementation(OP, student_logits.device.type)
    return impl(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)


@backends.register(OP, "reference", ("cpu", "cuda"))
def distill_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference forward of `distill_loss` (the spec every kernel is tested against)."""
    return reference.distill_loss(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)


@distill_loss_op.register_fake
def _(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam):
    _check(student_logits, teacher_logits, student_maps, teacher_maps)
    return tuple(student_logits.new_empty(()) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    student_logits, teacher_logits, student_maps, teacher_maps, tau, lam = inputs
    ctx.save_for_backward(student_logits, teacher_logits, student_maps, teacher_maps)
    ctx.tau, ctx.lam = tau, lam


def _formula_backward(ctx, grad_loss: Tensor, grad_kd: Tensor, grad_exp: Tensor) -> tuple:
    """Gradients from the saved inputs (plain torch ops, so differentiable again)."""
    student_logits, teacher_logits, student_maps, teacher_maps = ctx.saved_tensors[:4]
    # The outputs are loss = kd + λ·exp, kd and exp: their gradients combine per term.
    g_kd, g_exp = grad_loss + grad_kd, ctx.lam * grad_loss + grad_exp
    grad_logits, grad_maps = reference.distill_loss_grads(
        student_logits, teacher_logits, student_maps, teacher_maps, ctx.tau
    )
    return g_kd * grad_logits, None, g_exp * grad_maps, None, None, None


distill_loss_op.register_autograd(_formula_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# e2kd::distill_loss_fused: the forward that also emits the student gradients
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op(FUSED_OP, mutates_args=())
def distill_loss_fused(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, kd, exp, ∂kd/∂z_S [N, C], ∂exp/∂s [shape of the maps]); the gradients are contiguous."""
    _check(student_logits, teacher_logits, student_maps, teacher_maps)
    impl = backends.implementation(FUSED_OP, student_logits.device.type)
    return impl(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)


@backends.register(FUSED_OP, "reference", ("cpu", "cuda"))
def distill_loss_fused_reference(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference of `distill_loss_fused`: the reference forward and gradient formula."""
    loss, kd, exp = reference.distill_loss(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)
    grads = reference.distill_loss_grads(student_logits, teacher_logits, student_maps, teacher_maps, tau)
    return loss, kd, exp, grads[0].contiguous(), grads[1].contiguous()


@distill_loss_fused.register_fake
def _(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam):
    _check(student_logits, teacher_logits, student_maps, teacher_maps)
    scalars = tuple(student_logits.new_empty(()) for _ in range(3))
    return (*scalars, student_logits.new_empty(student_logits.shape), student_maps.new_empty(student_maps.shape))


def _fused_setup_context(ctx, inputs, output) -> None:
    student_logits, teacher_logits, student_maps, teacher_maps, tau, lam = inputs
    grad_logits, grad_maps = output[3], output[4]
    # Internal outputs: constants to autograd (the backward below handles second order itself).
    ctx.mark_non_differentiable(grad_logits, grad_maps)
    ctx.save_for_backward(student_logits, teacher_logits, student_maps, teacher_maps, grad_logits, grad_maps)
    ctx.tau, ctx.lam = tau, lam


def _fused_backward(ctx, grad_loss: Tensor, grad_kd: Tensor, grad_exp: Tensor, _g_logits=None, _g_maps=None) -> tuple:
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradients have no second derivative; use the formula.
        return _formula_backward(ctx, grad_loss, grad_kd, grad_exp)
    grad_logits, grad_maps = ctx.saved_tensors[4:]
    g_kd, g_exp = grad_loss + grad_kd, ctx.lam * grad_loss + grad_exp
    return (g_kd * grad_logits).to(grad_logits.dtype), None, (g_exp * grad_maps).to(grad_maps.dtype), None, None, None


distill_loss_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# --------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The e²KD loss: (loss, kd, exp), each 0-dim in the logits' dtype.

    Args:
        student_logits: [N, C].
        teacher_logits: [N, C] (a target: receives no gradient).
        student_maps: [N, ...] student explanations, flattened per sample for the cosine.
        teacher_maps: same shape (a target).
        tau: temperature τ > 0.
        lam: weight λ of the explanation term in ``loss``.

    When autograd will need the student gradients, the gradient-emitting op runs (its backward
    only scales the gradients it produced); otherwise the forward-only op.
    """
    if torch.is_grad_enabled() and (student_logits.requires_grad or student_maps.requires_grad):
        loss, kd, exp, _, _ = distill_loss_fused(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)
        return loss, kd, exp
    return distill_loss_op(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)


# --------------------------------------------------------------------------------------------------
# Kernel back ends (each called only when `backends` found it available)
# --------------------------------------------------------------------------------------------------


_cpp_current = functools.partial(backends.cpp_op_current, "distill_loss", "eps")


@backends.register(OP, "cpp", backends.cpp_device_types(), available=_cpp_current)
def _cpp(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor, tau: float, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    loss, kd, exp, _, _ = torch.ops.e2kd_cpp.distill_loss(zs, zt, es, et, tau, lam, reference.COSINE_EPS, False)
    return loss, kd, exp


@backends.register(FUSED_OP, "cpp", backends.cpp_device_types(), available=_cpp_current)
def _cpp_fused(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor, tau: float, lam: float) -> tuple[Tensor, ...]:
    return tuple(torch.ops.e2kd_cpp.distill_loss(zs, zt, es, et, tau, lam, reference.COSINE_EPS, True))


@backends.register(OP, "triton", ("cuda",))
def _triton(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor, tau: float, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    from e2kd_fast.kernels.distill_loss import distill_loss_triton

    loss, kd, exp, _, _ = distill_loss_triton(zs, zt, es, et, tau, lam, reference.COSINE_EPS, with_grad=False)
    return loss, kd, exp


@backends.register(FUSED_OP, "triton", ("cuda",))
def _triton_fused(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor, tau: float, lam: float) -> tuple[Tensor, ...]:
    from e2kd_fast.kernels.distill_loss import distill_loss_triton

    return distill_loss_triton(zs, zt, es, et, tau, lam, reference.COSINE_EPS, with_grad=True)


# --------------------------------------------------------------------------------------------------
# Checks: every registered op has sample inputs (tests/test_opcheck.py)
# --------------------------------------------------------------------------------------------------


def _sample_inputs(dtype: torch.dtype = torch.float64) -> list[tuple]:
    """Inputs for opcheck / gradcheck: student tensors require grad, teacher tensors do not."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    return [
        (rand(4, 5, grad=True), rand(4, 5), rand(4, 6, 3, 3, grad=True), rand(4, 6, 3, 3), 1.0, 1.0),
        (rand(3, 7, grad=True), rand(3, 7), rand(3, 1, 5, 4, grad=True), rand(3, 1, 5, 4), 4.0, 0.2),
        (rand(1, 2, grad=True), rand(1, 2), rand(1, 2, grad=True), rand(1, 2), 0.5, 5.0),
    ]


register_op_test(distill_loss_op, _sample_inputs, reference.distill_loss)
register_op_test(distill_loss_fused, _sample_inputs, reference.distill_loss, reference.distill_loss_grads)
