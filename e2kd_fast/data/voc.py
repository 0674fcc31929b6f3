"""PASCAL VOC (2007 / 2012) as a multi-label classification set, with boxes for localisation metrics.

Layout (``root`` is the year folder, e.g. ``VOCdevkit/VOC2007``)::

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml            <annotation><size>…</size><object><name>, <difficult>, <bndbox>…
    root/ImageSets/Main/<split>.txt      one image id per line (train, val, trainval, test)

Targets are multi-hot over the 20 classes (`VOC_CLASSES`, the devkit's order): a class is present if
the image has at least one object of it, difficult or not. ``ignore`` marks the classes present
*only* through difficult objects; the devkit leaves those out of the classification AP, and so does
`e2kd_fast.metrics.scores.mean_average_precision`.

Box coordinates are the devkit's 1-based inclusive pixel indices. A box ``(xmin, ymin, xmax, ymax)``
covers the 0-based pixel columns ``xmin − 1 … xmax − 1``; `box_masks` rasterises them at any output
size by testing pixel centres against the scaled box ``[(xmin − 1)·s, xmax·s)``.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.data.bundle import DataBundle, check_dataset_config, input_encoding
from e2kd_fast.data.folders import read_image
from e2kd_fast.data.transforms import encoding_transform, eval_transform, train_transform

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


@dataclass(frozen=True)
class VOCObject:
    """One annotated object: class name and index, box (1-based inclusive pixels) and difficult flag."""

    name: str
    label: int
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax
    difficult: bool


@dataclass(frozen=True)
class VOCAnnotation:
    """The parsed ``Annotations/<id>.xml`` of one image."""

    image_id: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{where}: missing or empty <{tag}>")
    return child.text.strip()


def _int(node: ET.Element, tag: str, where: str) -> int:
    text = _text(node, tag, where)
    try:
        return int(round(float(text)))  # a few VOC2012 files write coordinates as "273.5"
    except ValueError:
        raise ValueError(f"{where}: <{tag}> must be a number, got {text!r}") from None


def parse_voc_annotation(path: str | os.PathLike) -> VOCAnnotation:
    """Reads one VOC annotation file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed XML (with line and column), a missing field, an unknown class name, a
            box outside ``1 ≤ xmin ≤ xmax ≤ width`` (likewise for y) or an image without objects;
            the message names the file and the object (its position and class).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, column = e.position
        raise ValueError(f"{path}: malformed XML at line {line}, column {column + 1}: {e}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: the root element must be <annotation>, got <{root.tag}>")
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: missing <size>")
    width, height = _int(size, "width", f"{path} <size>"), _int(size, "height", f"{path} <size>")
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: <size> must be positive, got width {width}, height {height}")
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"{path} <object> #{k}"
        name = _text(obj, "name", where)
        where = f"{where} ({name!r})"
        if name not in _CLASS_INDEX:
            raise ValueError(f"{where}: unknown class; VOC classes are {', '.join(VOC_CLASSES)}")
        box_node = obj.find("bndbox")
        if box_node is None:
            raise ValueError(f"{where}: missing <bndbox>")
        box = tuple(_int(box_node, tag, f"{where} <bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax"))
        xmin, ymin, xmax, ymax = box
        if not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
            raise ValueError(
                f"{where}: box (xmin {xmin}, ymin {ymin}, xmax {xmax}, ymax {ymax}) must satisfy "
                f"1 <= xmin <= xmax <= width ({width}) and 1 <= ymin <= ymax <= height ({height})"
            )
        difficult_node = obj.find("difficult")
        difficult_text = "0" if difficult_node is None or difficult_node.text is None else difficult_node.text.strip()
        if difficult_text not in ("0", "1"):
            raise ValueError(f"{where}: <difficult> must be 0 or 1, got {difficult_text!r}")
        objects.append(VOCObject(name, _CLASS_INDEX[name], box, difficult_text == "1"))
    if not objects:
        raise ValueError(f"{path}: no <object>; every VOC classification image has at least one")
    return VOCAnnotation(path.stem, width, height, tuple(objects))


def read_image_set(root: str | os.PathLike, split: str) -> list[str]:
    """The image ids of ``root/ImageSets/Main/<split>.txt`` (one id per line; blank lines ignored).

    Raises:
        FileNotFoundError: no such split file (the message lists the splits that exist).
        ValueError: a line with more than one field (e.g. a per-class ``<class>_<split>.txt`` file given
            as the split), named by file and line number, or an empty file.
    """
    folder = Path(root) / "ImageSets" / "Main"
    path = folder / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem) if folder.is_dir() else []
        raise FileNotFoundError(f"VOC split file not found: {path} (splits found: {', '.join(found) or 'none'})")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise ValueError(f"{path}, line {number}: expected one image id, got {line.strip()!r}")
        ids.append(fields[0])
    if not ids:
        raise ValueError(f"{path}: no image ids")
    return ids


def box_masks(annotation: VOCAnnotation, size: int | Sequence[int], num_classes: int = len(VOC_CLASSES)) -> Tensor:
    """Per-class union of box masks at output size (h, w), for an image resized (not cropped) to it.

    Args:
        annotation: the image's objects (difficult ones included).
        size: output side or (h, w).
        num_classes: number of mask planes.

    Returns:
        bool [num_classes, h, w]; plane c is True inside any box of class c.
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    sy, sx = h / annotation.height, w / annotation.width
    ys = torch.arange(h, dtype=torch.float64) + 0.5  # pixel centres in output coordinates
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    masks = torch.zeros(num_classes, h, w, dtype=torch.bool)
    for obj in annotation.objects:
        xmin, ymin, xmax, ymax = obj.box
        rows = (ys >= (ymin - 1) * sy) & (ys < ymax * sy)
        cols = (xs >= (xmin - 1) * sx) & (xs < xmax * sx)
        masks[obj.label] |= rows[:, None] & cols[None, :]
    return masks


class VOCDataset(Dataset):
    """PASCAL VOC images with multi-hot targets (and optionally per-class box masks).

    Args:
        root: the year folder (``…/VOCdevkit/VOC2007``) holding JPEGImages/, Annotations/, ImageSets/.
        split: an image-set name: ``train``, ``val``, ``trainval`` or ``test``.
        transform: applied to the PIL RGB image (e.g. `e2kd_fast.data.train_transform`); None gives a
            float tensor [3, H, W] in [0, 1]. Not allowed together with ``box_size``.
        box_size: if set, every image is resized (no crop, as boxes must stay whole) to
            ``box_size × box_size``, encoded with ``encoding``, and items carry ``box_masks``.
        encoding: input encoding with ``box_size``: ``"bcos"``, ``"standard"`` or ``"none"``.

    Items: ``{"image", "target": float [20], "ignore": bool [20], "index"}`` (+ ``"box_masks"``: bool
    [20, S, S]), or None when the JPEG cannot be decoded (use `collate_skipping`). Every annotation
    is parsed at construction, so layout and annotation errors surface before training starts.

    Attributes:
        classes: `VOC_CLASSES`.
        ids: image ids in split-file order.
        annotations: the parsed annotation of every image.
        targets: [N, 20] float multi-hot; ``ignore``: [N, 20] bool (present only as difficult).
    """

    classes = list(VOC_CLASSES)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        box_size: int | None = None,
        encoding: str = "bcos",
    ) -> None:
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            years = sorted(p.name for p in self.root.glob("VOC20*") if p.is_dir()) if self.root.is_dir() else []
            hint = f"; point it at the year folder, e.g. {self.root / years[0]}" if years else ""
            raise FileNotFoundError(f"not a VOC year folder (no JPEGImages/): {self.root}{hint}")
        if box_size is not None and transform is not None:
            raise ValueError("VOCDataset: box_size resizes the image itself; pass transform=None with it")
        self.split, self.transform, self.box_size = split, transform, box_size
        self.encode = encoding_transform(encoding) if box_size is not None else None
        self.ids = read_image_set(self.root, split)
        self.annotations = [parse_voc_annotation(self.root / "Annotations" / f"{i}.xml") for i in self.ids]
        n, c = len(self.ids), len(VOC_CLASSES)
        self.targets = torch.zeros(n, c)
        easy = torch.zeros(n, c, dtype=torch.bool)
        for k, annotation in enumerate(self.annotations):
            for obj in annotation.objects:
                self.targets[k, obj.label] = 1.0
                easy[k, obj.label] |= not obj.difficult
        self.ignore = (self.targets > 0) & ~easy
        missing = [i for i in self.ids if not (self.root / "JPEGImages" / f"{i}.jpg").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images of split {split!r} are missing from {self.root / 'JPEGImages'}, "
                f"e.g. {', '.join(m + '.jpg' for m in missing[:3])}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        path = self.image_path(index)
        try:
            image = read_image(path)  # 16-bit, gray, palette and alpha images read as on every path
        except Exception as exc:  # PIL raises several types depending on the damage
            warnings.warn(f"skipping unreadable image file {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        item: dict[str, Any] = {"target": self.targets[index].clone(), "ignore": self.ignore[index].clone()}
        if self.box_size is not None:
            x = TF.pil_to_tensor(image).float().div_(255)[None]
            x = F.interpolate(x, size=(self.box_size, self.box_size), mode="bilinear", antialias=True)[0]
            item["image"] = self.encode(x.clamp(0, 1))
            item["box_masks"] = box_masks(self.annotations[index], self.box_size)
        elif self.transform is not None:
            item["image"] = self.transform(image)
        else:
            item["image"] = TF.pil_to_tensor(image).float().div_(255)
        item["index"] = index
        return item

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"


def build_bundle(cfg, train: bool = True):
    """The `DataBundle` of a ``data.dataset: voc`` config.

    Training: ``root``'s ``train_split`` image set with RandomResizedCrop + flip; validation: the
    ``val_split`` image set with Resize(eval_resize) + CenterCrop(image_size) (None if that split
    file does not exist). Box masks are for the report's localisation metrics (`VOCDataset` with
    ``box_size``), not for training.
    """
    data = cfg.data
    check_dataset_config(cfg, "voc", len(VOC_CLASSES))
    encoding = input_encoding(cfg.student.name)
    val = None
    if (Path(data.root) / "ImageSets" / "Main" / f"{data.val_split}.txt").is_file():
        val = VOCDataset(data.root, data.val_split, eval_transform(data.image_size, data.eval_resize, encoding))
    train_set = None
    if train:
        augment = {"rand_augment_ops": data.rand_augment_ops, "rand_augment_magnitude": data.rand_augment_magnitude}
        tf = train_transform(data.image_size, (data.crop_scale_min, 1.0), encoding, **augment)
        train_set = VOCDataset(data.root, data.train_split, tf)
    return DataBundle(train_set, val, None, None, list(VOC_CLASSES))


__all__ = [
    "VOCAnnotation",
    "VOCDataset",
    "VOCObject",
    "VOC_CLASSES",
    "box_masks",
    "build_bundle",
    "parse_voc_annotation",
    "read_image_set",
]
