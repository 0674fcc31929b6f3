"""Distance covariance and correlation, biased and bias-corrected, partial and semi-partial, in torch.

Every function takes samples as rows: ``x`` is [..., n, d] (n samples of dimension d; any leading
dimensions are independent batches), and returns one value per batch, shape [...]. Feature maps are
flattened first (`flatten_samples`). Dimensions of ``x`` and ``y`` may differ; n must agree.

Two estimators (Székely & Rizzo):

* **biased (V-statistic)**: double-centre the distance matrix with plain means (diagonal kept);
  dCov²_n = mean(A ∘ B). ``distance_correlation_sqr`` equals ``dcor.distance_correlation_sqr``.
* **bias-corrected (U-statistic)**: U-centre (`u_centre`, zero diagonal) and take
  ⟨Ã, B̃⟩ = Σ_{i≠j} Ã_ij B̃_ij / (n(n−3)). Needs n ≥ 4. The correlation R* is a *squared*-type number
  with no square root and can be negative; it equals ``dcor.u_distance_correlation_sqr``.

Partial statistics work in the Hilbert space of U-centred matrices: ``project_out(Ã, C̃)`` removes
the component along C̃. Full partial dCor (Székely & Rizzo 2014) projects both arguments;
the *semi-partial* ("part") correlation used by the UniCAM code projects only the first.

Distances carry a stabiliser, a_ij = sqrt(‖x_i − x_j‖² + eps) (diagonal included), so the
gradient is finite when two samples coincide; the defaults are the UniCAM code's (1e-18 on the
U path, 1e-12 on the V path). Pass ``eps=0`` for the textbook statistics. Everything is computed in
float64 (U-statistics cancel heavily) and returned in float64; gradients flow to the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

U_EPS = 1e-18  # distance stabiliser on the U-centred path (UniCAM code)
V_EPS = 1e-12  # distance stabiliser on the V-statistic path (UniCAM code)
GUARD = 1e-12  # floor of the product under the square root of a correlation's denominator


def flatten_samples(features: Tensor) -> Tensor:
    """[n, *dims] → [n, prod(dims)] (one row per sample)."""
    if features.dim() < 1:
        raise ValueError("features must have a sample dimension, got a scalar")
    return features.reshape(features.shape[0], -1)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"expected samples as [..., n, d], got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)} must agree in all but the last (feature) dimension"
        )


def pairwise_distances(x: Tensor, eps: float = 0.0) -> Tensor:
    """Euclidean distance matrix with stabiliser, a_ij = sqrt(‖x_i − x_j‖² + eps).

    Args:
        x: [..., n, d] samples.
        eps: added under the square root (also on the diagonal, which is sqrt(eps)).

    Returns:
        [..., n, n] float64.
    """
    if x.dim() < 2:
        raise ValueError(f"expected samples as [..., n, d], got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    x = x - x.mean(-2, keepdim=True)  # distances are translation-invariant; centring limits cancellation
    sq = (x * x).sum(-1)
    d2 = (sq[..., :, None] + sq[..., None, :] - 2.0 * (x @ x.transpose(-1, -2))).clamp_min(0.0)
    n = x.shape[-2]
    d2 = d2.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)
    return (d2 + eps).sqrt()


def double_centre(a: Tensor) -> Tensor:
    """V-statistic centring: A = a − row means − column means + grand mean. [..., n, n] → same."""
    return a - a.mean(-1, keepdim=True) - a.mean(-2, keepdim=True) + a.mean((-1, -2), keepdim=True)


def u_centre(a: Tensor) -> Tensor:
    """U-centring (Székely & Rizzo 2014): rows and columns sum to 0, diagonal is 0. Needs n ≥ 4.

    Ã_ij = a_ij − Σ_l a_il/(n−2) − Σ_k a_kj/(n−2) + Σ_kl a_kl/((n−1)(n−2)) for i ≠ j.
    """
    n = a.shape[-1]
    if n < 4:
        raise ValueError(f"U-centred statistics need at least 4 samples, got n={n}")
    centred = (
        a
        - a.sum(-1, keepdim=True) / (n - 2)
        - a.sum(-2, keepdim=True) / (n - 2)
        + a.sum((-1, -2), keepdim=True) / ((n - 1) * (n - 2))
    )
    return centred.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), 0.0)


def u_inner(a: Tensor, b: Tensor) -> Tensor:
    """⟨Ã, B̃⟩ = Σ_{i≠j} Ã_ij B̃_ij / (n(n−3)) for U-centred [..., n, n] matrices (the unbiased dCov²)."""
    n = a.shape[-1]
    return (a * b).sum((-1, -2)) / (n * (n - 3))


def u_centred_distances(x: Tensor, eps: float = U_EPS) -> Tensor:
    """U-centred distance matrix of the samples ``x`` [..., n, d] → [..., n, n]."""
    return u_centre(pairwise_distances(x, eps))


def _ratio(num: Tensor, den_sqr: Tensor, guard: float) -> Tensor:
    return num / den_sqr.clamp_min(guard).sqrt()


def rstar(a: Tensor, b: Tensor, guard: float = GUARD) -> Tensor:
    """Bias-corrected correlation of two U-centred matrices, ⟨Ã, B̃⟩ / sqrt(⟨Ã, Ã⟩⟨B̃, B̃⟩).

    The product under the square root is floored at ``guard`` (the UniCAM code's stabiliser).
    """
    return _ratio(u_inner(a, b), u_inner(a, a) * u_inner(b, b), guard)


def project_out(a: Tensor, c: Tensor) -> Tensor:
    """P_{C⊥}(Ã) = Ã − (⟨Ã, C̃⟩ / ⟨C̃, C̃⟩) C̃: the part of Ã that C̃ does not explain.

    If ⟨C̃, C̃⟩ = 0 (C carries no distance structure) Ã is returned unchanged.
    """
    cc = u_inner(c, c)
    coef = torch.where(cc > 0, u_inner(a, c) / torch.where(cc > 0, cc, torch.ones_like(cc)), torch.zeros_like(cc))
    return a - coef[..., None, None] * c


def distance_covariance_sqr(x: Tensor, y: Tensor, *, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Squared distance covariance of samples ``x`` [..., n, p] and ``y`` [..., n, q] → [...].

    ``unbiased=False``: V-statistic, mean(A ∘ B) (``dcor.distance_covariance_sqr``);
    ``unbiased=True``: U-statistic ⟨Ã, B̃⟩ (``dcor.u_distance_covariance_sqr``).
    ``eps`` defaults to `V_EPS` / `U_EPS`.
    """
    _check_pair(x, y)
    if unbiased:
        e = U_EPS if eps is None else eps
        return u_inner(u_centred_distances(x, e), u_centred_distances(y, e))
    e = V_EPS if eps is None else eps
    return (double_centre(pairwise_distances(x, e)) * double_centre(pairwise_distances(y, e))).mean((-1, -2))


def distance_correlation_sqr(
    x: Tensor, y: Tensor, *, unbiased: bool = False, eps: float | None = None, guard: float = GUARD
) -> Tensor:
    """Squared distance correlation of ``x`` [..., n, p] and ``y`` [..., n, q] → [...].

    ``unbiased=False``: the biased dCor² in [0, 1], 0 when either variable is constant
    (``dcor.distance_correlation_sqr``). ``unbiased=True``: the bias-corrected R*, which can be
    negative (``dcor.u_distance_correlation_sqr``); the denominator product is floored at ``guard``.
    """
    _check_pair(x, y)
    if unbiased:
        e = U_EPS if eps is None else eps
        return rstar(u_centred_distances(x, e), u_centred_distances(y, e), guard)
    e = V_EPS if eps is None else eps
    a, b = double_centre(pairwise_distances(x, e)), double_centre(pairwise_distances(y, e))
    ab, aa, bb = (a * b).mean((-1, -2)), (a * a).mean((-1, -2)), (b * b).mean((-1, -2))
    den = aa * bb
    return torch.where(den > 0, ab / den.clamp_min(torch.finfo(den.dtype).tiny).sqrt(), torch.zeros_like(den))


def distance_correlation(x: Tensor, y: Tensor, *, eps: float | None = None) -> Tensor:
    """Biased distance correlation dCor (the square root of the biased dCor²; ``dcor.distance_correlation``)."""
    return distance_correlation_sqr(x, y, unbiased=False, eps=eps).clamp_min(0.0).sqrt()


def partial_distance_covariance(x: Tensor, y: Tensor, z: Tensor, *, eps: float = U_EPS) -> Tensor:
    """pdCov(x, y; z) = ⟨P_{Z⊥}(X̃), P_{Z⊥}(Ỹ)⟩ (``dcor.partial_distance_covariance``). Shapes [..., n, ·] → [...]."""
    _check_pair(x, y)
    _check_pair(x, z)
    a, b, c = (u_centred_distances(t, eps) for t in (x, y, z))
    return u_inner(project_out(a, c), project_out(b, c))


def partial_distance_correlation(x: Tensor, y: Tensor, z: Tensor, *, eps: float = U_EPS, guard: float = 0.0) -> Tensor:
    """Full partial distance correlation pdCor(x, y; z) (Székely & Rizzo 2014): z removed from both.

    Equals ``dcor.partial_distance_correlation`` (0 when a projected matrix is 0). With
    ``guard > 0`` the denominator product is floored instead.
    """
    _check_pair(x, y)
    _check_pair(x, z)
    a, b, c = (u_centred_distances(t, eps) for t in (x, y, z))
    pa, pb = project_out(a, c), project_out(b, c)
    num, den = u_inner(pa, pb), u_inner(pa, pa) * u_inner(pb, pb)
    if guard > 0:
        return _ratio(num, den, guard)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny).sqrt(), torch.zeros_like(den))


def semi_partial_distance_correlation(
    x: Tensor, y: Tensor, z: Tensor, *, eps: float = U_EPS, guard: float = GUARD
) -> Tensor:
    """Semi-partial ("part") distance correlation: z removed from x only.

    spdCor(x, y; z) = ⟨P_{Z⊥}(X̃), Ỹ⟩ / sqrt(⟨P_{Z⊥}(X̃), P_{Z⊥}(X̃)⟩⟨Ỹ, Ỹ⟩), the UniCAM code's pd(X | Z, Y).
    It shares its numerator with `partial_distance_correlation` and differs from it by the factor
    ‖P_{Z⊥}(Ỹ)‖ / ‖Ỹ‖.
    """
    _check_pair(x, y)
    _check_pair(x, z)
    a, b, c = (u_centred_distances(t, eps) for t in (x, y, z))
    return rstar(project_out(a, c), b, guard)


__all__ = [
    "GUARD",
    "U_EPS",
    "V_EPS",
    "distance_correlation",
    "distance_correlation_sqr",
    "distance_covariance_sqr",
    "double_centre",
    "flatten_samples",
    "pairwise_distances",
    "partial_distance_correlation",
    "partial_distance_covariance",
    "project_out",
    "rstar",
    "semi_partial_distance_correlation",
    "u_centre",
    "u_centred_distances",
    "u_inner",
]
