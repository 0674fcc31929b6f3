"""Metrics beyond accuracy: localisation (EPG, IoU, GridPG), shift equivariance, distance correlation,
UniCAM with its Feature Similarity and Relevance Scores. Definitions and choices: docs/metrics.md."""

from e2kd_fast.metrics import dcor
from e2kd_fast.metrics.dcor import (
    distance_correlation,
    distance_correlation_sqr,
    distance_covariance_sqr,
    partial_distance_correlation,
    partial_distance_covariance,
    semi_partial_distance_correlation,
)
from e2kd_fast.metrics.localisation import (
    GridImages,
    boxes_to_mask,
    energy_pointing_game,
    evaluate_grid_pointing_game,
    grid_pointing_game,
    iou,
    make_grid_images,
)
from e2kd_fast.metrics.shift import shift_equivariance
from e2kd_fast.metrics.unicam import (
    distilled_feature_map,
    feature_similarity,
    feature_similarity_score,
    label_embedding,
    relevance_score,
    residual_feature_map,
    unicam,
)

__all__ = [
    "GridImages",
    "boxes_to_mask",
    "dcor",
    "distance_correlation",
    "distance_correlation_sqr",
    "distance_covariance_sqr",
    "distilled_feature_map",
    "energy_pointing_game",
    "evaluate_grid_pointing_game",
    "feature_similarity",
    "feature_similarity_score",
    "grid_pointing_game",
    "iou",
    "label_embedding",
    "make_grid_images",
    "partial_distance_correlation",
    "partial_distance_covariance",
    "relevance_score",
    "residual_feature_map",
    "semi_partial_distance_correlation",
    "shift_equivariance",
    "unicam",
]
