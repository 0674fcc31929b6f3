"""Data: built-in synthetic data sets (ImageNet-style folders and pipelines come with the engine)."""

from e2kd_fast.data.synthetic import SHAPE_CLASSES, shapes_dataset

__all__ = ["SHAPE_CLASSES", "shapes_dataset"]
