"""Image transforms: the zoo's train/eval presets, the input encodings, and paired geometry.

Single-image presets (`train_transform`, `eval_transform`) are torchvision v2 pipelines for PIL images.

Paired transforms apply ONE crop/flip to an image and to per-image maps: object masks, or frozen teacher
explanations (`e2kd_fast.data.frozen_store`) stored at another resolution than the image. The crop is
held in coordinates relative to the image (fractions of its height and width) and every tensor is
resampled at the same relative positions with `resized_crop_relative`. A pixel of the output therefore
sees the same part of the scene in the image and in every map, whatever their resolutions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import RandAugment, v2
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.nn.layers import AddInverse

ENCODINGS = ("bcos", "standard", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[float, float, float, float]  # (top, left, height, width) as fractions of the image's H and W


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def encoding_transform(encoding: str) -> nn.Module:
    """The input encoding of a model family, applied to RGB tensors [..., 3, H, W] in [0, 1].

    Args:
        encoding: ``"bcos"`` ([x, 1 − x], 6 channels, no mean/std), ``"standard"`` (ImageNet mean/std,
            3 channels) or ``"none"`` (unchanged; for a trainer that encodes on the device itself).

    Returns:
        A module mapping [..., 3, H, W] to [..., 6, H, W] (bcos) or [..., 3, H, W].
    """
    if encoding == "bcos":
        return AddInverse(dim=-3)
    if encoding == "standard":
        return v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if encoding == "none":
        return nn.Identity()
    raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")


def _to_float_image(image: Image.Image | Tensor) -> Tensor:
    """PIL image or tensor [C, H, W] → plain float32 tensor [C, H, W] (uint8 is scaled to [0, 1])."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    image = image.as_subclass(Tensor)  # drop tv_tensors wrappers
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if not image.is_floating_point():
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    return image


def train_transform(
    size: int | Sequence[int] = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    encoding: str = "bcos",
    *,
    rand_augment_ops: int = 0,
    rand_augment_magnitude: int = 9,
) -> v2.Compose:
    """The zoo's training preset: RandomResizedCrop (bilinear, antialias) + horizontal flip
    [+ RandAugment] + encoding.

    RandAugment is torchvision's (``torchvision.transforms.RandAugment``, the class the official ViT
    recipe uses, bilinear) at the official position: on the cropped, flipped RGB image, before the
    conversion to float and the input encoding, so that B-cos models see [r, g, b, 1 − r, 1 − g, 1 − b]
    of the augmented image. Its draws come from the torch RNG, which the loaders seed per sample
    (`e2kd_fast.data.sampling`).

    Args:
        size: output side (or (height, width)).
        scale: range of the crop's area as a fraction of the image's area.
        encoding: see `encoding_transform`.
        rand_augment_ops: RandAugment operations per image; 0 leaves it out.
        rand_augment_magnitude: RandAugment magnitude, 0..30.

    Returns:
        A transform mapping a PIL image (or an image tensor [3, H, W], uint8 with RandAugment) to a float32
        tensor [6 or 3, *size].
    """
    encode = encoding_transform(encoding)  # validates before anything is built
    if rand_augment_ops < 0 or not 0 <= rand_augment_magnitude <= 30:
        raise ValueError(
            f"need rand_augment_ops >= 0 and rand_augment_magnitude in 0..30; "
            f"got {rand_augment_ops} and {rand_augment_magnitude}"
        )
    augment = []
    if rand_augment_ops > 0:
        bilinear = v2.InterpolationMode.BILINEAR
        augment.append(RandAugment(num_ops=rand_augment_ops, magnitude=rand_augment_magnitude, interpolation=bilinear))
    return v2.Compose(
        [
            v2.RandomResizedCrop(_pair(size), scale=scale, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(),
            *augment,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.ToPureTensor(),
            encode,
        ]
    )


def eval_transform(size: int | Sequence[int] = 224, resize: int = 256, encoding: str = "bcos") -> v2.Compose:
    """The zoo's evaluation preset: Resize(shorter side → ``resize``) + CenterCrop(size) + encoding.

    Returns:
        A transform mapping a PIL image (or an image tensor [3, H, W]) to a float32 tensor [6 or 3, *size].
    """
    encode = encoding_transform(encoding)
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(_pair(size)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.ToPureTensor(),
            encode,
        ]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Resampling at relative coordinates


def _linear_taps(n_in: int, start: float, length: float, n_out: int, antialias: bool) -> tuple[Tensor, Tensor]:
    """Taps of a triangle filter for one axis: output i samples input position start + (i + ½)·length/n_out.

    Pixel k of the input covers [k, k + 1) and has its centre at k + ½ (align_corners=False). When
    shrinking by s = length/n_out > 1 with ``antialias``, the triangle is widened to support s (the
    PIL/torchvision antialias filter); otherwise it is plain bilinear interpolation. Only pixels that
    overlap the region are used (crop, then resize); the other taps get weight 0 and the rest are
    renormalised, which equals border clamping for bilinear.

    Returns:
        indices [n_out, K] (int64) and weights [n_out, K] (float64, rows sum to 1).
    """
    lo, hi = _pixel_range(n_in, start, length)
    scale = length / n_out
    support = max(scale, 1.0) if antialias else 1.0
    centres = start + (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    first = torch.floor(centres - support - 0.5).long()
    k = first[:, None] + torch.arange(int(math.ceil(2 * support)) + 2)[None, :]
    weights = (1 - ((k + 0.5) - centres[:, None]).abs() / support).clamp_min(0)
    weights = torch.where((k >= lo) & (k < hi), weights, torch.zeros((), dtype=torch.float64))
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return k.clamp(lo, hi - 1), weights


def _sparse_resampler(
    n_in: int, start: float, length: float, n_out: int, antialias: bool, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The taps of `_linear_taps` as a sparse CSR matrix [n_out, n_in].

    A sparse matmul is ~8x faster on CPU than gathering the taps (it never materialises [..., n_out, K]).
    """
    idx, weights = _linear_taps(n_in, start, length, n_out, antialias)
    rows = torch.arange(n_out)[:, None].expand_as(idx)
    indices = torch.stack([rows.reshape(-1), idx.reshape(-1)])  # valid by construction: no invariant checks
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(indices, weights.reshape(-1), (n_out, n_in), check_invariants=False)
        return coo.coalesce().to(dtype=dtype, device=device).to_sparse_csr()  # coalesce sums clamped duplicates


def _pixel_range(n_in: int, start: float, length: float) -> tuple[int, int]:
    """Pixels [lo, hi) that overlap [start, start + length); the tolerance keeps whole-pixel boxes exact."""
    lo = max(0, math.floor(start + 1e-6))
    hi = min(n_in, math.ceil(start + length - 1e-6))
    return lo, max(hi, lo + 1)


def _nearest_taps(n_in: int, start: float, length: float, n_out: int) -> Tensor:
    """Input pixel that contains each output centre start + (i + ½)·length/n_out ("nearest-exact")."""
    lo, hi = _pixel_range(n_in, start, length)
    centres = start + (torch.arange(n_out, dtype=torch.float64) + 0.5) * (length / n_out)
    return torch.floor(centres).long().clamp(lo, hi - 1)


def resized_crop_relative(x: Tensor, box: Box, size: int | Sequence[int], antialias: bool = True) -> Tensor:
    """Crops the region ``box`` (relative coordinates) of ``x`` and resizes it to ``size``.

    Floating-point tensors are resampled bilinearly (with antialiasing when shrinking, as
    torchvision's ``antialias=True``); bool and integer tensors (masks, label maps) take the nearest
    pixel. For a box on whole pixels of ``x`` the bilinear result equals torchvision's
    ``resized_crop(..., antialias=True)`` on float tensors.

    Args:
        x: [..., H, W] image, map or mask, any resolution.
        box: (top, left, height, width) as fractions of H and W; the region need not fall on pixel borders.
        size: output side or (height, width).
        antialias: widen the filter when shrinking (bilinear only).

    Returns:
        [..., out_h, out_w], same dtype as ``x``.
    """
    out_h, out_w = _pair(size)
    top, left, height, width = box
    h, w = x.shape[-2:]
    if x.is_floating_point():
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # accumulate fp16 maps in fp32
        ry = _sparse_resampler(h, top * h, height * h, out_h, antialias, y.dtype, y.device)  # [out_h, H]
        rx = _sparse_resampler(w, left * w, width * w, out_w, antialias, y.dtype, y.device)  # [out_w, W]
        lead = x.shape[:-2]
        flat = y.reshape(-1, w)  # [L·H, W]
        n = flat.shape[0] // h
        t = (rx @ flat.T).view(out_w, n, h).permute(2, 1, 0).reshape(h, n * out_w)  # [H, L·out_w]
        t = (ry @ t).view(out_h, n, out_w).permute(1, 0, 2)  # [L, out_h, out_w]
        return t.reshape(*lead, out_h, out_w).to(x.dtype)
    iy = _nearest_taps(h, top * h, height * h, out_h)
    ix = _nearest_taps(w, left * w, width * w, out_w)
    return x[..., iy[:, None], ix[None, :]]


# ---------------------------------------------------------------------------------------------------------------------
# Paired geometry


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Box:
    """Draws a RandomResizedCrop region of an image of ``height`` × ``width`` pixels.

    Same distribution as torchvision's RandomResizedCrop: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``, whole pixels, 10 tries before falling back to the largest centred crop
    with a clamped ratio. Draws from ``generator`` or torch's global RNG (seeded per DataLoader worker).

    Returns:
        (top, left, height, width) as fractions of the image's height and width.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top / height, left / width, h / height, w / width
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return top / height, left / width, h / height, w / width


def center_crop_box(height: int, width: int, size: int | Sequence[int], resize: int) -> Box:
    """The region that Resize(shorter side → ``resize``) + CenterCrop(size) keeps, in relative coordinates.

    Resampling this region straight to ``size`` gives the same pixels as resizing and then cropping
    (same sample positions and the same filter width), with torchvision's rounding of the resized size.
    """
    out_h, out_w = _pair(size)
    if height <= width:
        rh, rw = resize, int(resize * width / height)
    else:
        rh, rw = int(resize * height / width), resize
    if out_h > rh or out_w > rw:
        raise ValueError(f"crop {out_h}x{out_w} is larger than the resized image {rh}x{rw}")
    top, left = int(round((rh - out_h) / 2)), int(round((rw - out_w) / 2))
    return top / rh, left / rw, out_h / rh, out_w / rw


def _apply_geometry(
    box: Box, flip: bool, size: tuple[int, int], image: Tensor, maps: Sequence[Tensor], antialias: bool
) -> Tensor | tuple[Tensor, ...]:
    """``image`` (no maps) or ``(image, *maps)``, each cropped to ``box``, resized to ``size``, flipped if ``flip``."""
    out = []
    for t in (image, *maps):
        if t.dim() < 2:
            raise ValueError(f"expected a tensor [..., H, W], got shape {tuple(t.shape)}")
        y = resized_crop_relative(t, box, size, antialias=antialias)
        out.append(y.flip(-1) if flip else y)
    return out[0] if not maps else tuple(out)


class PairedRandomResizedCropFlip:
    """One RandomResizedCrop + horizontal flip, applied identically to an image and to any maps.

    The crop is drawn for the image (whole pixels of the image, as torchvision) and applied to every
    map at the same relative region, whatever the map's resolution. Float maps are resized bilinearly,
    masks (bool/integer) with the nearest pixel. Then all are flipped, or none.

    Call:
        ``t(image [C, H, W], *maps [..., h, w])`` → ``(image [C, *size], *maps [..., *size])``, or only
        the image when no maps are given.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        antialias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _pair(size)
        self.scale, self.ratio, self.flip_p, self.antialias = scale, ratio, flip_p, antialias
        self.generator = generator

    def get_params(self, height: int, width: int) -> tuple[Box, bool]:
        """One draw of (relative crop box, flip) for an image of ``height`` × ``width`` pixels."""
        box = random_resized_crop_box(height, width, self.scale, self.ratio, self.generator)
        flip = bool(torch.rand((), generator=self.generator) < self.flip_p)
        return box, flip

    def __call__(self, image: Tensor, *maps: Tensor) -> Tensor | tuple[Tensor, ...]:
        box, flip = self.get_params(*image.shape[-2:])
        return _apply_geometry(box, flip, self.size, image, maps, self.antialias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"


class PairedResizeCenterCrop:
    """Resize(shorter side → ``resize``) + CenterCrop(size), applied identically to an image and to any maps.

    Call:
        ``t(image [C, H, W], *maps [..., h, w])`` → ``(image [C, *size], *maps [..., *size])``, or only
        the image when no maps are given.
    """

    def __init__(self, size: int | Sequence[int] = 224, resize: int = 256, antialias: bool = True) -> None:
        self.size, self.resize, self.antialias = _pair(size), resize, antialias

    def __call__(self, image: Tensor, *maps: Tensor) -> Tensor | tuple[Tensor, ...]:
        box = center_crop_box(*image.shape[-2:], self.size, self.resize)
        return _apply_geometry(box, False, self.size, image, maps, self.antialias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize})"


class PairedTransform:
    """A paired geometry followed by the encoding of the image alone (maps keep their values).

    Call:
        ``t(image, *maps)`` with ``image`` a PIL image or a tensor [3, H, W] (uint8 or float in [0, 1])
        and maps [..., h, w] → ``(encoded image [6 or 3, *size], *maps [..., *size])``, or only the
        image when no maps are given.
    """

    def __init__(self, geometry: PairedRandomResizedCropFlip | PairedResizeCenterCrop, encoding: str = "bcos") -> None:
        self.geometry = geometry
        self.encoding = encoding
        self.encode = encoding_transform(encoding)

    def __call__(self, image: Image.Image | Tensor, *maps: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.geometry(_to_float_image(image), *maps)
        out = (out,) if not maps else out
        image = self.encode(out[0])
        return image if not maps else (image, *out[1:])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry!r}, encoding={self.encoding!r})"


def paired_train_transform(
    size: int | Sequence[int] = 224, scale: tuple[float, float] = (0.08, 1.0), encoding: str = "bcos"
) -> PairedTransform:
    """`train_transform` for an image with maps: one RandomResizedCrop + flip for all, then the encoding."""
    return PairedTransform(PairedRandomResizedCropFlip(size, scale), encoding)


def paired_eval_transform(
    size: int | Sequence[int] = 224, resize: int = 256, encoding: str = "bcos"
) -> PairedTransform:
    """`eval_transform` for an image with maps: Resize + CenterCrop for all, then the encoding."""
    return PairedTransform(PairedResizeCenterCrop(size, resize), encoding)
