"""Shift equivariance of explanations (e²KD, Fig. 4: CNN teacher → ViT student).

For a shift t = (dy, dx) in pixels, shift_t(x) moves content down by dy and right by dx. The score
of an image is the cosine between E(shift_t(x)), the explanation of the shifted image, and
shift_t(E(x)), the shifted explanation of the original. An explainer that commutes with shifts
scores 1. How the image border is treated (``border``):

* ``"overlap"`` (default): the image is rolled (content leaving one side re-enters at the other, so
  the input stays a valid image in any encoding, e.g. B-cos [x, 1 − x]); the cosine is taken only
  over the pixels whose content is present in both the original and the shifted image, i.e.
  excluding the wrapped-around strips of width |dy| and |dx|.
* ``"circular"``: the image is rolled and the cosine covers the whole map, wrapped strips included
  (exactly 1 for circular convolutions and any other roll-equivariant explainer).
* ``"fill"``: the vacated strips are filled with ``fill`` (e.g. 0 = black for RGB in [0, 1]) and
  the cosine covers the overlap, as for ``"overlap"``.

An integer shift t means (t, t) (diagonal); pass (dy, dx) tuples for others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

BORDERS = ("overlap", "circular", "fill")


def _pair(shift: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(shift, int):
        return shift, shift
    dy, dx = shift
    return int(dy), int(dx)


def shift_image(x: Tensor, shift: int | tuple[int, int], *, border: str = "overlap", fill: float = 0.0) -> Tensor:
    """Shifts [..., H, W] by (dy, dx): rolled (``"overlap"``, ``"circular"``) or with ``fill`` (``"fill"``)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    dy, dx = _pair(shift)
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"shift {(dy, dx)} is not smaller than the image ({h}x{w})")
    out = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if border == "fill":
        out = out.clone()
        out[..., _strip(dy, h), :] = fill
        out[..., :, _strip(dx, w)] = fill
    return out


def _strip(d: int, size: int) -> slice:
    """The rows/columns that wrapped around after a roll by d (empty for d = 0)."""
    return slice(0, d) if d > 0 else slice(size + d, size) if d < 0 else slice(0, 0)


def overlap_mask(shape: tuple[int, int], shift: int | tuple[int, int], device=None) -> Tensor:
    """[H, W] bool: pixels of the shifted frame whose content was inside the original frame."""
    h, w = shape
    dy, dx = _pair(shift)
    mask = torch.ones(h, w, dtype=torch.bool, device=device)
    mask[_strip(dy, h), :] = False
    mask[:, _strip(dx, w)] = False
    return mask


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def shift_equivariance(
    explain_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    shifts: Iterable[int | tuple[int, int]],
    *,
    border: str = "overlap",
    fill: float = 0.0,
) -> dict[int | tuple[int, int], Tensor]:
    """Cosine between the explanation of a shifted image and the shifted explanation, per shift.

    Args:
        explain_fn: ``f(images [N, C, H, W]) -> explanations [N, ..., H, W]`` at input resolution
            (e.g. dynamic weights [N, 6, H, W], contribution maps [N, H, W], upsampled CAMs). It
            should explain a fixed class per image (e.g. the label, not the top-1 of the shifted
            image) so the comparison is about location only.
        images: [N, C, H, W].
        shifts: ints t (meaning (t, t)) or (dy, dx) pairs; 0 gives 1 for a deterministic explainer.
        border: ``"overlap"`` (default), ``"circular"`` or ``"fill"`` (module docstring).
        fill: the fill value for ``border="fill"``.

    Returns:
        {shift: [N] cosine similarities}, keys as given.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    h, w = images.shape[-2:]
    base = explain_fn(images).detach()  # no no_grad(): gradient-based explainers need autograd
    if base.shape[0] != images.shape[0] or tuple(base.shape[-2:]) != (h, w):
        raise ValueError(
            f"explain_fn must return [N, ..., H, W] at input resolution {(h, w)} for N={images.shape[0]}, "
            f"got {tuple(base.shape)}; upsample CAM-type maps inside explain_fn"
        )
    results = {}
    for shift in shifts:
        shifted_input = shift_image(images, shift, border=border, fill=fill)
        explained = explain_fn(shifted_input).detach()
        reference = torch.roll(base, shifts=_pair(shift), dims=(-2, -1))
        if border != "circular":
            keep = overlap_mask((h, w), shift, device=base.device).to(base.dtype)
            explained, reference = explained * keep, reference * keep
        results[shift] = _cosine(explained, reference)
    return results


__all__ = ["BORDERS", "overlap_mask", "shift_equivariance", "shift_image"]
