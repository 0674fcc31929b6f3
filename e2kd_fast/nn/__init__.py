"""B-cos building blocks: layers, no-bias norms, the 6-channel encoding, explanation mode."""

from e2kd_fast.nn.bcos import BcosConv2d, BcosLinear, NormedConv2d, NormedLinear
from e2kd_fast.nn.explanation import DynamicLinearModule, explanation_mode
from e2kd_fast.nn.layers import AddInverse, LogitLayer
from e2kd_fast.nn.norms import (
    BatchNormUncentered2d,
    DetachableGNLayerNorm2d,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
    DetachablePositionNorm2d,
    make_norm2d,
)

__all__ = [
    "AddInverse",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosLinear",
    "DetachableGNLayerNorm2d",
    "DetachableGroupNorm2d",
    "DetachableLayerNorm",
    "DetachablePositionNorm2d",
    "DynamicLinearModule",
    "LogitLayer",
    "NormedConv2d",
    "NormedLinear",
    "explanation_mode",
    "make_norm2d",
]
