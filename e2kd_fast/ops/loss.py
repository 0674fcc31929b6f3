"""``e2kd::distill_loss``: the τ²-KL and explanation-cosine terms of e²KD as one registered op.

    kd  = τ² · (1/N) Σ_i KL(p_T,i^τ ‖ p_S,i^τ)
    exp = (1/N) Σ_i (1 − cos(s_i, t_i))          (s, t: flattened student and teacher maps)
    loss = kd + λ · exp

Gradients (derived by hand; the backward is plain torch ops, so it is itself differentiable):

    ∂loss/∂z_S = τ · (p_S^τ − p_T^τ) / N
    ∂loss/∂s_i = −(λ / N) · ( t_i / (‖s_i‖‖t_i‖) − cos_i · s_i / ‖s_i‖² )

The teacher's logits and maps are targets: the op returns no gradient for them (the teacher is
frozen in e²KD). The CPU implementation is the reference; fused Triton/C++ kernels will register
as implementations of the same op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from e2kd_fast.ops import backends
from e2kd_fast.ops._registry import register_op_test

_EPS = 1e-8  # F.cosine_similarity's eps: the product of the norms is clamped below by it


def _norms(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s_norm, t_norm = s.norm(dim=1), t.norm(dim=1)
    denom = (s_norm * t_norm).clamp_min(_EPS)
    return s_norm, denom, (s * t).sum(1) / denom


@torch.library.custom_op("e2kd::distill_loss", mutates_args=())
def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd, exp) for logits [N, C] and explanation maps [N, ...] (flattened per sample)."""
    impl = backends.implementation("e2kd::distill_loss", student_logits.device.type)
    return impl(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam)


@backends.register("e2kd::distill_loss", "reference", ("cpu", "cuda"))
def distill_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, student_maps: Tensor, teacher_maps: Tensor, tau: float, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference forward of `distill_loss` (the spec every kernel is tested against)."""
    n = student_logits.shape[0]
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * (tau**2 / n)
    _, _, cos = _norms(student_maps.reshape(n, -1), teacher_maps.reshape(n, -1))
    exp = (1 - cos).mean()
    return kd + lam * exp, kd, exp


@distill_loss.register_fake
def _(student_logits, teacher_logits, student_maps, teacher_maps, tau, lam):
    scalar = student_logits.new_empty(())
    return scalar, scalar.new_empty(()), scalar.new_empty(())


def _setup_context(ctx, inputs, output) -> None:
    student_logits, teacher_logits, student_maps, teacher_maps, tau, lam = inputs
    ctx.save_for_backward(student_logits, teacher_logits, student_maps, teacher_maps)
    ctx.tau, ctx.lam = tau, lam


def _backward(ctx, grad_loss: Tensor, grad_kd: Tensor, grad_exp: Tensor):
    student_logits, teacher_logits, student_maps, teacher_maps = ctx.saved_tensors
    tau, lam = ctx.tau, ctx.lam
    n = student_logits.shape[0]
    # The outputs are loss = kd + λ·exp, kd and exp: their gradients combine per term.
    g_kd, g_exp = grad_loss + grad_kd, lam * grad_loss + grad_exp
    p_s = F.softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    grad_logits = g_kd * tau * (p_s - p_t) / n
    s, t = student_maps.reshape(n, -1), teacher_maps.reshape(n, -1)
    s_norm, denom, cos = _norms(s, t)
    grad_s = t / denom[:, None] - cos[:, None] * s / s_norm.square().clamp_min(_EPS)[:, None]
    grad_maps = (-g_exp / n) * grad_s
    return grad_logits, None, grad_maps.reshape(student_maps.shape), None, None, None


distill_loss.register_autograd(_backward, setup_context=_setup_context)


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


register_op_test(distill_loss, _sample_inputs)
