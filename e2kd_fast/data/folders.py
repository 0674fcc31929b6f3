"""ImageNet-style image folders (``root/<split>/<class_name>/<file>``) that skip unreadable images.

A damaged file must not stop a 200-epoch run: `ImageFolderDataset.__getitem__` warns and returns None,
and `collate_skipping` drops the Nones and reports how many it dropped in the batch itself, because
DataLoader worker processes cannot share a counter with the trainer.

`read_image` is the one decoder of image files on the PIL paths (folders, VOC, Waterbirds, the CLI):
8- and 16-bit gray, gray+alpha, palette, RGB and RGBA files give the 8-bit RGB values DALI's decoder
gives; files of other pixel formats are refused by name (`UnsupportedImageError`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

# The extensions torchvision's ImageFolder takes (jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp).
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)
# PIL modes whose conversion to 8-bit RGB gives the values DALI's decoder gives (1/2/4-bit gray and
# palettes open as "1", "L" or "P"; 16-bit RGB(A) and gray+alpha PNGs open as 8-bit "RGB(A)").
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
# 16-bit gray: ``convert`` would clip every value above 255 to white; scaled by hand instead.
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class UnsupportedImageError(ValueError):
    """An image file of a pixel format that the loaders do not read to defined 8-bit values."""


def check_image_mode(mode: str, name: str | os.PathLike, image_format: str | None = None) -> None:
    """Raises `UnsupportedImageError` naming the file unless every loader reads PIL mode ``mode`` alike.

    ``image_format`` (PIL's ``format``): mode "I" is 16-bit gray when the file is a PNG (older
    Pillow versions open 16-bit gray PNGs so); elsewhere it is a 32-bit integer image.
    """
    if mode in _EIGHT_BIT_MODES or mode in _SIXTEEN_BIT_GRAY_MODES or (mode == "I" and image_format == "PNG"):
        return
    raise UnsupportedImageError(
        f"{name}: pixel format {mode!r} is not read (8- or 16-bit gray, gray+alpha, palette, RGB, RGBA "
        "and CMYK images are); convert the file to one of those"
    )


def read_image(
    source: str | os.PathLike | bytes, mode: str = "RGB", name: str | os.PathLike | None = None
) -> Image.Image:
    """Decodes a whole image file to 8-bit ``mode`` (``"RGB"``, or ``"L"`` for masks).

    Values: gray is replicated to RGB, a palette gives its colours, alpha is dropped (the colours as
    stored, nothing is composited), 1/2/4-bit gray is scaled to 0..255, 16-bit gray v becomes
    round(v · 255 / 65535) (what DALI gives). 16-bit RGB, RGBA and gray+alpha PNGs are reduced by
    Pillow itself to their high byte v >> 8, at most one level below DALI's rounding.

    Args:
        source: the file's path, or its bytes (``name`` then names it in errors).
        mode: the PIL mode of the result.

    Raises:
        UnsupportedImageError: other pixel formats (32-bit integer or float images), naming the file.
        PIL's errors (OSError, SyntaxError, ...) for damaged files; the decode is forced, so a
        truncated file fails here and not later.
    """
    name = name if name is not None else ("<bytes>" if isinstance(source, bytes) else source)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        check_image_mode(im.mode, name, im.format)
        if im.mode in _SIXTEEN_BIT_GRAY_MODES or im.mode == "I":
            wide = np.asarray(im).astype(np.int64)  # decodes; I;16B arrives big-endian, astype fixes that
            gray = ((wide.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
            return Image.fromarray(gray).convert(mode)
        return im.convert(mode)


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def _sorted_subdirs(path: Path) -> list[str]:
    """Names of the visible subfolders, sorted (hidden ones such as ``.ipynb_checkpoints`` are ignored)."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def class_folders(root: str | os.PathLike, split: str) -> list[str]:
    """The sorted class folder names of ``root/<split>`` (the class map of a training split), without its files."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    return _sorted_subdirs(split_dir)


def _check_class_folders(split_dir: Path, found: Sequence[str], classes: Sequence[str]) -> None:
    """Raises ValueError naming the missing and extra folders unless ``found`` holds exactly ``classes``.

    A validation split with a class folder less (or more) than the training split would otherwise get
    its own sorted class map and label its images with other classes' ids.
    """
    missing = sorted(set(classes) - set(found))
    extra = sorted(set(found) - set(classes))
    if missing or extra:
        raise ValueError(
            f"the class folders of {split_dir} do not match the {len(classes)} training classes: "
            f"missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'}. Every training "
            "class needs a folder of the same name here, and no other folder may be present"
        )


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class_name>/<file>``; classes are the sorted folder names.

    The order is deterministic: classes sorted by name get indices 0..C-1, files sorted by name within
    each class. Extensions match case-insensitively (ImageNet's ``.JPEG``). Hidden folders and files are
    ignored. With ``classes`` (the training split's class list) the split must have exactly those class
    folders, and their ids are the positions in ``classes``: validation labels are the training ones.

    Items are dicts ``{"image", "target", "index"}`` (plus ``"mask"`` with ``masks_root``), or None when
    the image (or its mask) cannot be decoded; use `collate_skipping` as the DataLoader's collate_fn.

    Args:
        root: data set folder.
        split: subfolder of ``root`` (``"train"``, ``"val"``, ...).
        transform: applied to the PIL RGB image; without ``masks_root`` it is called as
            ``transform(image)``, with it as ``transform(image, mask)`` and must return
            ``(image, mask)`` with one geometry for both (see `e2kd_fast.data.PairedTransform`).
            None: the image becomes a float32 tensor [3, H, W] in [0, 1].
        extensions: file endings that count as images.
        masks_root: optional folder of object masks: ``masks_root/<split>/<class>/<stem>.png``, read as
            a bool tensor [h, w] (pixel > 127). Every image must have one.
        classes: the class map to use (e.g. ``ImageFolderDataset(root, "train").classes`` for a
            validation split); the split's class folders must be exactly these names (ValueError naming
            the missing and extra folders otherwise). None: the split's own sorted folder names.

    Attributes:
        classes: class names, index = class id.
        samples: (path, class id) of every image, in dataset order.
        targets: [N] int64 class ids.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        masks_root: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.extensions = _normalise_extensions(extensions)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder not found: {split_dir}")
        found = _sorted_subdirs(split_dir)
        if not found:
            raise ValueError(f"no class folders in {split_dir} (expected {split_dir}/<class_name>/<image>)")
        if classes is not None:
            _check_class_folders(split_dir, found, classes)
        self.classes = list(classes) if classes is not None else found
        self.samples: list[tuple[Path, int]] = []
        for target, name in enumerate(self.classes):
            class_dir = split_dir / name
            with os.scandir(class_dir) as it:
                files = sorted(
                    e.name
                    for e in it
                    if not e.name.startswith(".")
                    and os.path.splitext(e.name)[1].lower() in self.extensions
                    and e.is_file()
                )
            if not files:
                raise ValueError(f"class folder {class_dir} has no images with extensions {', '.join(self.extensions)}")
            self.samples.extend((class_dir / f, target) for f in files)
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)
        self.masks_root = None if masks_root is None else Path(masks_root)
        if self.masks_root is not None:
            self._check_masks()

    def _check_masks(self) -> None:
        """Fails at construction, not mid-epoch, when masks are missing (a layout error, not a damaged file)."""
        mask_split = self.masks_root / self.split
        if not mask_split.is_dir():
            raise FileNotFoundError(f"mask split folder not found: {mask_split}")
        missing = [p for p in map(self.mask_path, range(len(self))) if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise FileNotFoundError(f"{len(missing)} of {len(self)} masks are missing, e.g. {shown}")

    def mask_path(self, index: int) -> Path:
        """``masks_root/<split>/<class>/<stem>.png`` for image ``index``."""
        if self.masks_root is None:
            raise ValueError("this dataset has no masks_root")
        path, target = self.samples[index]
        return self.masks_root / self.split / self.classes[target] / f"{path.stem}.png"

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[Image.Image, Tensor | None] | None:
        """Decodes the image (and mask) with `read_image`; warns naming the file and returns None if it cannot."""
        path = self.samples[index][0]
        try:
            image = read_image(path)
            mask = None
            if self.masks_root is not None:
                path = self.mask_path(index)
                mask = TF.pil_to_tensor(read_image(path, "L"))[0] > 127
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
            warnings.warn(f"skipping unreadable image file {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Returns ``{"image": [C, H, W], "target": int, "index": int}`` (+ ``"mask"``: bool [H, W]) or None."""
        if index < 0:
            index += len(self)
        read = self._read(index)
        if read is None:
            return None
        image, mask = read
        if mask is None:
            image = self.transform(image) if self.transform is not None else TF.pil_to_tensor(image).float().div_(255)
            return {"image": image, "target": self.samples[index][1], "index": index}
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = TF.pil_to_tensor(image).float().div_(255)
        return {"image": image, "target": self.samples[index][1], "index": index, "mask": mask}

    def __repr__(self) -> str:
        masks = f", masks_root={str(self.masks_root)!r}" if self.masks_root is not None else ""
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"{len(self.classes)} classes, {len(self)} images{masks})"
        )


def collate_skipping(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """DataLoader collate_fn that drops unreadable samples (None) and counts them.

    Args:
        batch: items of `ImageFolderDataset` (or any dicts); None for a skipped image.

    Returns:
        ``{"image": [B, C, H, W], "target": int64 [B], "index": int64 [B], ..., "skipped": int}`` where B
        is the number of readable items; other keys are collated the same way (``"mask"`` → bool
        [B, H, W]). If every item was skipped: empty tensors ``image`` [0], ``target`` [0],
        ``index`` [0] and ``skipped = len(batch)``.
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {
            "image": torch.zeros(0),
            "target": torch.zeros(0, dtype=torch.long),
            "index": torch.zeros(0, dtype=torch.long),
            "skipped": skipped,
        }
    out = default_collate(kept)  # stacks into shared memory inside worker processes
    out["skipped"] = skipped
    return out
