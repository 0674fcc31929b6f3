"""Contribution maps, RGBA pictures of B-cos explanations and colour-mapped GradCAM overlays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from e2kd_fast import ops


def contribution_map(x6: Tensor, weights: Tensor) -> Tensor:
    """Per-pixel contribution Σ_c x6_c · W_c to the explained logit.

    Args:
        x6: [N, C, H, W] or [C, H, W] model input.
        weights: the dynamic weights W, same shape as ``x6``.

    Returns:
        [N, H, W] (or [H, W]); for a dynamic-linear model its sum is the logit minus the logit bias.
    """
    if x6.shape != weights.shape:
        raise ValueError(f"x6 {tuple(x6.shape)} and weights {tuple(weights.shape)} must have the same shape")
    if x6.dim() == 4 and x6.dtype == weights.dtype and ops.use_fused("e2kd::contribution_map", x6.device.type):
        return ops.contribution_map(x6, weights)  # one fused pass (Triton/C++ back ends)
    return (x6 * weights).sum(dim=-3)


def explanation_to_rgba(x6: Tensor, weights: Tensor, smooth: int = 0, alpha_percentile: float = 99.5) -> np.ndarray:
    """The B-cos explanation picture: colour from W's [x, 1 − x] channel pairs, opacity from ‖W‖.

    Per pixel: W is divided by its largest |W_c| and clamped at 0; each colour is
    W_c / (W_c + W_{c+3}); opacity is ‖W‖₂ over channels (≈0 where the contribution is negative),
    optionally box-smoothed with kernel ``smooth``, divided by its ``alpha_percentile`` percentile
    and clipped to [0, 1]. Defaults follow GoodTeachersExplain (no smoothing); v2 used smooth=15.

    Args:
        x6: [6, H, W] or [N, 6, H, W] input in the [x, 1 − x] encoding.
        weights: W, same shape.
        smooth: odd box-filter size for the opacity (0 = none).
        alpha_percentile: opacity normalisation percentile in (0, 100].

    Returns:
        float array in [0, 1] of shape [H, W, 4] (or [N, H, W, 4]).
    """
    if weights.dim() == 4:
        return np.stack([explanation_to_rgba(x, w, smooth, alpha_percentile) for x, w in zip(x6, weights, strict=True)])
    if weights.dim() != 3 or weights.shape[0] != 6 or x6.shape != weights.shape:
        raise ValueError(
            f"expected x6 and weights of shape [6, H, W], got {tuple(x6.shape)} and {tuple(weights.shape)}"
        )
    if not 0 < alpha_percentile <= 100:
        raise ValueError(f"alpha_percentile must be in (0, 100], got {alpha_percentile}")
    weights, x6 = weights.detach(), x6.detach()
    contributions = (x6 * weights).sum(0, keepdim=True)
    scaled = (weights / (weights.abs().amax(0, keepdim=True) + 1e-12)).clamp(min=0)
    rgb = scaled[:3] / (scaled[:3] + scaled[3:] + 1e-12)
    alpha = weights.norm(p=2, dim=0, keepdim=True)
    alpha = torch.where(contributions < 0, torch.full_like(alpha, 1e-12), alpha)
    if smooth:
        alpha = F.avg_pool2d(alpha, smooth, stride=1, padding=(smooth - 1) // 2)
    alpha = (alpha / torch.quantile(alpha, alpha_percentile / 100)).clip(0, 1)
    return torch.cat([rgb, alpha], 0).permute(1, 2, 0).cpu().numpy()


# GradCAM heat is drawn with this matplotlib colormap (0 = blue, the map's maximum = red); pictures
# that show it carry a colour bar of the same name.
GRADCAM_COLORMAP = "jet"
GRADCAM_OPACITY = 0.5


def gradcam_heat(cam: Tensor) -> np.ndarray:
    """A GradCAM map ([1, H, W] or [H, W]) as float [H, W] in [0, 1]: negatives clamped, divided by its maximum."""
    cam = cam.detach().float().cpu()
    if cam.dim() == 3:
        cam = cam[0]
    if cam.dim() != 2:
        raise ValueError(f"expected a GradCAM map of shape [1, H, W] or [H, W], got {tuple(cam.shape)}")
    cam = cam.clamp(min=0)
    return (cam / cam.max().clamp_min(1e-12)).numpy()


def gradcam_overlay(
    image: np.ndarray, cam: Tensor, colormap: str = GRADCAM_COLORMAP, opacity: float = GRADCAM_OPACITY
) -> np.ndarray:
    """GradCAM drawn over the image: the heat (`gradcam_heat`) through a matplotlib colormap, alpha-blended.

    Args:
        image: float [H, W, 3] in [0, 1], the picture the model saw.
        cam: [1, H, W] or [H, W] GradCAM map of the same size.
        colormap: a matplotlib colormap name; a colour bar of it is the picture's key.
        opacity: weight of the colour-mapped heat over the image, in [0, 1].

    Returns:
        float [H, W, 3] in [0, 1].
    """
    from matplotlib import colormaps  # lazily: matplotlib is only needed for pictures

    if colormap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}")
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    heat = gradcam_heat(cam)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"GradCAM map {heat.shape} and image {image.shape[:2]} must have the same size")
    coloured = colormaps[colormap](heat)[..., :3]
    return ((1 - opacity) * image + opacity * coloured).clip(0, 1)
