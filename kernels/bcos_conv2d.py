"""Triton kernels of ``e2kd::bcos_conv2d``, ``e2kd::patch_norm`` and ``e2kd::scaled_conv_adjoint``.

Two designs, chosen per call by `conv_kernel_choice` (``kernel=`` or ``$E2KD_TRITON_CONV``):

``cudnn-epilogue`` (the default, measured on a GPU): the FLOPs stay on cuDNN (``F.conv2d``) and
the memory-bound rest is fused after or before it:

``bcos_conv2d_epilogue(l, x, ...)``, given the conv output l [N, O, Ho, Wo] and its input x [N, C, H, W]:

1. ``_sumsq_kernel``: q[n, g, h, w] = Σ_{c ∈ group g} x[n, c, h, w]² (fp32; one read of x);
2. ``_epilogue_kernel``: per output pixel, the box sum of q over the receptive field (zero padding),
   n = sqrt(Σ + ε), then for every output channel of the group s = |l|/n (B = 2) or
   (|l/n| + ε)^(B−1), and optionally y = s·l (one read of l, one or two writes); both ε = 1e-6 are
   `e2kd_fast.reference.bcos`'s ``PATCH_NORM_EPS`` and ``SCALE_EPS``, passed as constexprs.
   Without l it stores n itself (``patch_norm``, the ``e2kd::patch_norm`` op).

``scale_product(s, g)``: the explanation sweep's s ⊙ g, the prologue of cuDNN's transposed conv
(``e2kd::scaled_conv_adjoint``).

``implicit-gemm`` (groups = 1; on an H200, 10.3× a cuDNN conv's time, median): the conv itself in Triton
(``_conv_gemm_kernel``), so the B-cos maths rides on it and no activation is read twice:

- ``bcos_conv2d_gemm``: Σ_c x² as a one-channel map (given by the op that made x, or one read of x),
  its separable box sum and sqrt (``_box_sum_kernel``, rows then columns), then the conv with
  l and s = scale(l, n) written from the accumulator;
- ``scaled_conv_adjoint_gemm``: the transposed conv with s ⊙ g formed as it loads g;
- ``conv2d_product``: the adjoint's backward, d = conv(dy, ŵ) written as (s ⊙ d, g ⊙ d).

Every kernel takes explicit strides (NCHW and channels_last both work; the GEMM reads its K axis
along the channels, so channels_last is the fast layout), upcasts to fp32 right after each load
(the interpreter has no bf16 arithmetic; the GEMM feeds tl.dot the input dtype) and accumulates in
fp32 (fp64 for float64 inputs, which only the interpreter's tests use). On CPU tensors the
kernels run only under ``TRITON_INTERPRET=1``, whose cost scales with the number of programs, so
the launchers pick large blocks there. This module imports without Triton; the launchers need it.
It imports nothing of the package but `e2kd_fast.ops._common` and `e2kd_fast.reference`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from e2kd_fast.ops._common import conv_output_size, memory_format_of
from e2kd_fast.reference.bcos import PATCH_NORM_EPS, SCALE_EPS

try:
    import triton
    import triton.language as tl
except ImportError:  # the package must import without Triton; the launchers then raise
    triton = None
    tl = None


CONV_KERNELS = ("cudnn-epilogue", "implicit-gemm")
CONV_KERNEL_ENV = "E2KD_TRITON_CONV"


def conv_kernel_choice(kernel: str | None = None) -> str:
    """``kernel``, else ``$E2KD_TRITON_CONV``, else ``cudnn-epilogue`` (the version measured on a GPU)."""
    name = kernel if kernel is not None else (os.environ.get(CONV_KERNEL_ENV, "").strip().lower() or CONV_KERNELS[0])
    if name not in CONV_KERNELS:
        where = "kernel" if kernel is not None else CONV_KERNEL_ENV
        raise ValueError(f"e2kd_fast.kernels.bcos_conv2d: {where}={name!r}; expected one of {', '.join(CONV_KERNELS)}")
    return name


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("e2kd_fast.kernels.bcos_conv2d needs triton, which is not importable")


def _acc(*tensors: Tensor):
    """The accumulation type: fp64 for float64 inputs (the gradcheck tests), fp32 otherwise."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


if triton is not None:

    @triton.jit
    def _sumsq_kernel(
        x_ptr,
        q_ptr,
        c_per_group,
        groups,
        height,
        width,
        sxn,
        sxc,
        sxh,
        sxw,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """q[n, g, p] = Σ_c x[n, g·Cg + c, p]² for one (n, g) and a block of pixels p (q: fp32, contiguous)."""
        ng = tl.program_id(0).to(tl.int64)
        n = ng // groups
        g = ng % groups
        p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < height * width
        pix = (p // width) * sxh + (p % width) * sxw
        base = x_ptr + n * sxn + g * c_per_group * sxc
        acc = tl.zeros((BLOCK_P,), dtype=ACC)
        for c0 in range(0, c_per_group, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = (c[:, None] < c_per_group) & pmask[None, :]
            v = tl.load(base + c[:, None] * sxc + pix[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(v * v, axis=0)
        tl.store(q_ptr + ng * height * width + p, acc, mask=pmask)

    @triton.jit
    def _epilogue_kernel(
        l_ptr,
        q_ptr,
        s_ptr,
        y_ptr,
        o_per_group,
        groups,
        height,
        width,
        out_h,
        out_w,
        sln,
        slo,
        slh,
        slw,
        ssn,
        sso,
        ssh,
        ssw,
        kh_size,
        kw_size,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        b,
        HAS_L: tl.constexpr,
        WRITE_Y: tl.constexpr,
        B_IS_2: tl.constexpr,
        PIX_FLAT: tl.constexpr,
        NORM_EPS: tl.constexpr,
        SCALE_EPS: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One (n, g) and a block of output pixels: the patch norm once, then every channel of the group.

        HAS_L: s = scale(l, n) into s_ptr (and y = s·l into y_ptr if WRITE_Y); else n into s_ptr.
        PIX_FLAT: l, s and y address their pixels as p·stride_w (NCHW and channels_last both are).
        """
        ng = tl.program_id(0).to(tl.int64)
        n = ng // groups
        g = ng % groups
        p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < out_h * out_w
        ho = p // out_w
        wo = p % out_w
        # Box sum of the channel sums of squares over the receptive field; padding contributes 0.
        q_base = q_ptr + ng * height * width
        box = tl.zeros((BLOCK_P,), dtype=ACC)
        for kh in range(0, kh_size):
            ih = ho * stride_h - pad_h + kh
            hmask = pmask & (ih >= 0) & (ih < height)
            for kw in range(0, kw_size):
                iw = wo * stride_w - pad_w + kw
                m = hmask & (iw >= 0) & (iw < width)
                box += tl.load(q_base + ih * width + iw, mask=m, other=0.0)
        norm = tl.sqrt(box + NORM_EPS)
        if PIX_FLAT:
            l_pix = p * slw
            s_pix = p * ssw
        else:
            l_pix = ho * slh + wo * slw
            s_pix = ho * ssh + wo * ssw
        for o0 in range(0, o_per_group, BLOCK_O):
            o = g * o_per_group + o0 + tl.arange(0, BLOCK_O)
            mask = ((o0 + tl.arange(0, BLOCK_O))[:, None] < o_per_group) & pmask[None, :]
            s_off = n * ssn + o[:, None] * sso + s_pix[None, :]
            if HAS_L:
                lin = tl.load(l_ptr + n * sln + o[:, None] * slo + l_pix[None, :], mask=mask, other=0.0)
                lin = lin.to(ACC)
                if B_IS_2:
                    scale = tl.abs(lin) / norm[None, :]
                else:
                    # (|l/n| + ε)^(B−1); the base is positive, so exp2/log2 is exact enough.
                    scale = tl.exp2((b - 1.0) * tl.log2(tl.abs(lin / norm[None, :]) + SCALE_EPS))
                tl.store(s_ptr + s_off, scale.to(s_ptr.dtype.element_ty), mask=mask)
                if WRITE_Y:
                    tl.store(y_ptr + s_off, (scale * lin).to(y_ptr.dtype.element_ty), mask=mask)
            else:
                val = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC) + norm[None, :]
                tl.store(s_ptr + s_off, val.to(s_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _product_kernel(a_ptr, b_ptr, out_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
        """out = a·b over the shared dense storage of three tensors with equal strides (fp32 math)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        a = tl.load(a_ptr + i, mask=mask, other=0.0).to(ACC)
        v = tl.load(b_ptr + i, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + i, (a * v).to(out_ptr.dtype.element_ty), mask=mask)


def _pixel_flat(*tensors: Tensor) -> bool:
    """True when every tensor's pixel (h, w) offset is p·stride_w (NCHW and channels_last)."""
    return all(t.stride(2) == t.shape[3] * t.stride(3) or t.shape[2] == 1 for t in tensors)


def channel_sums_of_squares(x: Tensor, groups: int) -> Tensor:
    """[N, C, H, W] → fp32 (fp64 for float64 x) [N, groups, H, W]: Σ x² over each group's channels."""
    _require_triton()
    n, c, h, w = x.shape
    q = torch.empty(
        n, groups, h, w, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
    )
    cpu = x.device.type == "cpu"
    block_p = _pow2(h * w, 16, 4096 if cpu else 128)
    block_c = _pow2(c // groups, 1, 64 if cpu else 16)
    grid = (n * groups, triton.cdiv(h * w, block_p))
    _sumsq_kernel[grid](x, q, c // groups, groups, h, w, *x.stride(), ACC=_acc(x), BLOCK_C=block_c, BLOCK_P=block_p)
    return q


def _sums_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the Σx² maps the kernels read: fp64 for float64 x, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _launch_epilogue(
    lin: Tensor | None,
    x: Tensor,
    out: Tensor,
    y: Tensor | None,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    groups: int,
    o_per_group: int,
    b: float,
    sums: Tensor | None = None,
) -> None:
    n, _, h, w = x.shape
    out_h, out_w = out.shape[-2:]
    q = channel_sums_of_squares(x, groups) if sums is None else sums.to(_sums_dtype(x)).contiguous()
    cpu = x.device.type == "cpu"
    block_p = _pow2(out_h * out_w, 16, 4096 if cpu else 64)
    block_o = _pow2(o_per_group, 1, 64 if cpu else 32)
    src = lin if lin is not None else out
    flat = _pixel_flat(src, out) and (y is None or _pixel_flat(y))
    grid = (n * groups, triton.cdiv(out_h * out_w, block_p))
    _epilogue_kernel[grid](
        src,
        q,
        out,
        y if y is not None else out,
        o_per_group,
        groups,
        h,
        w,
        out_h,
        out_w,
        *src.stride(),
        *out.stride(),
        kernel[0],
        kernel[1],
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        float(b),
        HAS_L=lin is not None,
        WRITE_Y=y is not None,
        B_IS_2=float(b) == 2.0,
        PIX_FLAT=flat,
        NORM_EPS=PATCH_NORM_EPS,
        SCALE_EPS=SCALE_EPS,
        ACC=_acc(x, src),
        BLOCK_O=block_o,
        BLOCK_P=block_p,
    )


def _check_geometry(where: str, x: Tensor, kernel, stride, padding, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{where}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{where}: groups={groups} must divide the {x.shape[1]} input channels")
    if len(kernel) != 2 or len(stride) != 2 or len(padding) != 2:
        raise ValueError(f"{where}: kernel, stride and padding must be pairs, got {kernel}, {stride}, {padding}")


def bcos_conv2d_epilogue(
    lin: Tensor,
    x: Tensor,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    groups: int,
    b: float,
    write_out: bool = True,
    sums: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    """The B-cos conv epilogue: (y = s·lin or None, s) from the conv output lin and its input x.

    Args:
        lin: [N, O, Ho, Wo] conv output (any strides; fp32/fp16/bf16).
        x: [N, C, H, W] conv input.
        kernel, stride, padding: the conv's geometry (no dilation); groups: the conv's groups.
        b: the exponent B > 1.
        write_out: also write y = s·lin (otherwise only s, which the op returns next to lin).
        sums: [N, groups, H, W] Σ_c x² made by x's producer (else one read of x here).

    Returns:
        (y, s), each [N, O, Ho, Wo] in l's dtype and memory format (NCHW or channels_last).
    """
    _require_triton()
    _check_geometry("bcos_conv2d_epilogue", x, kernel, stride, padding, groups)
    if lin.shape[1] % groups:
        raise ValueError(f"bcos_conv2d_epilogue: groups={groups} must divide the {lin.shape[1]} output channels")
    fmt = memory_format_of(lin)
    s = torch.empty(lin.shape, dtype=lin.dtype, device=lin.device, memory_format=fmt)
    y = torch.empty_like(s) if write_out else None
    _launch_epilogue(lin, x, s, y, kernel, stride, padding, groups, lin.shape[1] // groups, b, sums)
    return y, s


def patch_norm(
    x: Tensor, kernel: list[int], stride: list[int], padding: list[int], groups: int, out_channels: int
) -> Tensor:
    """The patch norm sqrt(boxsum(Σ_c x²) + 1e-6): [N, 1 or out_channels, Ho, Wo] in x's dtype and format."""
    _require_triton()
    _check_geometry("patch_norm", x, kernel, stride, padding, groups)
    out_h = conv_output_size(x.shape[2], kernel[0], stride[0], padding[0])
    out_w = conv_output_size(x.shape[3], kernel[1], stride[1], padding[1])
    channels = out_channels if groups > 1 else 1
    shape = (x.shape[0], channels, out_h, out_w)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    _launch_epilogue(None, x, out, None, kernel, stride, padding, groups, channels // groups, 2.0)
    return out


def scale_product(scale: Tensor, g: Tensor) -> Tensor:
    """s ⊙ g (same shapes) in g's dtype: the prologue of the transposed conv of the explanation sweep."""
    _require_triton()
    if scale.shape != g.shape:
        raise ValueError(f"scale_product: shapes differ, {tuple(scale.shape)} vs {tuple(g.shape)}")
    fmt = memory_format_of(g)
    g = g.contiguous(memory_format=fmt)
    scale = scale.contiguous(memory_format=fmt)
    out = torch.empty_like(g)
    numel = g.numel()
    block = _pow2(numel, 16, 65536 if g.device.type == "cpu" else 1024)
    _product_kernel[(triton.cdiv(numel, block),)](scale, g, out, numel, ACC=_acc(scale, g), BLOCK=block)
    return out


# ------------------------------------------------------------------------------------ implicit GEMM
# The conv's FLOPs in Triton, so the B-cos maths rides on the GEMM instead of re-reading its output:
# the M axis is the output pixels (n, h, w), the N axis the output channels, the K axis the input
# channels of one filter tap, looped over the taps. One kernel, three uses:
#   conv + B-cos epilogue:      l = conv(x, ŵ), s = |l|/n from the norm map (e2kd::bcos_conv2d)
#   transposed conv + prologue: conv2dᵀ(s ⊙ g, ŵ), the product made while loading the A tile
#                               (e2kd::scaled_conv_adjoint)
#   conv + product epilogue:    d = conv(dy, ŵ), then (s·d, g·d) (the adjoint's backward)

EPILOGUE_NONE, EPILOGUE_BCOS, EPILOGUE_PRODUCT = 0, 1, 2

if triton is not None:

    @triton.jit
    def _box_sum_kernel(
        src_ptr,
        dst_ptr,
        lines,
        inner,
        length_in,
        length_out,
        s_outer,
        s_inner,
        s_step,
        d_outer,
        d_inner,
        d_step,
        k_size,
        stride,
        pad,
        SQRT: tl.constexpr,
        NORM_EPS: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One axis of the separable box sum: dst[line, j] = Σ_{t<k} src[line, j·stride − pad + t].

        Line ℓ sits at (ℓ // inner)·outer + (ℓ % inner)·inner stride in both tensors (so the rows
        of [N, H, W] and the columns of [N, H, W'] are both lines); padding adds 0. SQRT: store
        sqrt(Σ + ε) instead (the second axis of the patch norm).
        """
        line = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        j = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        lmask = line < lines
        jmask = j < length_out
        src_line = (line // inner) * s_outer + (line % inner) * s_inner
        total = tl.zeros((BLOCK_L, BLOCK_P), dtype=ACC)
        for t in range(0, k_size):
            i = j * stride - pad + t
            m = lmask[:, None] & (jmask & (i >= 0) & (i < length_in))[None, :]
            total += tl.load(src_ptr + src_line[:, None] + i[None, :] * s_step, mask=m, other=0.0).to(ACC)
        if SQRT:
            total = tl.sqrt(total + NORM_EPS)
        dst_line = (line // inner) * d_outer + (line % inner) * d_inner
        mask = lmask[:, None] & jmask[None, :]
        tl.store(dst_ptr + dst_line[:, None] + j[None, :] * d_step, total.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_gemm_kernel(
        a_ptr,
        p_ptr,
        w_ptr,
        out_ptr,
        out2_ptr,
        e1_ptr,
        e2_ptr,
        batch,
        in_h,
        in_w,
        out_h,
        out_w,
        k_channels,
        n_channels,
        kh_size,
        kw_size,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        san,
        sac,
        sah,
        saw,
        spn,
        spc,
        sph,
        spw,
        swk,
        swn,
        swh,
        sww,
        son,
        soc,
        soh,
        sow,
        s1n,
        s1c,
        s1h,
        s1w,
        s2n,
        s2c,
        s2h,
        s2w,
        b,
        TRANSPOSED: tl.constexpr,
        PROLOGUE: tl.constexpr,
        EPILOGUE: tl.constexpr,
        B_IS_2: tl.constexpr,
        SCALE_EPS: tl.constexpr,
        ACC: tl.constexpr,
        INDEX: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """A [BLOCK_M pixels, BLOCK_N channels] tile of a conv (or transposed conv) as an implicit GEMM.

        a [N, K, in_h, in_w] is the GEMM's A (the conv's input; the transposed conv's g), read along
        K at each filter tap; w is addressed as w[k, n, kh, kw] through (swk, swn, swh, sww) (the
        launcher lays ŵ out as [kh, kw, k, n]: input channels first for the conv, output channels
        first for the transposed conv). Pixel (h, w) of the output reads, at tap
        (kh, kw), input pixel (h·s − p + kh, w·s − p + kw) (conv) or ((h + p − kh)/s, (w + p − kw)/s)
        where that divides (transposed; the other taps are masked). PROLOGUE: A is a ⊙ p (p read
        with a's indexing; stride 0 broadcasts), rounded to a's dtype as the unfused product is.
        EPILOGUE: NONE stores the result; BCOS stores l and s = scale(l, n), n read from e1
        [N, 1, out_h, out_w]; PRODUCT stores e1·r and e2·r (e1, e2 indexed like the output).
        INDEX: int32 offsets (half the registers of int64) when every tensor has < 2³¹ elements.
        """
        pid_m = tl.program_id(0).to(INDEX)
        pid_n = tl.program_id(1).to(INDEX)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < batch * out_h * out_w
        nb = m // (out_h * out_w)
        rest = m % (out_h * out_w)
        oh = rest // out_w
        ow = rest % out_w
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        co_mask = co < n_channels
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for kh in range(0, kh_size):
            if TRANSPOSED:
                th = oh + pad_h - kh
                ih = th // stride_h
                h_ok = (th >= 0) & (th % stride_h == 0) & (ih < in_h)
            else:
                ih = oh * stride_h - pad_h + kh
                h_ok = (ih >= 0) & (ih < in_h)
            for kw in range(0, kw_size):
                if TRANSPOSED:
                    tw = ow + pad_w - kw
                    iw = tw // stride_w
                    ok = m_mask & h_ok & (tw >= 0) & (tw % stride_w == 0) & (iw < in_w)
                else:
                    iw = ow * stride_w - pad_w + kw
                    ok = m_mask & h_ok & (iw >= 0) & (iw < in_w)
                a_pix = nb * san + ih * sah + iw * saw
                p_pix = nb * spn + ih * sph + iw * spw
                w_tap = kh * swh + kw * sww
                for k0 in range(0, k_channels, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    k_mask = kk < k_channels
                    a_mask = ok[:, None] & k_mask[None, :]
                    a = tl.load(a_ptr + a_pix[:, None] + kk[None, :] * sac, mask=a_mask, other=0.0)
                    if PROLOGUE:
                        p = tl.load(p_ptr + p_pix[:, None] + kk[None, :] * spc, mask=a_mask, other=0.0)
                        a = (a.to(ACC) * p.to(ACC)).to(a_ptr.dtype.element_ty)
                    w_mask = k_mask[:, None] & co_mask[None, :]
                    wt = tl.load(w_ptr + w_tap + kk[:, None] * swk + co[None, :] * swn, mask=w_mask, other=0.0)
                    acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        mask = m_mask[:, None] & co_mask[None, :]
        out_off = (nb * son + oh * soh + ow * sow)[:, None] + co[None, :] * soc
        if EPILOGUE == 1:
            norm = tl.load(e1_ptr + nb * s1n + oh * s1h + ow * s1w, mask=m_mask, other=1.0).to(ACC)
            if B_IS_2:
                scale = tl.abs(acc) / norm[:, None]
            else:
                scale = tl.exp2((b - 1.0) * tl.log2(tl.abs(acc / norm[:, None]) + SCALE_EPS))
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out2_ptr + out_off, scale.to(out2_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == 2:
            e1_off = (nb * s1n + oh * s1h + ow * s1w)[:, None] + co[None, :] * s1c
            e2_off = (nb * s2n + oh * s2h + ow * s2w)[:, None] + co[None, :] * s2c
            first = tl.load(e1_ptr + e1_off, mask=mask, other=0.0).to(ACC)
            second = tl.load(e2_ptr + e2_off, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + out_off, (first * acc).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out2_ptr + out_off, (second * acc).to(out2_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_blocks(
    m: int, k_channels: int, n_channels: int, dtype: torch.dtype, epilogue: int, transposed: bool, cpu: bool
) -> dict[str, int]:
    """Tile sizes: wide tiles for the interpreter (its cost is per program), tensor-core tiles on a GPU."""
    if cpu:
        return {
            "BLOCK_M": _pow2(m, 16, 1024),
            "BLOCK_N": _pow2(n_channels, 16, 256),
            "BLOCK_K": _pow2(k_channels, 16, 256),
        }
    # Register pressure beyond the accumulator: fp32 operands, the product epilogue's two extra tiles,
    # the transposed conv's index maths, and (counting twice) output channels that are not a multiple
    # of 16, whose unaligned stores also cap N at 64. Any of them halves the K depth, two or more (or
    # one with 128 channels) the M depth: the sm_90a report then shows no spill for any conv of the zoo.
    unaligned = n_channels % 16 != 0
    pressure = (dtype == torch.float32) + (epilogue == EPILOGUE_PRODUCT) + transposed + 2 * unaligned
    block_n = _pow2(n_channels, 16, 64 if unaligned else 128)
    block_k = _pow2(k_channels, 16, 64 if pressure == 0 else 32)
    block_m = 128 if m >= 4096 and (pressure == 0 or (pressure == 1 and block_n <= 64)) else 64
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "num_warps": 8 if block_m * block_n > 8192 else 4,
        "num_stages": 3,
    }


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows cuDNN's convs (TF32 when `torch.backends.cudnn.allow_tf32`); fp64 is exact."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _int32_offsets(t: Tensor | None) -> bool:
    """Whether every element offset of ``t`` (its largest reachable one) fits in an int32."""
    if t is None:
        return True
    return sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride(), strict=True)) < 2**31


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _conv_gemm(
    a: Tensor,
    weight: Tensor,
    out_size: tuple[int, int],
    stride: list[int],
    padding: list[int],
    *,
    transposed: bool = False,
    prologue: Tensor | None = None,
    epilogue: int = EPILOGUE_NONE,
    first: Tensor | None = None,
    second: Tensor | None = None,
    b: float = 2.0,
) -> tuple[Tensor, Tensor | None]:
    """Launches `_conv_gemm_kernel` (groups = 1). a: [N, K, h, w]; weight: ŵ [O, C, kH, kW] in a's
    dtype; the output [N, O or C, *out_size] takes a's memory format (and, for BCOS/PRODUCT, a second
    output of the same shape and strides)."""
    n, k_channels, in_h, in_w = a.shape
    out_h, out_w = out_size
    kh, kw = weight.shape[-2:]
    if transposed:
        taps = weight.permute(2, 3, 0, 1).contiguous()  # [kH, kW, O (reduced), C (produced)]
    else:
        taps = weight.permute(2, 3, 1, 0).contiguous()  # [kH, kW, C (reduced), O (produced)]
    n_channels = taps.shape[3]
    if taps.shape[2] != k_channels:
        raise ValueError(
            f"conv_gemm: the input has {k_channels} channels, the weight {taps.shape[2]} "
            f"(shape {tuple(weight.shape)}, transposed={transposed}, groups must be 1)"
        )
    shape = (n, n_channels, out_h, out_w)
    fmt = memory_format_of(a)
    out = torch.empty(shape, dtype=a.dtype, device=a.device, memory_format=fmt)
    out2 = torch.empty_like(out) if epilogue != EPILOGUE_NONE else None
    m = n * out_h * out_w
    blocks = _gemm_blocks(m, k_channels, n_channels, a.dtype, epilogue, transposed, a.device.type == "cpu")
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n_channels, blocks["BLOCK_N"]))
    _conv_gemm_kernel[grid](
        a,
        prologue if prologue is not None else a,
        taps,
        out,
        out2 if out2 is not None else out,
        first if first is not None else out,
        second if second is not None else out,
        n,
        in_h,
        in_w,
        out_h,
        out_w,
        k_channels,
        n_channels,
        kh,
        kw,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        *a.stride(),
        *_strides4(prologue),
        taps.stride(2),
        taps.stride(3),
        taps.stride(0),
        taps.stride(1),
        *out.stride(),
        *_strides4(first),
        *_strides4(second),
        float(b),
        TRANSPOSED=transposed,
        PROLOGUE=prologue is not None,
        EPILOGUE=epilogue,
        B_IS_2=float(b) == 2.0,
        SCALE_EPS=SCALE_EPS,
        ACC=_acc(a),
        INDEX=tl.int32 if all(_int32_offsets(t) for t in (a, taps, out, prologue, first, second)) else tl.int64,
        DOT_PRECISION=_dot_precision(a.dtype),
        **blocks,
    )
    return out, out2


def patch_norm_from_sums(sums: Tensor, kernel: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """[N, 1, H, W] Σ_c x² → [N, 1, Ho, Wo] patch norm sqrt(boxsum + ε) in the sums' dtype (fp32/fp64),
    contiguous: the box sum along the rows, then along the columns (k_h + k_w loads per pixel, not k_h·k_w)."""
    _require_triton()
    n, one, h, w = sums.shape
    if one != 1:
        raise ValueError(
            f"patch_norm_from_sums: expected one channel of sums of squares, got shape {tuple(sums.shape)}"
        )
    out_h = conv_output_size(h, kernel[0], stride[0], padding[0])
    out_w = conv_output_size(w, kernel[1], stride[1], padding[1])
    rows = torch.empty(n, h, out_w, dtype=sums.dtype, device=sums.device)
    norm = torch.empty(n, 1, out_h, out_w, dtype=sums.dtype, device=sums.device)
    cpu = sums.device.type == "cpu"
    acc = _acc(sums)

    def run(src, dst, lines, inner, length_in, length_out, s, d, k, st, pad, sqrt):
        block_p = _pow2(length_out, 16, 1024 if cpu else 128)
        block_l = _pow2(lines, 1, 256 if cpu else 8)
        grid = (triton.cdiv(lines, block_l), triton.cdiv(length_out, block_p))
        _box_sum_kernel[grid](
            src, dst, lines, inner, length_in, length_out, *s, *d, k, st, pad,
            SQRT=sqrt, NORM_EPS=PATCH_NORM_EPS, ACC=acc, BLOCK_L=block_l, BLOCK_P=block_p,
        )  # fmt: skip

    sq = sums.stride()
    run(
        sums,
        rows,
        n * h,
        h,
        w,
        out_w,
        (sq[0], sq[2], sq[3]),
        (h * out_w, out_w, 1),
        kernel[1],
        stride[1],
        padding[1],
        False,
    )
    run(
        rows,
        norm,
        n * out_w,
        out_w,
        h,
        out_h,
        (h * out_w, 1, out_w),
        (out_h * out_w, 1, out_w),
        kernel[0],
        stride[0],
        padding[0],
        True,
    )
    return norm


def bcos_conv2d_gemm(
    x: Tensor,
    weight: Tensor,
    b: float,
    stride: list[int],
    padding: list[int],
    sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The B-cos conv (groups = 1) in one implicit-GEMM launch with the scale as its epilogue.

    Args:
        x: [N, C, H, W]; weight: the unit-norm ŵ [O, C, kH, kW] (cast to x's dtype here).
        sums: [N, 1, H, W] Σ_c x² when the op that made x computed it (read as fp32, fp64 for float64
            x); else one read of x here.

    Returns:
        (l, s), each [N, O, Ho, Wo] in x's dtype and memory format.
    """
    _require_triton()
    kernel = list(weight.shape[-2:])
    _check_geometry("bcos_conv2d_gemm", x, kernel, stride, padding, 1)
    sums = channel_sums_of_squares(x, 1) if sums is None else sums.to(_sums_dtype(x))
    norm = patch_norm_from_sums(sums, kernel, stride, padding)
    out_size = tuple(conv_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i]) for i in range(2))
    return _conv_gemm(x, weight.to(x.dtype), out_size, stride, padding, epilogue=EPILOGUE_BCOS, first=norm, b=b)


def scaled_conv_adjoint_gemm(
    g: Tensor, scale: Tensor, weight: Tensor, in_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    """conv2dᵀ(s ⊙ g, ŵ) (groups = 1) with the product made as the transposed conv loads g.

    g [N, O, h, w]; scale broadcastable to g (e.g. [N, 1, h, w]); ŵ [O, C, kH, kW] → [N, C, *in_size]
    in g's dtype and memory format.
    """
    _require_triton()
    out, _ = _conv_gemm(
        g, weight.to(g.dtype), tuple(in_size), stride, padding, transposed=True, prologue=scale.expand_as(g)
    )
    return out


def conv2d_product(
    grad: Tensor, weight: Tensor, stride: list[int], padding: list[int], first: Tensor, second: Tensor
) -> tuple[Tensor, Tensor]:
    """d = conv2d(grad, ŵ) (groups = 1), returned as (first ⊙ d, second ⊙ d): the adjoint's backward.

    grad [N, C, H, W]; ŵ [O, C, kH, kW]; first, second broadcastable to d [N, O, Ho, Wo]; both outputs
    are d's shape in grad's dtype and memory format.
    """
    _require_triton()
    kernel = list(weight.shape[-2:])
    out_size = tuple(conv_output_size(grad.shape[2 + i], kernel[i], stride[i], padding[i]) for i in range(2))
    shape = (grad.shape[0], weight.shape[0], *out_size)
    return _conv_gemm(
        grad,
        weight.to(grad.dtype),
        out_size,
        stride,
        padding,
        epilogue=EPILOGUE_PRODUCT,
        first=first.expand(shape),
        second=second.expand(shape),
    )
