"""The models and the device of a run, built from its config: student, teacher, device choice, whether the
step is compiled there (`train.compile`), and the CUDA math settings (`train.tf32`, `train.cudnn_benchmark`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from e2kd_fast.config import Config
from e2kd_fast.data.sampling import mix_seed
from e2kd_fast.models import (
    ModelArgumentError,
    ModelSpec,
    check_model_kwargs,
    create_model,
    load_checkpoint,
    model_entry,
)
from e2kd_fast.nn import set_batch_norm_groups
from e2kd_fast.nn.activation_checkpointing import enable_activation_checkpointing

# The random streams of initialisation, apart from the training step's (`mix_seed(seed, 7, step)`).
INIT_STUDENT, INIT_TEACHER, INIT_OBJECTIVE = 101, 102, 103


@contextmanager
def seeded_init(seed: int, stream: int) -> Iterator[None]:
    """Runs the block with the CPU generator seeded from ``(seed, stream)``, restoring it afterwards.

    Models are built on the CPU, so their initial weights become a function of the run's seed alone,
    whatever the process drew before; the process's own random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(mix_seed(seed, stream))
        yield


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` → CUDA when available, else CPU (queried here, never at import); ``key`` names the setting."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_compile(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """``train.compile`` for ``device``: (compile or not, a log line that says why).

    ``"auto"`` compiles on CUDA and runs eagerly elsewhere: on a CPU, compiling the step takes minutes
    (Inductor's C++ build), more than a short run gains from it; ``true`` still compiles there.
    """
    if setting == "auto":
        if device.type == "cuda":
            return True, "train.compile auto: the step is compiled on cuda"
        return False, (
            f"train.compile auto: the step runs eagerly on {device.type} (compiling takes minutes there; "
            "set train.compile: true to compile anyway)"
        )
    on = bool(setting)
    return on, f"train.compile {str(on).lower()}: the step {'is compiled' if on else 'runs eagerly'} on {device.type}"


def compile_cache_dir() -> Path:
    """The folder Inductor keeps compiled graphs and kernels in across runs; set here if unset.

    ``TORCHINDUCTOR_CACHE_DIR`` when set; otherwise ``$XDG_CACHE_HOME/e2kd-fast/inductor`` (default
    ``~/.cache/...``), exported for this process before anything compiles. Inductor's own default is
    under the temporary folder, which cluster nodes clear between jobs: a second run of the same step
    then compiles it all again (minutes) where it could load it (seconds).
    """
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "e2kd-fast", "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return Path(path)


@contextmanager
def cuda_math_settings(device: torch.device, *, tf32: bool, cudnn_benchmark: bool) -> Iterator[str | None]:
    """Applies ``train.tf32`` and ``train.cudnn_benchmark`` while the block runs, on CUDA only.

    TF32: fp32 matrix products (`torch.set_float32_matmul_precision`) and cuDNN convolutions
    (``torch.backends.cudnn.allow_tf32``) may round their inputs to TensorFloat-32; cudnn.benchmark:
    cuDNN times its algorithms per input shape and keeps the fastest. Both are process-wide flags,
    restored when the block ends, so that code run after training (tests, evaluation scripts) sees the
    process's own settings. On any other device nothing changes.

    Yields:
        A log line saying what was set, or None on a device other than CUDA.
    """
    if device.type != "cuda":
        yield None
        return
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield f"cuda: TF32 {'on' if tf32 else 'off'}, cudnn.benchmark {'on' if cudnn_benchmark else 'off'}"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def check_model_settings(cfg: Config) -> None:
    """Checks ``student`` and ``teacher`` (when named) against the model registry, before anything is built.

    Raises:
        ValueError: an unregistered ``<section>.name`` (with close matches) or a ``<section>.kwargs``
            entry the model does not take (with the arguments it takes); the message names the key.
    """
    for section in ("student", "teacher"):
        settings = getattr(cfg, section)
        if settings.name is not None:
            model_entry(settings.name, key=f"{section}.name")
            check_model_kwargs(settings.name, settings.kwargs, key=f"{section}.kwargs")


@contextmanager
def _model_errors(cfg: Config, section: str) -> Iterator[None]:
    """Names the section's settings in what building its model raises (wrong argument, wrong value)."""
    try:
        yield
    except ModelArgumentError as err:
        raise err.for_key(f"{section}.kwargs") from None
    except ValueError as err:
        settings = getattr(cfg, section)
        raise ValueError(
            f"{section}.name {settings.name!r} with num_classes={settings.num_classes} and kwargs "
            f"{dict(settings.kwargs)} cannot be built: {err}"
        ) from err


def build_student(cfg: Config) -> nn.Module:
    """The student of ``cfg.student``, its checkpoint loaded and activation checkpointing applied if configured.

    Its initial weights (those no checkpoint replaces) are seeded by ``train.seed``.
    """
    check_model_settings(cfg)
    kwargs = dict(cfg.student.kwargs)
    with _model_errors(cfg, "student"), seeded_init(cfg.train.seed, INIT_STUDENT):
        model = create_model(cfg.student.name, num_classes=cfg.student.num_classes, **kwargs)
    if cfg.student.checkpoint:
        load_checkpoint(model, cfg.student.checkpoint)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def build_teacher(cfg: Config) -> nn.Module | None:
    """The teacher in eval mode with frozen parameters, or None when the config has none.

    Without a checkpoint its weights are random, seeded by ``train.seed``.
    """
    if cfg.teacher.name is None:
        return None
    check_model_settings(cfg)
    with _model_errors(cfg, "teacher"), seeded_init(cfg.train.seed, INIT_TEACHER):
        teacher = create_model(cfg.teacher.name, num_classes=cfg.teacher.num_classes, **dict(cfg.teacher.kwargs))
    if cfg.teacher.checkpoint:
        load_checkpoint(teacher, cfg.teacher.checkpoint)
    return teacher.eval().requires_grad_(False)


def student_spec(cfg: Config, *datasets: object) -> ModelSpec:
    """What a checkpoint of ``cfg``'s student stores about it (`e2kd_fast.models.spec`): architecture,
    outputs, kwargs, input encoding, evaluation sizes and the class names of the first of ``datasets``
    that has as many as the student has outputs (a frozen-teacher dataset's through its base)."""
    spec = ModelSpec.build(
        cfg.student.name,
        cfg.student.num_classes,
        cfg.student.kwargs,
        image_size=cfg.data.image_size,
        eval_resize=cfg.data.eval_resize,
    )
    for dataset in datasets:
        classes = getattr(dataset, "classes", None) or getattr(getattr(dataset, "base", None), "classes", None)
        if classes and len(classes) == spec.num_classes:
            return dataclasses.replace(spec, classes=[str(c) for c in classes])
    return spec


def apply_batch_norm_groups(student: nn.Module, cfg: Config, world_size: int) -> str | None:
    """Sets ``train.bn_group_size`` on the student's batch norms for a ``world_size``-process run.

    Each process's micro-batch (``data.batch_size / world_size`` images) is normalised in groups of
    ``bn_group_size`` (`e2kd_fast.nn.set_batch_norm_groups`).

    Args:
        student: the model to train, before its optimiser and strategy wrap it.
        cfg: the run's config.
        world_size: processes of the launch.

    Returns:
        The line to log, or None when ``train.bn_group_size`` is not set.

    Raises:
        ValueError: the group size does not divide a process's share of the batch (names both).
    """
    size = cfg.train.bn_group_size
    if size is None:
        return None
    micro = cfg.data.batch_size // world_size
    if micro % size:
        raise ValueError(
            f"train.bn_group_size {size} does not divide the {micro} images each of the {world_size} processes "
            f"normalises (data.batch_size {cfg.data.batch_size} / {world_size})"
        )
    groups = micro // size
    layers = set_batch_norm_groups(student, groups)
    if layers == 0:
        return f"train.bn_group_size {size}: the student has no batch norm; nothing to group"
    return f"batch norm over {groups} group(s) of {size} images per process ({layers} layers)"


__all__ = [
    "INIT_OBJECTIVE",
    "INIT_STUDENT",
    "INIT_TEACHER",
    "apply_batch_norm_groups",
    "build_student",
    "build_teacher",
    "check_model_settings",
    "compile_cache_dir",
    "cuda_math_settings",
    "resolve_compile",
    "resolve_device",
    "seeded_init",
    "student_spec",
]
