"""Teacher (and student) explanations over superpixels: KernelSHAP, LIME and GradCAM.

All three return per-superpixel values v [N, K] for the SLIC segments of each image (see
`e2kd_fast.xdistill.superpixels`); `broadcast_segments` turns them into the maps E' [N, 1, H, W].

* **KernelSHAP** (Lundberg & Lee 2017) over the M superpixels of an image: coalitions z ∈ {0, 1}^M
  keep the superpixels with z = 1 and replace the others by the baseline ("hide") image; the model's
  output f(z) is regressed on z with the Shapley kernel π(z) = (M − 1) / (C(M, |z|) |z| (M − |z|))
  under the efficiency constraint Σ φ = f(1) − f(0). With 2^M − 2 ≤ ``num_samples`` every coalition is
  enumerated with its exact weight (the result is then the exact Shapley value of the superpixel game);
  otherwise coalition sizes are drawn with probability ∝ the kernel's total mass per size, subsets
  uniformly within a size, in complementary pairs, each with weight 1.
* **LIME** (Ribeiro et al. 2016, the ``lime_image`` recipe with SLIC instead of quickshift): the first
  sample keeps every superpixel, the others keep each with probability 1/2; samples are weighted by the
  exponential kernel sqrt(exp(−d² / w²)) of the cosine distance d between z and the all-ones vector
  (w = 0.25), and a weighted ridge regression with an unpenalised intercept (α = 1, scikit-learn's
  ``Ridge`` default that LIME uses) gives the coefficients.
* **GradCAM**: the ReLU-GradCAM map of the last conv stage for the class, summed per superpixel.

Images are grouped by their number of superpixels M, so every group is one batched problem; the model
is evaluated on the perturbed images in chunks of ``batch_size`` under ``no_grad``. Everything is
seeded: the same inputs and seed give the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.explain.gradcam import gradcam
from e2kd_fast.xdistill.superpixels import num_segments, segment_masks_to_pixels, superpixel_sums

EXPLAINERS = ("kernel_shap", "lime", "gradcam")
HIDE_MODES = ("mean", "zero", "segment_mean")
OUTPUTS = ("probability", "logit")


def hide_image(images: Tensor, segments: Tensor, hide: str = "mean") -> Tensor:
    """The image that replaces switched-off superpixels.

    Args:
        images: [N, C, H, W] in [0, 1].
        segments: [N, H, W] labels.
        hide: ``"mean"`` (the image's mean colour everywhere), ``"zero"`` (black) or ``"segment_mean"``
            (each superpixel its own mean colour: ``lime_image``'s ``hide_color=None``).

    Returns:
        [N, C, H, W].
    """
    if hide == "zero":
        return torch.zeros_like(images)
    if hide == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if hide == "segment_mean":
        n, c, h, w = images.shape
        k = int(num_segments(segments).max())
        index = segments.reshape(n, 1, h * w).expand(n, c, h * w)
        sums = images.new_zeros(n, c, k).scatter_add(2, index, images.reshape(n, c, h * w))
        counts = images.new_zeros(n, 1, k).scatter_add(2, index[:, :1], torch.ones_like(images[:, :1].flatten(2)))
        return (sums / counts.clamp_min(1)).gather(2, index).reshape(n, c, h, w)
    raise ValueError(f"hide must be one of {', '.join(map(repr, HIDE_MODES))}; got {hide!r}")


@torch.no_grad()
def _coalition_outputs(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    background: Tensor,
    segments: Tensor,
    target: Tensor,
    rows: Tensor,
    z: Tensor,
    *,
    output: str,
    batch_size: int,
) -> Tensor:
    """f(z) for every coalition z [n, S, M] of the images ``rows`` [n] (indices into the batch).

    Returns:
        [n, S] float64 on the CPU: model outputs of class ``target`` on the masked images.
    """
    n, s, _ = z.shape
    device = images.device
    rows, z = rows.to(device), z.to(device)
    out = torch.empty(n * s, dtype=torch.float64, device=device)
    pairs = torch.arange(n * s, device=device)
    for start in range(0, n * s, batch_size):
        idx = pairs[start : start + batch_size]
        problem, sample_idx = idx // s, idx % s
        img = rows[problem]
        mask = segment_masks_to_pixels(z[problem, sample_idx][:, None], segments[img])[:, 0]
        mask = mask.to(images.dtype)
        x = mask * images[img] + (1 - mask) * background[img]
        logits = model(x).to(torch.float64)  # f(z) enters a float64 regression
        values = logits.softmax(1) if output == "probability" else logits
        out[start : start + len(idx)] = values.gather(1, target[img, None].long())[:, 0]
    return out.reshape(n, s).cpu()


def _check_common(images: Tensor, segments: Tensor, target: Tensor, output: str, hide: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if segments.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"segments {tuple(segments.shape)} do not match images {tuple(images.shape)}")
    if target.shape != (images.shape[0],):
        raise ValueError(f"target must be [N] = [{images.shape[0]}], got {tuple(target.shape)}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}; got {output!r}")
    if hide not in HIDE_MODES:
        raise ValueError(f"hide must be one of {', '.join(map(repr, HIDE_MODES))}; got {hide!r}")


def _groups(segments: Tensor) -> dict[int, Tensor]:
    """Image indices grouped by their number of superpixels M."""
    counts = num_segments(segments).cpu()
    return {int(m): (counts == m).nonzero().flatten() for m in counts.unique()}


def shapley_kernel_weight(m: int, size: Tensor) -> Tensor:
    """π(z) = (M − 1) / (C(M, |z|) · |z| · (M − |z|)) for 0 < |z| < M (float64)."""
    size = size.to(torch.float64)
    log_binom = torch.lgamma(torch.tensor(m + 1.0)) - torch.lgamma(size + 1) - torch.lgamma(m - size + 1)
    return (m - 1) / (torch.exp(log_binom) * size * (m - size))


def _all_coalitions(m: int) -> Tensor:
    """Every coalition except the empty and the full one: [2^M − 2, M] float64."""
    codes = torch.arange(1, 2**m - 1)
    return ((codes[:, None] >> torch.arange(m)) & 1).to(torch.float64)


def _sample_shap_coalitions(n: int, m: int, num_samples: int, gen: torch.Generator) -> Tensor:
    """[n, S, M] coalitions: sizes ∝ the kernel mass per size, uniform subsets, complementary pairs."""
    sizes = torch.arange(1, m, dtype=torch.float64)
    mass = (m - 1) / (sizes * (m - sizes))  # Σ of π over all subsets of one size
    half = max(1, num_samples // 2)
    drawn = torch.multinomial(mass.expand(n, -1).float(), half, replacement=True, generator=gen) + 1  # [n, half]
    keys = torch.rand(n, half, m, generator=gen)
    ranks = keys.argsort(2).argsort(2)  # a uniform random order of the superpixels
    z = (ranks < drawn[..., None]).to(torch.float64)
    return torch.cat([z, 1 - z], 1)


def kernel_shap(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    segments: Tensor,
    target: Tensor,
    *,
    num_samples: int | None = None,
    hide: str = "mean",
    output: str = "probability",
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """KernelSHAP values of the superpixels.

    Args:
        model: images [B, C, H, W] in [0, 1] -> logits [B, num_classes] (a frozen model in eval mode).
        images: [N, C, H, W] in [0, 1].
        segments: [N, H, W] superpixel labels.
        target: [N] class explained for each image.
        num_samples: coalitions per image; None = 2·M + 2048 (``shap.KernelExplainer``'s default).
        hide: the replacement of switched-off superpixels (see `hide_image`).
        output: explain the class ``"probability"`` (softmax; the paper's reading of SHAP ranges) or
            its ``"logit"``.
        seed: seed of the coalition sampling.
        batch_size: perturbed images per model call.

    Returns:
        φ [N, K] (K = the batch's largest segment count; slots past an image's own count are 0), with
        Σ_s φ_s = f(x) − f(hidden image) exactly.
    """
    _check_common(images, segments, target, output, hide)
    gen = torch.Generator().manual_seed(seed)
    outputs = partial(
        _coalition_outputs, model, images, hide_image(images, segments, hide), segments, target, output=output,
        batch_size=batch_size,
    )  # fmt: skip
    phi = torch.zeros(images.shape[0], int(num_segments(segments).max()), dtype=torch.float64)
    for m, idx in _groups(segments).items():
        ends = torch.stack([torch.zeros(len(idx), m), torch.ones(len(idx), m)], 1).to(torch.float64)
        f_ends = outputs(idx, ends)
        f0, delta = f_ends[:, 0], f_ends[:, 1] - f_ends[:, 0]
        if m == 1:
            phi[idx, 0] = delta
            continue
        budget = 2 * m + 2048 if num_samples is None else num_samples
        if 2**m - 2 <= budget:  # exact: every coalition with its kernel weight
            z = _all_coalitions(m).expand(len(idx), -1, -1)
            weight = shapley_kernel_weight(m, z[0].sum(1)).expand(len(idx), -1)
        else:
            z = _sample_shap_coalitions(len(idx), m, budget, gen)
            weight = torch.ones(z.shape[:2], dtype=torch.float64)
        f = outputs(idx, z)
        # Efficiency eliminates the last superpixel: y − z_M·Δ = Σ_{j<M} (z_j − z_M) φ_j.
        a = z[..., :-1] - z[..., -1:]
        b = (f - f0[:, None]) - z[..., -1] * delta[:, None]
        sw = weight.sqrt()
        sol = torch.linalg.lstsq(a * sw[..., None], (b * sw)[..., None], driver="gelsd").solution[..., 0]
        phi[idx, : m - 1] = sol
        phi[idx, m - 1] = delta - sol.sum(1)
    return phi.to(images.dtype)


def lime(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    segments: Tensor,
    target: Tensor,
    *,
    num_samples: int = 1000,
    kernel_width: float = 0.25,
    ridge_alpha: float = 1.0,
    hide: str = "mean",
    output: str = "probability",
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """LIME coefficients of the superpixels (``lime_image`` recipe, all superpixels as features).

    Args:
        model, images, segments, target, hide, output, seed, batch_size: as in `kernel_shap`.
        num_samples: perturbed samples per image, the first one unperturbed (LIME default 1000).
        kernel_width: width w of the kernel sqrt(exp(−d²/w²)) on the cosine distance (LIME default 0.25).
        ridge_alpha: ridge penalty on the coefficients (not the intercept); LIME uses 1.

    Returns:
        [N, K] coefficients (0 past an image's own segment count).
    """
    _check_common(images, segments, target, output, hide)
    if num_samples < 2:
        raise ValueError(f"lime: num_samples must be >= 2, got {num_samples}")
    gen = torch.Generator().manual_seed(seed)
    outputs = partial(
        _coalition_outputs, model, images, hide_image(images, segments, hide), segments, target, output=output,
        batch_size=batch_size,
    )  # fmt: skip
    coef = torch.zeros(images.shape[0], int(num_segments(segments).max()), dtype=torch.float64)
    for m, idx in _groups(segments).items():
        z = torch.randint(0, 2, (len(idx), num_samples, m), generator=gen).to(torch.float64)
        z[:, 0] = 1  # LIME's first sample is the instance itself
        f = outputs(idx, z)
        # Cosine distance to the all-ones instance; the empty coalition has similarity 0 (scikit-learn).
        distance = 1 - (z.sum(2) / m).sqrt()
        weight = torch.exp(-(distance**2) / kernel_width**2).sqrt()
        wsum = weight.sum(1, keepdim=True)
        z_mean = (weight[..., None] * z).sum(1, keepdim=True) / wsum[..., None]
        f_mean = (weight * f).sum(1, keepdim=True) / wsum
        zc, fc = z - z_mean, f - f_mean
        gram = (zc * weight[..., None]).transpose(1, 2) @ zc + ridge_alpha * torch.eye(m, dtype=torch.float64)
        rhs = (zc * weight[..., None]).transpose(1, 2) @ fc[..., None]
        coef[idx, :m] = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution[..., 0]
    return coef.to(images.dtype)


def gradcam_pixels(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """ReLU-GradCAM [N, 1, H, W] of ``model`` for ``target`` (no graph kept).

    Models of this package (`SmallCNN`, `XDistillStudent`, `Normalised`) have a ``gradcam`` method;
    torchvision ResNets/DenseNets go through `e2kd_fast.explain.gradcam`.
    """
    if hasattr(model, "gradcam"):
        return model.gradcam(images, target).detach()
    return gradcam(model, images, target, create_graph=False).detach()


def gradcam_superpixels(model: nn.Module, images: Tensor, segments: Tensor, target: Tensor) -> Tensor:
    """GradCAM summed per superpixel: [N, K] (the same rule as for SHAP values)."""
    return superpixel_sums(gradcam_pixels(model, images, target), segments)


def explain_superpixels(
    explainer: str,
    model: nn.Module,
    images: Tensor,
    segments: Tensor,
    target: Tensor,
    *,
    num_samples: int | None = None,
    hide: str = "mean",
    output: str = "probability",
    seed: int = 0,
    batch_size: int = 256,
    lime_kernel_width: float = 0.25,
    lime_ridge_alpha: float = 1.0,
) -> Tensor:
    """Per-superpixel explanation [N, K] by ``explainer`` (one of `EXPLAINERS`).

    ``num_samples`` None takes each explainer's default (KernelSHAP 2·M + 2048, LIME 1000).
    """
    if explainer == "gradcam":
        return gradcam_superpixels(model, images, segments, target)
    if explainer == "kernel_shap":
        return kernel_shap(
            model, images, segments, target, num_samples=num_samples, hide=hide, output=output, seed=seed,
            batch_size=batch_size,
        )  # fmt: skip
    if explainer == "lime":
        return lime(
            model, images, segments, target, num_samples=1000 if num_samples is None else num_samples,
            kernel_width=lime_kernel_width, ridge_alpha=lime_ridge_alpha, hide=hide, output=output, seed=seed,
            batch_size=batch_size,
        )  # fmt: skip
    raise ValueError(f"unknown explainer {explainer!r}; available: {', '.join(EXPLAINERS)}")


__all__ = [
    "EXPLAINERS",
    "HIDE_MODES",
    "OUTPUTS",
    "explain_superpixels",
    "gradcam_pixels",
    "gradcam_superpixels",
    "hide_image",
    "kernel_shap",
    "lime",
    "shapley_kernel_weight",
]
