"""From a `Config` to datasets: folders, held-out and few-shot splits, transforms, frozen teachers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from e2kd_fast.data.folders import ImageFolderDataset
from e2kd_fast.data.splits import few_shot_indices, held_out_split
from e2kd_fast.data.transforms import encoding_transform, eval_transform, paired_train_transform, train_transform


@dataclass
class DataBundle:
    """The datasets of a run. Indices select the images used (None: all of them)."""

    train: Dataset | None
    val: Dataset | None
    train_indices: Tensor | None
    val_indices: Tensor | None
    classes: list[str]


def input_encoding(model_name: str) -> str:
    """``"bcos"`` ([x, 1 − x], no mean/std) for B-cos models, ``"standard"`` (ImageNet mean/std) otherwise."""
    from e2kd_fast.models import model_entry

    return "bcos" if model_entry(model_name).family == "bcos" else "standard"


def build_datasets(cfg, train: bool = True) -> DataBundle:
    """The training and validation data the config describes.

    Training: ``root/<train_split>`` with RandomResizedCrop(image_size, scale=(crop_scale_min, 1)) +
    flip. Validation: ``val_per_class`` images per class held out from the training split if set,
    else ``root/<val_split>``, with Resize(eval_resize) + CenterCrop(image_size). ``shots`` draws that
    many training images per class (from the images not held out). A frozen teacher reads its store
    and crops each stored map with its image.
    """
    data = cfg.data
    if data.dataset in ("voc", "waterbirds"):  # their own layouts: docs/datasets.md
        from e2kd_fast.data import voc, waterbirds

        return (voc if data.dataset == "voc" else waterbirds).build_bundle(cfg, train)
    if data.root is None:
        raise ValueError("data.root is not set: point it at a folder with <train_split>/<class>/<images>")
    encoding = input_encoding(cfg.student.name)
    scale = (data.crop_scale_min, 1.0)
    train_base = ImageFolderDataset(
        data.root, data.train_split, transform=train_transform(data.image_size, scale, encoding)
    )
    n = len(train_base.classes)
    _check_num_classes(cfg, n, f"{data.root}/{data.train_split} has {n} class folders")
    eval_tf = eval_transform(data.image_size, data.eval_resize, encoding)

    train_indices, held_out = split_indices(data, train_base.targets)
    if held_out is not None:
        val = ImageFolderDataset(data.root, data.train_split, transform=eval_tf)
    elif (train_base.root / data.val_split).is_dir():
        val = ImageFolderDataset(data.root, data.val_split, transform=eval_tf)
    else:
        val = None
    if not train:
        return DataBundle(None, val, None, held_out, train_base.classes)

    train_set: Dataset = train_base
    if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
        from e2kd_fast.data.frozen_store import FrozenStore, FrozenTeacherDataset, store_identity

        raw = ImageFolderDataset(data.root, data.train_split, transform=None)
        store = FrozenStore.open(cfg.teacher.store, expect=store_identity(cfg, raw))
        train_set = FrozenTeacherDataset(raw, store, paired_train_transform(data.image_size, scale, encoding))
    return DataBundle(train_set, val, train_indices, held_out, train_base.classes)


def split_indices(data, targets: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(training indices, held-out validation indices) from ``data.val_per_class`` and ``data.shots``.

    ``val_per_class`` holds that many images per class out of the training split; ``shots`` then draws
    that many training images per class from the rest. None where the option is not set.
    """
    train_indices = held_out = None
    if data.val_per_class:
        train_indices, held_out = held_out_split(targets, data.val_per_class, data.val_seed)
    if data.shots:
        train_indices = few_shot_indices(targets, data.shots, data.shot_seed, exclude=held_out)
    return train_indices, held_out


def check_dataset_config(cfg, dataset: str, num_classes: int) -> None:
    """What the VOC and Waterbirds readers share: a root, no frozen store, matching class counts."""
    if cfg.data.root is None:
        raise ValueError(f"data.root is not set: data.dataset {dataset!r} needs the data set folder (docs/datasets.md)")
    if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
        raise ValueError(f"teacher.mode 'frozen' is not supported with data.dataset {dataset!r}; use a live teacher")
    _check_num_classes(cfg, num_classes, f"data.dataset {dataset!r} has {num_classes} classes")


class FullImageDataset(Dataset):
    """The whole image resized to S × S (no crop) and encoded: what a frozen teacher explains.

    Items: ``image`` [6 or 3, S, S], ``target``, ``index``; None for an unreadable image.
    """

    def __init__(self, base: ImageFolderDataset, size: int, encoding: str) -> None:
        self.base, self.size, self.encode = base, size, encoding_transform(encoding)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.base[index]
        if item is None:
            return None
        image = F.interpolate(item["image"][None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return {"image": self.encode(image.clamp(0, 1)), "target": item["target"], "index": index}


def full_image_dataset(cfg, teacher_family: str) -> FullImageDataset:
    """The training split as the frozen teacher sees it (see `e2kd_fast.data.frozen_store`)."""
    if cfg.data.root is None:
        raise ValueError("data.root is not set")
    base = ImageFolderDataset(cfg.data.root, cfg.data.train_split, transform=None)
    return FullImageDataset(base, cfg.data.image_size, "bcos" if teacher_family == "bcos" else "standard")


def _check_num_classes(cfg, num_classes: int, data_has: str) -> None:
    """Raises unless student/teacher ``num_classes`` (where set) equal the data's; ``data_has`` ends the message."""
    for section in ("student", "teacher"):
        expected = getattr(cfg, section).num_classes
        if expected is not None and expected != num_classes:
            raise ValueError(f"{section}.num_classes is {expected} but {data_has}")


__all__ = [
    "DataBundle",
    "FullImageDataset",
    "build_datasets",
    "check_dataset_config",
    "full_image_dataset",
    "input_encoding",
    "split_indices",
]
