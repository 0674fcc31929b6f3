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
    GhostBatchNorm2d,
    batch_norm_group_indices,
    make_norm2d,
    set_batch_norm_groups,
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
    "GhostBatchNorm2d",
    "LogitLayer",
    "NormedConv2d",
    "NormedLinear",
    "batch_norm_group_indices",
    "explanation_mode",
    "make_norm2d",
    "set_batch_norm_groups",
]
