"""The models and the device of a run, built from its config: student, teacher, device choice."""

from __future__ import annotations

import torch
from torch import nn

from e2kd_fast.config import Config
from e2kd_fast.models import create_model, load_checkpoint
from e2kd_fast.nn.checkpointing import enable_activation_checkpointing


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` → CUDA when available, else CPU (queried here, never at import); ``key`` names the setting."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_student(cfg: Config) -> nn.Module:
    """The student of ``cfg.student``, its checkpoint loaded and activation checkpointing applied if configured."""
    kwargs = dict(cfg.student.kwargs)
    model = create_model(cfg.student.name, num_classes=cfg.student.num_classes, **kwargs)
    if cfg.student.checkpoint:
        load_checkpoint(model, cfg.student.checkpoint)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def build_teacher(cfg: Config) -> nn.Module | None:
    """The teacher in eval mode with frozen parameters, or None when the config has none."""
    if cfg.teacher.name is None:
        return None
    teacher = create_model(cfg.teacher.name, num_classes=cfg.teacher.num_classes, **dict(cfg.teacher.kwargs))
    if cfg.teacher.checkpoint:
        load_checkpoint(teacher, cfg.teacher.checkpoint)
    return teacher.eval().requires_grad_(False)


__all__ = ["build_student", "build_teacher", "resolve_device"]
