"""From a `Config` to datasets: folders, held-out and few-shot splits, transforms, frozen teachers."""

from __future__ import annotations

from torch.utils.data import Dataset

from e2kd_fast.data import voc, waterbirds
from e2kd_fast.data.bundle import DataBundle, check_num_classes, input_encoding, split_indices
from e2kd_fast.data.folders import ImageFolderDataset
from e2kd_fast.data.frozen_store import FrozenStore, FrozenTeacherDataset, store_identity
from e2kd_fast.data.transforms import eval_transform, paired_train_transform, train_transform


def build_datasets(cfg, train: bool = True) -> DataBundle:
    """The training and validation data the config describes.

    Training: ``root/<train_split>`` with RandomResizedCrop(image_size, scale=(crop_scale_min, 1)) +
    flip. Validation: ``val_per_class`` images per class held out from the training split if set,
    else ``root/<val_split>`` (whose class folders must be the training ones: ValueError naming the
    missing and extra folders), with Resize(eval_resize) + CenterCrop(image_size). ``shots`` draws that
    many training images per class (from the images not held out). A frozen teacher reads its store
    and crops each stored map with its image.
    """
    data = cfg.data
    if data.dataset in ("voc", "waterbirds"):  # their own layouts: docs/datasets.md
        return (voc if data.dataset == "voc" else waterbirds).build_bundle(cfg, train)
    if data.root is None:
        raise ValueError("data.root is not set: point it at a folder with <train_split>/<class>/<images>")
    encoding = input_encoding(cfg.student.name)
    scale = (data.crop_scale_min, 1.0)
    train_tf = train_transform(
        data.image_size,
        scale,
        encoding,
        rand_augment_ops=data.rand_augment_ops,
        rand_augment_magnitude=data.rand_augment_magnitude,
    )
    train_base = ImageFolderDataset(data.root, data.train_split, transform=train_tf)
    n = len(train_base.classes)
    check_num_classes(cfg, n, f"{data.root}/{data.train_split} has {n} class folders")
    eval_tf = eval_transform(data.image_size, data.eval_resize, encoding)

    train_indices, held_out = split_indices(data, train_base.targets)
    if held_out is not None:
        val = ImageFolderDataset(data.root, data.train_split, transform=eval_tf)
    elif (train_base.root / data.val_split).is_dir():
        # The training class map: a val split with a folder less or more is an error, not shifted labels.
        val = ImageFolderDataset(data.root, data.val_split, transform=eval_tf, classes=train_base.classes)
    else:
        val = None
    if not train:
        return DataBundle(None, val, None, held_out, train_base.classes)

    train_set: Dataset = train_base
    if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
        raw = ImageFolderDataset(data.root, data.train_split, transform=None)
        store = FrozenStore.open(cfg.teacher.store, expect=store_identity(cfg, raw))
        train_set = FrozenTeacherDataset(raw, store, paired_train_transform(data.image_size, scale, encoding))
    return DataBundle(train_set, val, train_indices, held_out, train_base.classes)


__all__ = ["build_datasets"]
