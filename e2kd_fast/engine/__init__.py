"""The training engine: trainer, evaluation, optimisation pieces, deterministic sampling, logging, and the
single / DDP / DeepSpeed back ends (`e2kd_fast.engine.distributed`)."""

from e2kd_fast.engine.distributed import (
    DDPBackend,
    DeepSpeedBackend,
    DistributedBackend,
    ShardedEpochSampler,
    SingleBackend,
    setup_distributed,
)
from e2kd_fast.engine.evaluate import evaluate, topk_correct
from e2kd_fast.engine.logging import MetricsLogger, read_metrics
from e2kd_fast.engine.optim import adaptive_clip_grad_, build_optimizer, warmup_cosine_factor
from e2kd_fast.engine.sampling import EpochSampler, SeededDataset, mix_seed
from e2kd_fast.engine.trainer import Trainer, TrainingError, TrainState, build_student, build_teacher

__all__ = [
    "DDPBackend",
    "DeepSpeedBackend",
    "DistributedBackend",
    "EpochSampler",
    "MetricsLogger",
    "SeededDataset",
    "ShardedEpochSampler",
    "SingleBackend",
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
    "setup_distributed",
    "topk_correct",
    "warmup_cosine_factor",
]
