"""Triton kernels of ``e2kd::bcos_conv2d``, ``e2kd::patch_norm`` and ``e2kd::scaled_conv_adjoint``.

The B-cos conv keeps its FLOPs on cuDNN (``F.conv2d``) and fuses the memory-bound rest:
the norm, scale and product move several times the bytes of the conv output and need no FLOPs
worth a tensor core (the traffic model is in bench/NOTES.md):

``bcos_conv2d_epilogue(l, x, ...)``, given the conv output l [N, O, Ho, Wo] and its input x [N, C, H, W]:

1. ``_sumsq_kernel``: q[n, g, h, w] = Σ_{c ∈ group g} x[n, c, h, w]² (fp32; one read of x);
2. ``_epilogue_kernel``: per output pixel, the box sum of q over the receptive field (zero padding),
   n = sqrt(Σ + ε), then for every output channel of the group s = |l|/n (B = 2) or
   (|l/n| + ε)^(B−1), and optionally y = s·l (one read of l, one or two writes); both ε = 1e-6 are
   `e2kd_fast.reference.bcos`'s ``PATCH_NORM_EPS`` and ``SCALE_EPS``, passed as constexprs.
   Without l it stores n itself (``patch_norm``, the ``e2kd::patch_norm`` op).

``scale_product(s, g)``: the explanation sweep's s ⊙ g, the prologue of cuDNN's transposed conv
(``e2kd::scaled_conv_adjoint``).

Every kernel takes explicit strides (NCHW and channels_last both work), upcasts to fp32 right after
each load (the interpreter has no bf16 arithmetic) and accumulates in fp32. On CPU tensors the
kernels run only under ``TRITON_INTERPRET=1``, whose cost scales with the number of programs, so the
launchers pick large blocks there. This module imports without Triton; the launchers need it. It
imports nothing of the package but `e2kd_fast.ops._common` and `e2kd_fast.reference`.
"""

from __future__ import annotations

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


def channel_sum_of_squares(x: Tensor, groups: int) -> Tensor:
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
) -> None:
    n, _, h, w = x.shape
    out_h, out_w = out.shape[-2:]
    q = channel_sum_of_squares(x, groups)
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
) -> tuple[Tensor | None, Tensor]:
    """The B-cos conv epilogue: (y = s·lin or None, s) from the conv output lin and its input x.

    Args:
        lin: [N, O, Ho, Wo] conv output (any strides; fp32/fp16/bf16).
        x: [N, C, H, W] conv input.
        kernel, stride, padding: the conv's geometry (no dilation); groups: the conv's groups.
        b: the exponent B > 1.
        write_out: also write y = s·lin (otherwise only s, which the op returns next to lin).

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
    _launch_epilogue(lin, x, s, y, kernel, stride, padding, groups, lin.shape[1] // groups, b)
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
