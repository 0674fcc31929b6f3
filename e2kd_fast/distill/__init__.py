"""Distillation objectives: e²KD (live or frozen teacher) and its KD baseline (λ = 0)."""

from e2kd_fast.distill.objective import EXPLANATIONS, TeacherOutputs, e2kd_objective

__all__ = ["EXPLANATIONS", "TeacherOutputs", "e2kd_objective"]
