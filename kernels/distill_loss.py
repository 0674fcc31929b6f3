"""Triton kernels of ``e2kd::distill_loss``: the τ²-KL and cosine terms and their gradients.

Same contract as the C++/CUDA kernel (``csrc/cpu/distill_loss.cpp``): `distill_loss_triton` returns
``(loss, kd, exp, grad_logits, grad_maps)`` where the two gradients are ∂kd/∂z_S and ∂exp/∂s (unit
upstream gradients), or None when ``with_grad`` is false. Four launches, no atomics:

1. ``_map_partials``: grid (row blocks, chunks); each program reads a [BLOCK_N, chunk] tile of s and
   t once, in BLOCK_D steps, and stores (s·t, ‖s‖², ‖t‖²) per row and chunk;
2. ``_kd_rows``: grid (row blocks,); online max/sum over the classes, then KL and ∂kd/∂z_S;
3. ``_finalize``: one program: per-sample cosines, the gradient coefficients (α_i, β_i), the three
   scalars;
4. ``_map_grad`` (with_grad): same grid as 1, writes α_i t + β_i s.

Loads are upcast to the accumulation dtype ``ACC`` right after ``tl.load`` (float64 stays float64),
which also sidesteps the interpreter's broken bfloat16 arithmetic. Scalars (1/τ, τ/N, ε, ...) travel
in a small tensor of the accumulation dtype, since Python floats and float constexprs would reach
the kernel as float32. On CUDA the tiles are one row wide and chunked along the map; on CPU tensors
(``TRITON_INTERPRET=1``, tests only) the tiles cover many rows and the whole map, so a call is a
handful of interpreted programs.

Imports without Triton; the kernels exist only when Triton imports.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; the back end then reports itself unavailable
    triton = None

if triton is not None:

    @triton.jit
    def _map_partials(
        s_ptr,
        t_ptr,
        part_ptr,
        N,
        D,
        CHUNK,
        chunks,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(1)
        row_ok = rows < N
        base = rows.to(tl.int64) * D
        lo = chunk * CHUNK
        hi = tl.minimum(lo + CHUNK, D)
        zero = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
        dot, ss, tt = zero, zero, zero
        for k in range(lo, hi, BLOCK_D):
            cols = k + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < hi)[None, :]
            offs = base[:, None] + cols[None, :]
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
            dot += s * t
            ss += s * s
            tt += t * t
        out = part_ptr + (rows.to(tl.int64) * chunks + chunk) * 3
        tl.store(out, tl.sum(dot, axis=1), mask=row_ok)
        tl.store(out + 1, tl.sum(ss, axis=1), mask=row_ok)
        tl.store(out + 2, tl.sum(tt, axis=1), mask=row_ok)

    @triton.jit
    def _map_grad(
        s_ptr,
        t_ptr,
        coef_ptr,
        g_ptr,
        N,
        D,
        CHUNK,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(1)
        row_ok = rows < N
        base = rows.to(tl.int64) * D
        lo = chunk * CHUNK
        hi = tl.minimum(lo + CHUNK, D)
        alpha = tl.load(coef_ptr + rows * 2, mask=row_ok, other=0.0)
        beta = tl.load(coef_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
        for k in range(lo, hi, BLOCK_D):
            cols = k + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < hi)[None, :]
            offs = base[:, None] + cols[None, :]
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = alpha[:, None] * t + beta[:, None] * s
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kd_rows(
        zs_ptr,
        zt_ptr,
        param_ptr,
        kl_ptr,
        grad_ptr,
        N,
        C,
        WITH_GRAD: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        base = rows.to(tl.int64) * C
        inv_tau = tl.load(param_ptr)
        scale = tl.load(param_ptr + 1)  # τ / N
        zero = tl.zeros((BLOCK_R,), dtype=ACC)
        m_s, m_t = zero - float("inf"), zero - float("inf")
        l_s, l_t = zero, zero
        # Pass 1: online max and Σ exp(x − max) of both rows (padded rows read zeros: finite).
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            offs = base[:, None] + cols[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            a = tl.load(zs_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_tau
            b = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_tau
            a = tl.where(col_ok[None, :], a, float("-inf"))
            b = tl.where(col_ok[None, :], b, float("-inf"))
            new_s = tl.maximum(m_s, tl.max(a, axis=1))
            new_t = tl.maximum(m_t, tl.max(b, axis=1))
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(a - new_s[:, None]), axis=1)
            l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(b - new_t[:, None]), axis=1)
            m_s, m_t = new_s, new_t
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        # Pass 2: KL(p_t ‖ p_s) and, with_grad, τ (p_s − p_t) / N.
        kl = zero
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            offs = base[:, None] + cols[None, :]
            mask = row_ok[:, None] & (cols < C)[None, :]
            log_ps = tl.load(zs_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_tau - lse_s[:, None]
            log_pt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_tau - lse_t[:, None]
            p_t = tl.exp(log_pt)
            kl += tl.sum(tl.where(mask, p_t * (log_pt - log_ps), 0.0), axis=1)
            if WITH_GRAD:
                g = scale * (tl.exp(log_ps) - p_t)
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(kl_ptr + rows, kl, mask=row_ok)

    @triton.jit
    def _finalize(
        part_ptr,
        kl_ptr,
        param_ptr,
        coef_ptr,
        loss_ptr,
        kd_ptr,
        exp_ptr,
        N,
        chunks,
        BLOCK_R: tl.constexpr,
        ACC: tl.constexpr,
    ):
        kd_scale = tl.load(param_ptr)  # τ² / N
        lam = tl.load(param_ptr + 1)
        inv_n = tl.load(param_ptr + 2)
        eps = tl.load(param_ptr + 3)  # a float constexpr would be rounded to float32
        zero = tl.zeros((BLOCK_R,), dtype=ACC)
        exp_acc, kl_acc = zero, zero
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < N
            dot, ss, tt = zero, zero, zero
            for c in range(0, chunks):
                p = part_ptr + (rows.to(tl.int64) * chunks + c) * 3
                dot += tl.load(p, mask=row_ok, other=0.0)
                ss += tl.load(p + 1, mask=row_ok, other=0.0)
                tt += tl.load(p + 2, mask=row_ok, other=0.0)
            s_norm = tl.sqrt(ss)
            a = tl.maximum(s_norm, eps)  # each norm clamped on its own (F.cosine_similarity)
            b = tl.maximum(tl.sqrt(tt), eps)
            cos = dot / a / b
            exp_acc += tl.where(row_ok, 1.0 - cos, 0.0)
            kl_acc += tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
            tl.store(coef_ptr + rows * 2, -inv_n / a / b, mask=row_ok)
            # s/‖s‖ is 0 at s = 0 (vector_norm's backward); the divisor is kept nonzero for the masked lane.
            beta = tl.where(s_norm > 0, cos * inv_n / a / tl.where(s_norm > 0, s_norm, 1.0), 0.0)
            tl.store(coef_ptr + rows * 2 + 1, beta, mask=row_ok)
        kd = tl.sum(kl_acc, axis=0) * kd_scale
        exp = tl.sum(exp_acc, axis=0) * inv_n
        tl.store(loss_ptr, (kd + lam * exp).to(loss_ptr.dtype.element_ty))
        tl.store(kd_ptr, kd.to(kd_ptr.dtype.element_ty))
        tl.store(exp_ptr, exp.to(exp_ptr.dtype.element_ty))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def distill_loss_triton(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_maps: Tensor,
    teacher_maps: Tensor,
    tau: float,
    lam: float,
    eps: float,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(loss, kd, exp, ∂kd/∂z_S or None, ∂exp/∂s or None) for logits [N, C] and maps [N, ...].

    ``eps`` is the cosine's clamp of each norm (`e2kd_fast.reference.losses.COSINE_EPS`).

    loss/kd/exp are 0-dim in the logits' dtype; the gradients are contiguous, in the dtype and
    shape of the student logits and maps.
    """
    if triton is None:
        raise RuntimeError("e2kd_fast.kernels.distill_loss: triton is not importable")
    n, c = student_logits.shape
    zs, zt = student_logits.contiguous(), teacher_logits.contiguous()
    es, et = student_maps.contiguous(), teacher_maps.contiguous()
    d = es.numel() // n
    fp64 = zs.dtype == torch.float64 or es.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    acc_tl = tl.float64 if fp64 else tl.float32
    dev = zs.device
    on_cpu = dev.type == "cpu"  # the interpreter: few, large programs

    # Maps: tiles of BLOCK_N rows × BLOCK_D columns, CHUNK columns per program.
    if on_cpu:
        block_d = min(_pow2(max(d, 1)), 4096)
        block_n = max(1, min(_pow2(n), 65536 // block_d))
        chunk = max(1, triton.cdiv(d, block_d)) * block_d
    else:
        block_d = 4096 if es.element_size() <= 2 else 2048
        block_n = 1
        chunk = 4 * block_d
    chunks = max(1, triton.cdiv(d, chunk))
    grid_maps = (triton.cdiv(n, block_n), chunks)
    warps = {} if on_cpu else {"num_warps": 8}
    partial = torch.empty((n, chunks, 3), dtype=acc, device=dev)
    tiles = {"BLOCK_N": block_n, "BLOCK_D": block_d, "ACC": acc_tl, **warps}
    _map_partials[grid_maps](es, et, partial, n, d, chunk, chunks, **tiles)

    # Logits.
    block_c = min(_pow2(c), 4096)
    block_r = max(1, min(_pow2(n), 16384 // block_c)) if on_cpu else 1
    kl = torch.empty(n, dtype=acc, device=dev)
    grad_logits = torch.empty_like(zs) if with_grad else None
    params = torch.tensor([1.0 / tau, tau / n, tau * tau / n, lam, 1.0 / n, eps], dtype=acc, device=dev)
    _kd_rows[(triton.cdiv(n, block_r),)](
        zs,
        zt,
        params,
        kl,
        grad_logits if with_grad else kl,
        n,
        c,
        WITH_GRAD=with_grad,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ACC=acc_tl,
        **({} if on_cpu else {"num_warps": 4}),
    )

    coef = torch.empty((n, 2), dtype=acc, device=dev)
    loss, kd, exp = (torch.empty((), dtype=zs.dtype, device=dev) for _ in range(3))
    _finalize[(1,)](
        partial,
        kl,
        params[2:],
        coef,
        loss,
        kd,
        exp,
        n,
        chunks,
        BLOCK_R=min(_pow2(n), 1024),
        ACC=acc_tl,
    )
    grad_maps = None
    if with_grad:
        grad_maps = torch.empty_like(es)
        _map_grad[grid_maps](es, et, coef, grad_maps, n, d, chunk, **tiles)
    return loss, kd, exp, grad_logits, grad_maps
