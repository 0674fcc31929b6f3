"""Localisation metrics for attributions: energy pointing game, IoU, grid pointing game.

All take attributions at (or bilinearly upsampled to) input resolution and use only their positive
part A⁺ = max(A, 0). Definitions and choices: docs/metrics.md.

* EPG (Score-CAM; B-cos / model-guidance convention): Σ A⁺·M / Σ A⁺, M the union of the explained
  class's boxes or its object mask; 0 when Σ A⁺ < ``min_total`` (1e-7).
* IoU: binarise A⁺ (default: min–max normalise, keep ≥ 0.5) and intersect with M.
* GridPG (Böhle et al.; Rao, Böhle, Schiele 2022): on an n×n grid of images of distinct classes,
  the share of A⁺ (for cell k's class) that falls inside cell k. Chance is 1/n².
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_TOTAL = 1e-7  # total positive energy below which a score is undefined and recorded as 0


def _as_maps(attribution: Tensor, name: str = "attribution") -> Tensor:
    if attribution.dim() == 4 and attribution.shape[1] == 1:
        attribution = attribution[:, 0]
    if attribution.dim() != 3:
        raise ValueError(f"{name} must be [N, H, W] (or [N, 1, H, W]), got shape {tuple(attribution.shape)}")
    return attribution


def _to_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of [N, h, w] maps to ``size`` (CAM-type maps); identity if already there."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _share(positive: Tensor, inside: Tensor, min_total: float, undefined: float) -> Tensor:
    total = positive.sum((-1, -2))
    share = (positive * inside).sum((-1, -2)) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total < min_total, torch.full_like(share, undefined), share)


def energy_pointing_game(
    attribution: Tensor, mask: Tensor, *, min_total: float = MIN_TOTAL, undefined: float = 0.0
) -> Tensor:
    """Energy pointing game: the share of positive attribution inside the mask.

    Args:
        attribution: [N, H, W] (or [N, 1, H, W]); a lower-resolution map is upsampled bilinearly
            to the mask's size first.
        mask: [N, H, W] bool (any nonzero value counts as inside), e.g. `boxes_to_mask`.
        min_total: when Σ A⁺ < min_total the score is undefined.
        undefined: the value recorded for undefined scores (0 as in the reference; pass
            ``float("nan")`` to drop them with ``nanmean``).

    Returns:
        [N] scores in [0, 1].
    """
    attribution, mask = _as_maps(attribution), _as_maps(mask, "mask")
    if attribution.shape[0] != mask.shape[0]:
        raise ValueError(f"{attribution.shape[0]} attributions for {mask.shape[0]} masks")
    positive = _to_size(attribution, mask.shape[-2:]).clamp(min=0)
    return _share(positive, (mask != 0).to(positive.dtype), min_total, undefined)


THRESHOLDINGS = ("minmax", "quantile")


def iou(attribution: Tensor, mask: Tensor, *, threshold: float = 0.5, method: str = "minmax") -> Tensor:
    """IoU of the binarised positive attribution with the mask.

    Args:
        attribution: [N, H, W] (or [N, 1, H, W]); upsampled bilinearly to the mask if smaller.
        mask: [N, H, W] bool.
        threshold: with ``method="minmax"`` (default, the model-guidance convention) A⁺ is
            min–max normalised per image and pixels ≥ threshold are kept; with ``"quantile"`` the
            top ``threshold`` fraction of pixels by A⁺ is kept (only pixels with A⁺ > 0).
        method: ``"minmax"`` or ``"quantile"``.

    Returns:
        [N] IoU in [0, 1]; 0 when the union is empty or A⁺ is 0 everywhere.
    """
    attribution, mask = _as_maps(attribution), _as_maps(mask, "mask")
    if method not in THRESHOLDINGS:
        raise ValueError(f"IoU thresholding must be one of {THRESHOLDINGS}, got {method!r}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"IoU threshold must be in [0, 1], got {threshold}")
    positive = _to_size(attribution, mask.shape[-2:]).clamp(min=0).float()
    flat = positive.flatten(1)
    if method == "minmax":
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        scaled = (flat - lo) / (hi - lo).clamp_min(1e-12)
        predicted = (scaled >= threshold) & (hi > lo)
    else:
        cut = torch.quantile(flat, 1.0 - threshold, dim=1, keepdim=True)
        predicted = (flat >= cut) & (flat > 0)
    truth = (mask != 0).flatten(1)
    inter, union = (predicted & truth).sum(1), (predicted | truth).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter, dtype=torch.float32))


def boxes_to_mask(boxes: Tensor | Sequence[Tensor], height: int, width: int) -> Tensor:
    """The union of boxes as a mask.

    Args:
        boxes: [K, 4] boxes (x_min, y_min, x_max, y_max) in pixels of one image, or a sequence of
            such tensors, one per image. Max is exclusive (slice ``y_min:y_max``); fractional
            coordinates cover every pixel they touch (floor of min, ceil of max); boxes are clipped.
        height, width: mask size.

    Returns:
        [height, width] bool for one tensor, [N, height, width] for a sequence.
    """
    if not isinstance(boxes, Tensor):
        if len(boxes) == 0:
            return torch.zeros(0, height, width, dtype=torch.bool)
        return torch.stack([boxes_to_mask(b, height, width) for b in boxes])
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] as (x_min, y_min, x_max, y_max), got shape {tuple(boxes.shape)}")
    mask = torch.zeros(height, width, dtype=torch.bool, device=boxes.device)
    for x0, y0, x1, y1 in boxes.tolist():
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {(x0, y0, x1, y1)} has max < min; expected (x_min, y_min, x_max, y_max)")
        xa, ya = max(math.floor(x0), 0), max(math.floor(y0), 0)
        xb, yb = min(math.ceil(x1), width), min(math.ceil(y1), height)
        mask[ya:yb, xa:xb] = True
    return mask


def grid_cell_mask(grid: int, height: int, width: int, cell: Tensor) -> Tensor:
    """[N, height, width] bool masks of cell ``cell[i]`` (row-major: cell k is row k // grid, column k % grid)."""
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"a {grid}x{grid} grid needs height and width divisible by {grid}, got {height}x{width}")
    cell = cell.long().reshape(-1)
    if cell.numel() and (cell.min() < 0 or cell.max() >= grid * grid):
        raise ValueError(f"target cells must be in [0, {grid * grid}), got {cell.tolist()}")
    ch, cw = height // grid, width // grid
    rows = torch.arange(height, device=cell.device)[None, :, None] // ch
    cols = torch.arange(width, device=cell.device)[None, None, :] // cw
    return (rows == (cell // grid)[:, None, None]) & (cols == (cell % grid)[:, None, None])


def grid_pointing_game(
    attribution: Tensor,
    grid: int,
    target_cell: Tensor | int,
    *,
    size: tuple[int, int] | None = None,
    min_total: float = MIN_TOTAL,
    undefined: float = 0.0,
) -> Tensor:
    """Grid pointing game score: the share of positive attribution inside the target cell.

    Args:
        attribution: [N, H, W] (or [N, 1, H, W]) attributions on grid images, each for the class
            of its target cell.
        grid: 2 or 3 (any n ≥ 1 works) for n×n grids.
        target_cell: [N] (or one int) row-major cell index of the explained class.
        size: grid-image resolution to upsample to (bilinear) first; default the attribution's.
        min_total, undefined: see `energy_pointing_game`.

    Returns:
        [N] scores in [0, 1]; chance level 1/n².
    """
    attribution = _as_maps(attribution)
    if size is not None:
        attribution = _to_size(attribution, size)
    n, h, w = attribution.shape
    cell = torch.as_tensor(target_cell, device=attribution.device).reshape(-1)
    if cell.numel() == 1:
        cell = cell.expand(n)
    elif cell.numel() != n:
        raise ValueError(f"{cell.numel()} target cells for {n} attributions")
    positive = attribution.clamp(min=0)
    return _share(positive, grid_cell_mask(grid, h, w, cell).to(positive.dtype), min_total, undefined)


@dataclass
class GridImages:
    """Grid images and where their cells came from.

    Attributes:
        images: [G, C, n·H, n·W] grid images.
        labels: [G, n²] class of each cell (row-major).
        indices: [G, n²] index of each cell's source image.
        eligible: number of source images that passed the confidence filter.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    eligible: int


def confident_correct(
    labels: Tensor, logits: Tensor | Sequence[Tensor], *, threshold: float = 0.99, activation: str = "softmax"
) -> Tensor:
    """[N] bool: every model predicts the label with confidence ≥ ``threshold``.

    ``activation="softmax"``: the top-1 is the label and its softmax probability ≥ threshold
    (Rao et al.); ``"sigmoid"``: the label's sigmoid ≥ threshold (B-cos v2 uses 0.5) and it is the top-1.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    all_logits = [logits] if isinstance(logits, Tensor) else list(logits)
    ok = torch.ones(labels.shape[0], dtype=torch.bool)
    for z in all_logits:
        z = z.detach().float().cpu()
        if z.dim() != 2 or z.shape[0] != labels.shape[0]:
            raise ValueError(f"logits must be [N, num_classes] with N={labels.shape[0]}, got {tuple(z.shape)}")
        prob = z.softmax(1) if activation == "softmax" else z.sigmoid()
        lab = labels.long().cpu()
        ok &= (z.argmax(1) == lab) & (prob.gather(1, lab[:, None])[:, 0] >= threshold)
    return ok


def make_grid_images(
    images: Tensor,
    labels: Tensor,
    logits: Tensor | Sequence[Tensor],
    grid: int = 3,
    *,
    num_grids: int | None = None,
    threshold: float = 0.99,
    activation: str = "softmax",
    seed: int = 0,
) -> GridImages:
    """n×n grids of confidently classified images of distinct classes (GridPG, as ``sukrutrao/Attribution-Evaluation``).

    Only images that every model (one logits tensor per model) classifies correctly with
    confidence ≥ ``threshold`` are used. Each grid draws n² distinct classes uniformly among those
    with an eligible image, then one eligible image per class, uniformly (an image may appear in
    several grids, never twice in one). Deterministic for a given ``seed``.

    Args:
        images: [N, C, H, W] source images (all the same size).
        labels: [N] classes.
        logits: [N, num_classes], or a sequence with one per evaluated model.
        grid: n (2 or 3 in the literature).
        num_grids: grids to build (default: eligible images // n², at least 1).
        threshold, activation: see `confident_correct`.
        seed: sampling seed (report it with the scores).

    Returns:
        `GridImages`.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    labels = labels.long().reshape(-1).cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
    ok = confident_correct(labels, logits, threshold=threshold, activation=activation)
    pools = {int(c): torch.nonzero(ok & (labels == c))[:, 0] for c in labels[ok].unique()}
    cells = grid * grid
    if len(pools) < cells:
        raise ValueError(
            f"a {grid}x{grid} grid needs {cells} classes with a confidently classified image "
            f"(threshold {threshold}); only {len(pools)} classes ({int(ok.sum())} images) qualify"
        )
    count = max(int(ok.sum()) // cells, 1) if num_grids is None else num_grids
    gen = torch.Generator().manual_seed(seed)
    classes = torch.tensor(sorted(pools))
    chosen_labels, chosen = [], []
    for _ in range(count):
        picked = classes[torch.randperm(len(classes), generator=gen)[:cells]]
        idx = [pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=gen)].item() for c in picked]
        chosen_labels.append(picked)
        chosen.append(torch.tensor(idx))
    labels_g, indices = torch.stack(chosen_labels), torch.stack(chosen)
    c, h, w = images.shape[1:]
    cells_img = images[indices.reshape(-1).to(images.device)].reshape(count, grid, grid, c, h, w)
    grids = cells_img.permute(0, 3, 1, 4, 2, 5).reshape(count, c, grid * h, grid * w)
    return GridImages(grids, labels_g, indices, int(ok.sum()))


def evaluate_grid_pointing_game(
    explain_fn: Callable[[Tensor, Tensor], Tensor],
    grids: GridImages,
    grid: int,
    *,
    corners_only: bool = False,
    min_total: float = MIN_TOTAL,
) -> Tensor:
    """GridPG scores of an explainer on grid images, for every (or every corner) cell.

    Args:
        explain_fn: ``f(images [G, C, H, W], classes [G]) -> [G, h, w]`` (or [G, 1, h, w]) attributions
            for the given classes; upsampled bilinearly to the grid resolution.
        grids: from `make_grid_images`.
        grid: n of the n×n grids.
        corners_only: only the top-left and bottom-right cells (an option of the reference code).
        min_total: see `energy_pointing_game`.

    Returns:
        [G, K] scores, K = n² (or 2 with ``corners_only``), in the order of the cells.
    """
    cells = [0, grid * grid - 1] if corners_only else list(range(grid * grid))
    size = tuple(grids.images.shape[-2:])
    scores = []
    for k in cells:
        attribution = _as_maps(explain_fn(grids.images, grids.labels[:, k].to(grids.images.device)))
        scores.append(grid_pointing_game(attribution.detach(), grid, k, size=size, min_total=min_total).cpu())
    return torch.stack(scores, 1)


__all__ = [
    "MIN_TOTAL",
    "THRESHOLDINGS",
    "GridImages",
    "boxes_to_mask",
    "confident_correct",
    "energy_pointing_game",
    "evaluate_grid_pointing_game",
    "grid_cell_mask",
    "grid_pointing_game",
    "iou",
    "make_grid_images",
]
