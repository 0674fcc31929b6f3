"""Data: image folders that skip unreadable files, splits, transforms (paired geometry), synthetic sets.

- `folders`: `ImageFolderDataset` (``root/<split>/<class>/<file>``, optional masks) and `collate_skipping`.
- `splits`: `held_out_split` (validation images per class) and `few_shot_indices`, each drawn as the
  official code draws them or per class (`official_visit_order`).
- `transforms`: the zoo's train/eval presets with the B-cos or standard encoding, and paired transforms
  that apply one crop/flip to an image and its masks or frozen explanation maps.
- `synthetic`: the built-in shapes data set; `waterbirds_synthetic`: a Waterbirds-like task with masks.
"""

from e2kd_fast.data.folders import IMAGE_EXTENSIONS, ImageFolderDataset, collate_skipping
from e2kd_fast.data.splits import few_shot_indices, held_out_split, official_visit_order
from e2kd_fast.data.synthetic import SHAPE_CLASSES, shapes_dataset
from e2kd_fast.data.transforms import (
    ENCODINGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairedRandomResizedCropFlip,
    PairedResizeCenterCrop,
    PairedTransform,
    center_crop_box,
    encoding_transform,
    eval_transform,
    paired_eval_transform,
    paired_train_transform,
    random_resized_crop_box,
    resized_crop_relative,
    train_transform,
)
from e2kd_fast.data.waterbirds_synthetic import (
    DEFAULT_PER_SPLIT,
    WATERBIRDS_CLASSES,
    WATERBIRDS_PLACES,
    WATERBIRDS_SPLITS,
    generate_waterbirds_like,
    make_waterbirds_like_split,
    waterbirds_places,
)

__all__ = [
    "DEFAULT_PER_SPLIT",
    "ENCODINGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "PairedRandomResizedCropFlip",
    "PairedResizeCenterCrop",
    "PairedTransform",
    "SHAPE_CLASSES",
    "WATERBIRDS_CLASSES",
    "WATERBIRDS_PLACES",
    "WATERBIRDS_SPLITS",
    "center_crop_box",
    "collate_skipping",
    "encoding_transform",
    "eval_transform",
    "few_shot_indices",
    "generate_waterbirds_like",
    "held_out_split",
    "official_visit_order",
    "make_waterbirds_like_split",
    "paired_eval_transform",
    "paired_train_transform",
    "random_resized_crop_box",
    "resized_crop_relative",
    "shapes_dataset",
    "train_transform",
    "waterbirds_places",
]
