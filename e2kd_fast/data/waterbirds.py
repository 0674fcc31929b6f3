"""Waterbirds (Sagawa et al.'s group-DRO layout): a bird class, a background place, and their group.

Layout: ``root/metadata.csv`` with the header ``img_id,img_filename,y,split,place,place_filename``
(extra columns are allowed; ``img_id`` and ``place_filename`` are not used), and the images at
``root/<img_filename>`` (e.g. ``root/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``).

- ``y``: 0 = landbird, 1 = waterbird; ``place``: 0 = land, 1 = water background.
- ``split``: 0 = train, 1 = val, 2 = test.
- group = 2·y + place (as in GTE's Waterbirds data code): 0 landbird/land, 1 landbird/water,
  2 waterbird/land, 3 waterbird/water. Groups 0 and 3 are the in-distribution combinations (the
  training correlation), 1 and 2 the out-of-distribution ones. Waterbirds-100 is the same layout with
  a training split that holds only groups 0 and 3.

Every row is checked at construction (columns, values, image files present); an error names the file,
the line and the column.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.data.bundle import DataBundle, check_dataset_config, input_encoding, split_indices
from e2kd_fast.data.folders import read_image
from e2kd_fast.data.transforms import eval_transform, train_transform

WATERBIRDS_LABELS = ("landbird", "waterbird")
WATERBIRDS_BACKGROUNDS = ("land", "water")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")


def group_of(y: int, place: int) -> int:
    """group = 2·y + place."""
    return 2 * y + place


def in_distribution(group: int) -> bool:
    """Groups 0 and 3 (place matches the bird's usual habitat) are the in-distribution ones."""
    return group in (0, 3)


@dataclass(frozen=True)
class WaterbirdsRecord:
    """One row of ``metadata.csv``."""

    filename: str
    y: int
    split: int
    place: int
    line: int  # line number in metadata.csv (the header is line 1)

    @property
    def group(self) -> int:
        return group_of(self.y, self.place)


def read_waterbirds_metadata(path: str | os.PathLike) -> list[WaterbirdsRecord]:
    """Parses a Waterbirds ``metadata.csv``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a missing column, a row with the wrong number of fields, an empty file name, or
            ``y`` / ``place`` outside {0, 1} / ``split`` outside {0, 1, 2}; named by file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Waterbirds metadata not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected the header img_id,img_filename,y,split,place,...")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}, line 1: missing column(s) {', '.join(missing)}; the header is {','.join(header)}"
            )
        col = {name: header.index(name) for name in REQUIRED_COLUMNS}
        allowed = {"y": (0, 1), "place": (0, 1), "split": (0, 1, 2)}
        records = []
        for row in reader:
            line = reader.line_num
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {line}: expected {len(header)} fields, got {len(row)}: {row!r}")
            values = {}
            for name, choices in allowed.items():
                text = row[col[name]].strip()
                try:
                    value = int(float(text))  # some copies of the file write 1.0
                except (ValueError, OverflowError):
                    value = None
                if value not in choices or (value is not None and float(text) != value):
                    raise ValueError(
                        f"{path}, line {line}, column {name!r}: expected one of {', '.join(map(str, choices))}, "
                        f"got {text!r}"
                    )
                values[name] = value
            filename = row[col["img_filename"]].strip()
            if not filename:
                raise ValueError(f"{path}, line {line}, column 'img_filename': empty file name")
            records.append(WaterbirdsRecord(filename, values["y"], values["split"], values["place"], line))
    if not records:
        raise ValueError(f"{path}: no rows after the header")
    return records


class WaterbirdsDataset(Dataset):
    """One split of Waterbirds.

    Args:
        root: folder with ``metadata.csv`` and the images.
        split: ``"train"``, ``"val"`` or ``"test"`` (or the codes 0, 1, 2).
        transform: applied to the PIL RGB image; None gives a float tensor [3, H, W] in [0, 1].

    Items: ``{"image", "target": y, "place", "group": 2·y + place, "index"}``, or None when the image
    cannot be decoded (use `collate_skipping`).

    Attributes:
        classes: ``["landbird", "waterbird"]``.
        records: the rows of this split, in file order.
        targets, places, groups: [N] int64.
    """

    classes = list(WATERBIRDS_LABELS)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | int = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        if isinstance(split, str):
            if split not in SPLIT_CODES:
                raise ValueError(f"unknown Waterbirds split {split!r}; allowed: {', '.join(SPLIT_CODES)}")
            code = SPLIT_CODES[split]
        elif split in SPLIT_CODES.values():
            code = split
        else:
            raise ValueError(f"unknown Waterbirds split code {split!r}; allowed: 0 (train), 1 (val), 2 (test)")
        self.split, self.transform = split, transform
        metadata = self.root / "metadata.csv"
        self.records = [r for r in read_waterbirds_metadata(metadata) if r.split == code]
        if not self.records:
            raise ValueError(f"{metadata}: no rows with split {code} ({split!r})")
        missing = [r for r in self.records if not (self.root / r.filename).is_file()]
        if missing:
            shown = ", ".join(f"{self.root / r.filename} (line {r.line})" for r in missing[:3])
            raise FileNotFoundError(f"{len(missing)} images listed in {metadata} are missing, e.g. {shown}")
        self.targets = torch.tensor([r.y for r in self.records], dtype=torch.long)
        self.places = torch.tensor([r.place for r in self.records], dtype=torch.long)
        self.groups = 2 * self.targets + self.places

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        record = self.records[index]
        path = self.root / record.filename
        try:
            image = read_image(path)  # 16-bit, gray, palette and alpha images read as on every path
        except Exception as exc:  # PIL raises several types depending on the damage
            warnings.warn(f"skipping unreadable image file {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        image = self.transform(image) if self.transform is not None else TF.pil_to_tensor(image).float().div_(255)
        return {"image": image, "target": record.y, "place": record.place, "group": record.group, "index": index}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"


def build_bundle(cfg, train: bool = True):
    """The `DataBundle` of a ``data.dataset: waterbirds`` config.

    ``train_split`` / ``val_split`` name metadata splits (``train``, ``val``, ``test``). As for image
    folders, ``val_per_class`` holds images per class out of the training split (then ``val_split``
    is not used), and ``shots`` draws that many training images per class.
    """
    data = cfg.data
    check_dataset_config(cfg, "waterbirds", len(WATERBIRDS_LABELS))
    encoding = input_encoding(cfg.student.name)
    eval_tf = eval_transform(data.image_size, data.eval_resize, encoding)
    augment = {"rand_augment_ops": data.rand_augment_ops, "rand_augment_magnitude": data.rand_augment_magnitude}
    train_tf = train_transform(data.image_size, (data.crop_scale_min, 1.0), encoding, **augment)
    train_base = WaterbirdsDataset(data.root, data.train_split, train_tf)
    train_indices, held_out = split_indices(data, train_base.targets)
    val = WaterbirdsDataset(data.root, data.train_split if held_out is not None else data.val_split, eval_tf)
    if not train:
        return DataBundle(None, val, None, held_out, list(WATERBIRDS_LABELS))
    return DataBundle(train_base, val, train_indices, held_out, list(WATERBIRDS_LABELS))


__all__ = [
    "SPLIT_CODES",
    "WATERBIRDS_BACKGROUNDS",
    "WATERBIRDS_LABELS",
    "WaterbirdsDataset",
    "WaterbirdsRecord",
    "build_bundle",
    "group_of",
    "in_distribution",
    "read_waterbirds_metadata",
]
