"""Built-in synthetic data: coloured shapes on noise, with object masks (no downloads needed).

Four classes (square, disk, triangle, cross), each a shape of random colour, size and position on a
noisy background. The mask marks the object, so localisation of explanations can be measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

SHAPE_CLASSES = ("square", "disk", "triangle", "cross")


def shape_mask(kind: int, size: int, cy: Tensor, cx: Tensor, r: Tensor) -> Tensor:
    """[N, size, size] boolean masks of shape ``kind`` centred at (cy, cx) with half-size r."""
    ys = torch.arange(size, dtype=torch.float32)[None, :, None] - cy[:, None, None]
    xs = torch.arange(size, dtype=torch.float32)[None, None, :] - cx[:, None, None]
    r = r[:, None, None]
    if kind == 0:  # square
        return (ys.abs() <= r) & (xs.abs() <= r)
    if kind == 1:  # disk
        return ys**2 + xs**2 <= r**2
    if kind == 2:  # triangle, apex up
        return (ys <= r) & (ys >= -r) & (xs.abs() <= (ys + r) / 2)
    return ((ys.abs() <= r / 3) & (xs.abs() <= r)) | ((xs.abs() <= r / 3) & (ys.abs() <= r))  # cross


def shapes_dataset(num_images: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Generates the shapes data set deterministically from ``seed``.

    Args:
        num_images: number of images (classes are balanced up to rounding).
        size: image side in pixels (≥ 16).
        seed: random seed; the same seed gives the same images.

    Returns:
        images [N, 3, size, size] in [0, 1], labels [N] (int64, index into `SHAPE_CLASSES`),
        masks [N, size, size] (bool, the object's pixels).
    """
    if size < 16:
        raise ValueError(f"shapes_dataset: size must be >= 16 pixels, got {size}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(num_images, generator=gen)]
    images = 0.35 + 0.3 * torch.rand(num_images, 3, size, size, generator=gen)  # noisy grey background
    masks = torch.zeros(num_images, size, size, dtype=torch.bool)
    r = size * (0.15 + 0.12 * torch.rand(num_images, generator=gen))
    cy = r + (size - 2 * r) * torch.rand(num_images, generator=gen)
    cx = r + (size - 2 * r) * torch.rand(num_images, generator=gen)
    colours = torch.rand(num_images, 3, generator=gen)
    colours = colours / colours.amax(1, keepdim=True)  # saturated colours
    for kind in range(len(SHAPE_CLASSES)):
        idx = (labels == kind).nonzero().flatten()
        if len(idx):
            masks[idx] = shape_mask(kind, size, cy[idx], cx[idx], r[idx])
    images = torch.where(masks[:, None], colours[:, :, None, None].expand_as(images), images)
    return images, labels, masks
