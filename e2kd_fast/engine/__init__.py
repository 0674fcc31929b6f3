"""The training engine: trainer, evaluation, optimisation pieces, deterministic sampling, logging."""

from e2kd_fast.engine.evaluate import evaluate, topk_correct
from e2kd_fast.engine.logging import MetricsLogger, read_metrics
from e2kd_fast.engine.optim import adaptive_clip_grad_, build_optimizer, warmup_cosine_factor
from e2kd_fast.engine.sampling import EpochSampler, SeededDataset, mix_seed
from e2kd_fast.engine.trainer import Trainer, TrainingError, TrainState, build_student, build_teacher

__all__ = [
    "EpochSampler",
    "MetricsLogger",
    "SeededDataset",
    "TrainState",
    "Trainer",
    "TrainingError",
    "adaptive_clip_grad_",
    "build_optimizer",
    "build_student",
    "build_teacher",
    "evaluate",
    "mix_seed",
    "read_metrics",
    "topk_correct",
    "warmup_cosine_factor",
]
