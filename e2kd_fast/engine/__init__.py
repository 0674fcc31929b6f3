"""The training engine: the jobs that build models and run them (trainer, evaluation, precompute), the
optimisation pieces, logging, and the distribution strategies: one process, DDP, DeepSpeed ZeRO-1/2."""

from e2kd_fast.engine.builders import build_student, build_teacher, resolve_device
from e2kd_fast.engine.ddp import DDPStrategy
from e2kd_fast.engine.distributed import make_strategy
from e2kd_fast.engine.evaluate import evaluate, topk_correct
from e2kd_fast.engine.logging import MetricsLogger, read_metrics
from e2kd_fast.engine.optim import adaptive_clip_grad_, build_optimizer, warmup_cosine_factor
from e2kd_fast.engine.process_group import setup_distributed
from e2kd_fast.engine.strategy import SingleProcessStrategy, Strategy
from e2kd_fast.engine.trainer import Trainer, TrainingError, TrainingInterrupted, TrainState
from e2kd_fast.engine.zero import DeepSpeedStrategy

__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "MetricsLogger",
    "SingleProcessStrategy",
    "Strategy",
    "TrainState",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "adaptive_clip_grad_",
    "build_optimizer",
    "build_student",
    "build_teacher",
    "evaluate",
    "make_strategy",
    "read_metrics",
    "resolve_device",
    "setup_distributed",
    "topk_correct",
    "warmup_cosine_factor",
]
