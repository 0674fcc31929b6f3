"""Triton kernel of ``e2kd::contribution_map``: Σ_c x·W per pixel.

``contribution_map(x, w)``: one program per (sample, block of pixels) sums x·W over the channels in
blocks of channels. It takes explicit strides (NCHW and channels_last both work), upcasts right
after each load (the interpreter has no bf16 arithmetic) and accumulates in fp32 (fp64 for float64
inputs). On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1``, whose cost scales with
the number of programs, so the launcher picks large blocks there. This module imports without
Triton; the launcher needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the package must import without Triton; the launcher then raises
    triton = None
    tl = None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("e2kd_fast.kernels.contribution_map needs triton, which is not importable")


def _acc(*tensors: Tensor):
    """The accumulation type: fp64 for float64 inputs (the gradcheck tests), fp32 otherwise."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


if triton is not None:

    @triton.jit
    def _contribution_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        channels,
        width,
        num_pix,
        sxn,
        sxc,
        sxh,
        sxw,
        swn,
        swc,
        swh,
        sww,
        ACC: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """out[n, p] = Σ_c x[n, c, p]·w[n, c, p] for one sample and a block of pixels (out contiguous)."""
        n = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < num_pix
        h = p // width
        w = p % width
        x_pix = h * sxh + w * sxw
        w_pix = h * swh + w * sww
        acc = tl.zeros((BLOCK_P,), dtype=ACC)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = (c[:, None] < channels) & pmask[None, :]
            xv = tl.load(x_ptr + n * sxn + c[:, None] * sxc + x_pix[None, :], mask=mask, other=0.0)
            wv = tl.load(w_ptr + n * swn + c[:, None] * swc + w_pix[None, :], mask=mask, other=0.0)
            acc += tl.sum(xv.to(ACC) * wv.to(ACC), axis=0)
        tl.store(out_ptr + n * num_pix + p, acc.to(out_ptr.dtype.element_ty), mask=pmask)


def contribution_map(x: Tensor, w: Tensor) -> Tensor:
    """Σ_c x·W per pixel: [N, C, H, W] × [N, C, H, W] → [N, H, W] (fp32 accumulation, x's dtype)."""
    _require_triton()
    if x.shape != w.shape or x.dim() != 4:
        raise ValueError(f"contribution_map: expected two equal [N, C, H, W] shapes, got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    out = torch.empty(n, h, wd, dtype=torch.result_type(x, w), device=x.device)
    cpu = x.device.type == "cpu"
    block_p = _pow2(h * wd, 16, 8192 if cpu else 256)
    block_c = _pow2(c, 1, 8)
    grid = (n, triton.cdiv(h * wd, block_p))
    _contribution_kernel[grid](
        x, w, out, c, wd, h * wd, *x.stride(), *w.stride(), ACC=_acc(x, w), BLOCK_C=block_c, BLOCK_P=block_p
    )
    return out
