"""Distillation objectives: e²KD (live or frozen teacher), its KD baseline (λ = 0) and the feature
baselines AT, NST, AB, CAT-KD and ReviewKD (`e2kd_fast.distill.baselines`)."""

from e2kd_fast.distill.baselines import BASELINES, FeatureDistillation, build_baseline
from e2kd_fast.distill.features import Stages, forward_stages
from e2kd_fast.distill.ground_truth import ground_truth_loss
from e2kd_fast.distill.objective import EXPLANATIONS, TeacherOutputs, e2kd_objective, teacher_outputs

__all__ = [
    "BASELINES",
    "EXPLANATIONS",
    "FeatureDistillation",
    "Stages",
    "TeacherOutputs",
    "build_baseline",
    "e2kd_objective",
    "forward_stages",
    "ground_truth_loss",
    "teacher_outputs",
]
