"""Triton kernels of ``e2kd::distill_loss``: the τ²-KL and cosine terms and their gradients.

Same contract as the C++/CUDA kernel (``csrc/cpu/distill_loss.cpp``): `distill_loss_triton` returns
``(loss, kd, exp, grad_logits, grad_maps)`` where the two gradients are ∂kd/∂z_S and ∂exp/∂s (unit
upstream gradients), or None when ``with_grad`` is false. Two versions of the forward, chosen by
``kernel=`` or ``E2KD_TRITON_LOSS`` (`loss_kernel_choice`); both end with the same gradient write.

``split`` (the default; the version measured on an H100): four launches, no atomics,

1. ``_map_partials``: grid (row blocks, chunks); each program reads a [BLOCK_N, chunk] tile of s and
   t once, in BLOCK_D steps, and stores (s·t, ‖s‖², ‖t‖²) per row and chunk;
2. ``_kd_rows``: grid (row blocks,); online max/sum over the classes, then KL and ∂kd/∂z_S;
3. ``_finalize``: one program: per-sample cosines, the gradient coefficients (α_i, β_i), the three
   scalars;
4. ``_map_grad`` (with_grad): same grid as 1, writes α_i t + β_i s.

``one-pass``: 1–3 in one launch, ``_one_pass``, with row blocks × chunks map programs and the
logit programs side by side. Each map program stores its partials and counts itself in at its row
block's counter (an acquire-release atomic after a barrier); the last chunk of a row block to
arrive adds the block's partials in chunk order and stores 1 − cos_i and (α_i, β_i). Those, and
every logit program, count in at one global counter, and the last arrival sums the loss
(``_arrive``). The counters start at zero (one ``torch.zeros``); every sum keeps a fixed order, so
the result is deterministic and does not depend on which program finishes last. Then 4 as above.

Loads are upcast to the accumulation dtype ``ACC`` right after ``tl.load`` (float64 stays float64),
which also sidesteps the interpreter's broken bfloat16 arithmetic. Scalars (1/τ, τ/N, ε, ...) travel
in a small tensor of the accumulation dtype, since Python floats and float constexprs would reach
the kernel as float32. On CUDA the tiles are one row wide and chunked along the map; on CPU tensors
(``TRITON_INTERPRET=1``, tests only) the tiles cover many rows and the whole map, so a call is a
handful of interpreted programs (``map_tiles`` overrides that). The interpreter runs the programs
one after another, so it checks the arithmetic and the counting, not the memory ordering between
concurrent programs: that needs a GPU.

Imports without Triton; the kernels exist only when Triton imports.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; the back end then reports itself unavailable
    triton = None

if triton is not None:

    @triton.jit
    def _map_rows(s_ptr, t_ptr, base, row_ok, lo, hi, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """(s·t, ‖s‖², ‖t‖²) per row over the columns [lo, hi) of BLOCK_N rows starting at ``base``."""
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
        return tl.sum(dot, axis=1), tl.sum(ss, axis=1), tl.sum(tt, axis=1)

    @triton.jit
    def _cosine_terms(dot, ss, tt, inv_n, eps):
        """cos_i and the gradient coefficients α_i, β_i from a sample's three sums."""
        s_norm = tl.sqrt(ss)
        a = tl.maximum(s_norm, eps)  # each norm clamped on its own (F.cosine_similarity)
        b = tl.maximum(tl.sqrt(tt), eps)
        cos = dot / a / b
        # s/‖s‖ is 0 at s = 0 (vector_norm's backward); the divisor is kept nonzero for the masked lane.
        beta = tl.where(s_norm > 0, cos * inv_n / a / tl.where(s_norm > 0, s_norm, 1.0), 0.0)
        return cos, -inv_n / a / b, beta

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
        dot, ss, tt = _map_rows(s_ptr, t_ptr, base, row_ok, lo, hi, BLOCK_N, BLOCK_D, ACC)
        out = part_ptr + (rows.to(tl.int64) * chunks + chunk) * 3
        tl.store(out, dot, mask=row_ok)
        tl.store(out + 1, ss, mask=row_ok)
        tl.store(out + 2, tt, mask=row_ok)

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
    def _kd_block(
        zs_ptr,
        zt_ptr,
        param_ptr,
        kl_ptr,
        grad_ptr,
        rows,
        N,
        C,
        WITH_GRAD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """KL(p_t ‖ p_s) of the logit rows ``rows`` into kl_ptr and, WITH_GRAD, τ (p_s − p_t) / N into grad_ptr."""
        row_ok = rows < N
        base = rows.to(tl.int64) * C
        inv_tau = tl.load(param_ptr)
        scale = tl.load(param_ptr + 1)  # τ / N
        zero = tl.zeros(rows.shape, dtype=ACC)
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
        _kd_block(zs_ptr, zt_ptr, param_ptr, kl_ptr, grad_ptr, rows, N, C, WITH_GRAD, BLOCK_C, ACC)

    @triton.jit
    def _store_totals(kl_acc, exp_acc, kd_scale, lam, inv_n, loss_ptr, kd_ptr, exp_ptr):
        """Sums the per-row KL and ``1 - cos`` partials into the loss and its two terms."""
        kd = tl.sum(kl_acc, axis=0) * kd_scale
        exp = tl.sum(exp_acc, axis=0) * inv_n
        tl.store(loss_ptr, (kd + lam * exp).to(loss_ptr.dtype.element_ty))
        tl.store(kd_ptr, kd.to(kd_ptr.dtype.element_ty))
        tl.store(exp_ptr, exp.to(exp_ptr.dtype.element_ty))

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
            cos, alpha, beta = _cosine_terms(dot, ss, tt, inv_n, eps)
            exp_acc += tl.where(row_ok, 1.0 - cos, 0.0)
            kl_acc += tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
            tl.store(coef_ptr + rows * 2, alpha, mask=row_ok)
            tl.store(coef_ptr + rows * 2 + 1, beta, mask=row_ok)
        _store_totals(kl_acc, exp_acc, kd_scale, lam, inv_n, loss_ptr, kd_ptr, exp_ptr)

    @triton.jit
    def _arrive(
        count_ptr,
        slot,
        arrivals,
        row_ptr,
        kl_ptr,
        param_ptr,
        loss_ptr,
        kd_ptr,
        exp_ptr,
        N,
        BLOCK_F: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Counts this program in at counter ``slot``; the last of ``arrivals`` sums the three scalars.

        The barrier puts every thread's stores before the counter's release; the acquire of the last
        arrival makes them visible to its (L1-bypassing) loads.
        """
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
        if arrived == arrivals - 1:
            kd_scale = tl.load(param_ptr + 2)  # τ² / N
            lam = tl.load(param_ptr + 3)
            inv_n = tl.load(param_ptr + 4)
            exp_acc = tl.zeros((BLOCK_F,), dtype=ACC)
            kl_acc = tl.zeros((BLOCK_F,), dtype=ACC)
            for r0 in range(0, N, BLOCK_F):
                rows = r0 + tl.arange(0, BLOCK_F)
                ok = rows < N
                exp_acc += tl.load(row_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
                kl_acc += tl.load(kl_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
            _store_totals(kl_acc, exp_acc, kd_scale, lam, inv_n, loss_ptr, kd_ptr, exp_ptr)

    @triton.jit
    def _one_pass(
        s_ptr,
        t_ptr,
        zs_ptr,
        zt_ptr,
        param_ptr,
        part_ptr,
        row_ptr,
        kl_ptr,
        coef_ptr,
        count_ptr,
        grad_ptr,
        loss_ptr,
        kd_ptr,
        exp_ptr,
        N,
        D,
        C,
        CHUNK,
        chunks,
        row_blocks,
        logit_programs,
        WITH_GRAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        CHUNKS_P2: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_F: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """The whole forward in one launch: row_blocks × chunks map programs, then logit programs.

        A map program stores its chunk's three sums; the last chunk of a row block to arrive (counter
        ``row_block``) adds the block's chunks in chunk order, stores 1 − cos_i and (α_i, β_i). It
        and every logit program (KL rows, ∂kd/∂z_S) then arrive at counter ``row_blocks``; the last
        of those sums the loss. The sums keep a fixed order, so the result does not depend on which
        program finishes last.
        """
        pid = tl.program_id(0)
        inv_n = tl.load(param_ptr + 4)
        eps = tl.load(param_ptr + 5)  # a float constexpr would be rounded to float32
        if pid < row_blocks * chunks:
            row_block = pid // chunks
            chunk = pid % chunks
            rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            lo = chunk * CHUNK
            hi = tl.minimum(lo + CHUNK, D)
            dot, ss, tt = _map_rows(s_ptr, t_ptr, rows.to(tl.int64) * D, row_ok, lo, hi, BLOCK_N, BLOCK_D, ACC)
            out = part_ptr + (rows.to(tl.int64) * chunks + chunk) * 3
            tl.store(out, dot, mask=row_ok)
            tl.store(out + 1, ss, mask=row_ok)
            tl.store(out + 2, tt, mask=row_ok)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + row_block, 1, sem="acq_rel", scope="gpu")
            if arrived == chunks - 1:
                cols = tl.arange(0, CHUNKS_P2)
                mask = row_ok[:, None] & (cols < chunks)[None, :]
                parts = part_ptr + (rows.to(tl.int64)[:, None] * chunks + cols[None, :]) * 3
                dot = tl.sum(tl.load(parts, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
                ss = tl.sum(tl.load(parts + 1, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
                tt = tl.sum(tl.load(parts + 2, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
                cos, alpha, beta = _cosine_terms(dot, ss, tt, inv_n, eps)
                tl.store(row_ptr + rows, 1.0 - cos, mask=row_ok)
                tl.store(coef_ptr + rows * 2, alpha, mask=row_ok)
                tl.store(coef_ptr + rows * 2 + 1, beta, mask=row_ok)
                arrivals = row_blocks + logit_programs
                _arrive(
                    count_ptr,
                    row_blocks,
                    arrivals,
                    row_ptr,
                    kl_ptr,
                    param_ptr,
                    loss_ptr,
                    kd_ptr,
                    exp_ptr,
                    N,
                    BLOCK_F,
                    ACC,
                )
        else:
            rows = (pid - row_blocks * chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
            _kd_block(zs_ptr, zt_ptr, param_ptr, kl_ptr, grad_ptr, rows, N, C, WITH_GRAD, BLOCK_C, ACC)
            arrivals = row_blocks + logit_programs
            _arrive(
                count_ptr, row_blocks, arrivals, row_ptr, kl_ptr, param_ptr, loss_ptr, kd_ptr, exp_ptr, N, BLOCK_F, ACC
            )


LOSS_KERNELS = ("split", "one-pass")
KERNEL_ENV = "E2KD_TRITON_LOSS"


def loss_kernel_choice(kernel: str | None = None) -> str:
    """``kernel``, else ``$E2KD_TRITON_LOSS``, else ``split`` (the version measured on a GPU)."""
    name = kernel if kernel is not None else (os.environ.get(KERNEL_ENV, "").strip().lower() or "split")
    if name not in LOSS_KERNELS:
        where = "kernel" if kernel is not None else KERNEL_ENV
        raise ValueError(f"e2kd_fast.kernels.distill_loss: {where}={name!r}; expected one of {', '.join(LOSS_KERNELS)}")
    return name


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
    kernel: str | None = None,
    map_tiles: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(loss, kd, exp, ∂kd/∂z_S or None, ∂exp/∂s or None) for logits [N, C] and maps [N, ...].

    ``eps`` is the cosine's clamp of each norm (`e2kd_fast.reference.losses.COSINE_EPS`).
    ``kernel``: ``split`` (four launches) or ``one-pass`` (the forward in one launch, plus the
    gradient write); default `loss_kernel_choice`. ``map_tiles`` = (rows, columns, chunk) of the
    map programs overrides the launcher's choice (tests use it to reach several chunks and row
    blocks in the interpreter).

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

    one_pass = loss_kernel_choice(kernel) == "one-pass"
    # Maps: tiles of BLOCK_N rows × BLOCK_D columns, CHUNK columns per program.
    if map_tiles is not None:
        block_n, block_d, chunk = map_tiles
        if block_n < 1 or block_d < 1 or block_n & (block_n - 1) or block_d & (block_d - 1) or chunk % block_d:
            raise ValueError(f"distill_loss_triton: map_tiles={map_tiles} needs powers of two and a chunk they divide")
    elif on_cpu:
        block_d = min(_pow2(max(d, 1)), 4096)
        block_n = max(1, min(_pow2(n), 65536 // block_d))
        chunk = max(1, triton.cdiv(d, block_d)) * block_d
    elif one_pass:
        # 16,384 columns per program in either width; fp32 in 1024-column steps (with 2048, ptxas
        # spills 4 bytes of the combine, `python -m bench ptxas`).
        block_d = 4096 if es.element_size() <= 2 else 1024
        block_n = 1
        chunk = 16384
    else:
        block_d = 4096 if es.element_size() <= 2 else 2048
        block_n = 1
        chunk = 4 * block_d
    chunks = max(1, triton.cdiv(d, chunk))
    grid_maps = (triton.cdiv(n, block_n), chunks)
    warps = {} if on_cpu else {"num_warps": 8}
    partial = torch.empty((n, chunks, 3), dtype=acc, device=dev)
    tiles = {"BLOCK_N": block_n, "BLOCK_D": block_d, "ACC": acc_tl, **warps}
    block_c = min(_pow2(c), 4096)
    block_r = max(1, min(_pow2(n), 16384 // block_c)) if on_cpu else 1
    kl = torch.empty(n, dtype=acc, device=dev)
    grad_logits = torch.empty_like(zs) if with_grad else None
    params = torch.tensor([1.0 / tau, tau / n, tau * tau / n, lam, 1.0 / n, eps], dtype=acc, device=dev)
    coef = torch.empty((n, 2), dtype=acc, device=dev)
    loss, kd, exp = (torch.empty((), dtype=zs.dtype, device=dev) for _ in range(3))

    if one_pass:
        row_blocks, logit_programs = grid_maps[0], triton.cdiv(n, block_r)
        counters = torch.zeros(row_blocks + 1, dtype=torch.int32, device=dev)
        one_minus_cos = torch.empty(n, dtype=acc, device=dev)
        buffers = (partial, one_minus_cos, kl, coef, counters, grad_logits if with_grad else kl, loss, kd, exp)
        _one_pass[(row_blocks * chunks + logit_programs,)](
            es,
            et,
            zs,
            zt,
            params,
            *buffers,
            n,
            d,
            c,
            chunk,
            chunks,
            row_blocks,
            logit_programs,
            WITH_GRAD=with_grad,
            CHUNKS_P2=_pow2(chunks),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            BLOCK_F=min(_pow2(n), 1024),
            **tiles,
        )
    else:  # split: map partials, KL rows, one finalize program
        _map_partials[grid_maps](es, et, partial, n, d, chunk, chunks, **tiles)
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
        finalize_block = min(_pow2(n), 1024)
        _finalize[(1,)](partial, kl, params[2:], coef, loss, kd, exp, n, chunks, BLOCK_R=finalize_block, ACC=acc_tl)
    grad_maps = None
    if with_grad:
        grad_maps = torch.empty_like(es)
        _map_grad[grid_maps](es, et, coef, grad_maps, n, d, chunk, **tiles)
    return loss, kd, exp, grad_logits, grad_maps
