"""What a run's data is: the dataset bundle, the input encoding, the splits and the checks every reader shares."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import Dataset

from e2kd_fast.data.splits import few_shot_indices, held_out_split
from e2kd_fast.models import model_entry


@dataclass
class DataBundle:
    """The datasets of a run. Indices select the images used (None: all of them)."""

    train: Dataset | None
    val: Dataset | None
    train_indices: Tensor | None
    val_indices: Tensor | None
    classes: list[str]


def input_encoding(model_name: str, key: str = "student.name") -> str:
    """``"bcos"`` ([x, 1 − x], no mean/std) for B-cos models, ``"standard"`` (ImageNet mean/std) otherwise.

    ``key`` names the setting ``model_name`` came from, in the error for an unregistered name.
    """
    return "bcos" if model_entry(model_name, key=key).family == "bcos" else "standard"


def split_indices(data, targets: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(training indices, held-out validation indices) from ``data.val_per_class`` and ``data.shots``.

    ``val_per_class`` holds that many images per class out of the training split; ``shots`` then draws
    that many training images per class from the rest; both the way ``data.subset_draw`` names. None
    where the option is not set.
    """
    train_indices = held_out = None
    if data.val_per_class:
        train_indices, held_out = held_out_split(targets, data.val_per_class, data.val_seed, draw=data.subset_draw)
    if data.shots:
        train_indices = few_shot_indices(targets, data.shots, data.shot_seed, exclude=held_out, draw=data.subset_draw)
    return train_indices, held_out


def check_dataset_config(cfg, dataset: str, num_classes: int) -> None:
    """What the VOC and Waterbirds readers share: a root, no frozen store, matching class counts."""
    if cfg.data.root is None:
        raise ValueError(f"data.root is not set: data.dataset {dataset!r} needs the data set folder (docs/datasets.md)")
    if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
        raise ValueError(f"teacher.mode 'frozen' is not supported with data.dataset {dataset!r}; use a live teacher")
    check_num_classes(cfg, num_classes, f"data.dataset {dataset!r} has {num_classes} classes")


def check_num_classes(cfg, num_classes: int, data_has: str) -> None:
    """Raises unless the student's and the teacher's outputs equal the data's classes; ``data_has`` ends the message.

    An unset ``num_classes`` stands for the model's default (1000 for ImageNet models), which must
    match as well: a 1000-way student trains without error on 10 classes, and silently wrong.
    """
    for section in ("student", "teacher"):
        settings = getattr(cfg, section)
        if settings.name is None:
            continue
        if settings.num_classes is not None:
            if settings.num_classes != num_classes:
                raise ValueError(f"{section}.num_classes is {settings.num_classes} but {data_has}")
            continue
        default = model_entry(settings.name, key=f"{section}.name").default_num_classes
        if default != num_classes:
            raise ValueError(
                f"{section}.num_classes is {default} (the model's default) but {data_has}: set {section}.num_classes"
            )


__all__ = ["DataBundle", "check_dataset_config", "check_num_classes", "input_encoding", "split_indices"]
