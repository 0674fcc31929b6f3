"""Training configuration: frozen dataclasses, validated on construction; YAML only serialises them.

A run is described by one `Config` with six sections::

    student  ModelConfig     the model being trained
    teacher  TeacherConfig   the teacher (live, or frozen: explanations read from a precomputed store)
    distill  DistillConfig   the objective: KD, e²KD or plain supervised training
    optim    OptimConfig     optimiser, schedule and gradient clipping (AGC for B-cos students)
    data     DataConfig      dataset, splits, few-shot sampling, augmentation and batch sizes
    train    TrainConfig     epochs, precision, device, checkpoints and logging
    engine   EngineConfig    distribution: single device, DDP or DeepSpeed ZeRO-1/2

Every section checks its own fields in ``__post_init__`` (types, allowed values, ranges) and `Config`
checks the combinations, so an invalid configuration cannot exist. Errors are ``ValueError`` naming
the dotted key (``optim.lr``) and what is allowed.

YAML files hold the same nested mapping. A file may start from others with a top-level
``base: other.yaml`` (or a list of files), paths relative to the file: the bases are loaded first and
the file's own content is deep-merged over them. Overrides (``optim.lr=3e-4``) come last::

    cfg = load_config("configs/imagenet_bcos_r18_from_d169_e2kd.yaml", ["optim.lr=3e-4"])
    save_config(cfg, "runs/x/config.yaml")  # the resolved config; load_config reads it back equal
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "EngineConfig",
    "ModelConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

TeacherMode = Literal["live", "frozen"]
DistillMethod = Literal["kd", "e2kd", "none", "at", "nst", "ab", "catkd", "reviewkd"]

# Feature-based KD baselines (e2kd_fast.distill.baselines, docs/baselines.md): the paper-default weight
# of each method's feature term and its options with their defaults (seeds_other_systems.md section 3).
BASELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "at": {"weight": 1000.0, "p": 2.0},
    "nst": {"weight": 50.0},
    "ab": {"weight": 1.0, "margin": 1.0, "init_epochs": 30},
    "catkd": {"weight": 0.5, "pool_size": 4, "normalize": False},
    "reviewkd": {"weight": 1.0, "warmup_epochs": 20, "max_mid_channels": 512},
}
ExplanationKind = Literal["bcos", "gradcam"]
OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["cosine", "constant"]
ScheduleUnit = Literal["epoch", "step"]
DatasetKind = Literal["folder", "synthetic", "voc", "waterbirds"]
LoaderName = Literal["torchvision", "dali", "auto"]
Precision = Literal["fp32", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda"]
BackendName = Literal["single", "ddp", "deepspeed"]
DistBackendName = Literal["auto", "nccl", "gloo"]

# Architectures whose stages e2kd_fast.distill.features knows, by name prefix.
_FEATURE_ARCHS = ("bcos_resnet", "bcos_resnext", "bcos_densenet", "bcos_vit", "resnet", "densenet")

# B-cos models are recognised by name; the registry (`e2kd_fast.models`) follows this convention and
# importing it here would pull torch into what is otherwise a plain-data module.
_BCOS_PREFIX = "bcos_"


# ----------------------------------------------------------------------------------------------------------------------
# Field checking shared by every section
# ----------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error message: ``float``, ``int or None``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_plain_data(key: str, value: Any) -> None:
    """Raises unless ``value`` is YAML-serialisable plain data (so that save → load gives it back)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value!r}")
        return
    if isinstance(value, list):  # not tuples: YAML has no tuple, so one would come back as a list
        for i, item in enumerate(value):
            _check_plain_data(f"{key}[{i}]", item)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{key}: keys must be strings, got {k!r}")
            _check_plain_data(f"{key}.{k}", item)
        return
    raise ValueError(f"{key}: expected plain data (str, int, float, bool, None, list, mapping), got {value!r}")


def _check_type(key: str, value: Any, tp: Any, expected: str | None = None) -> Any:
    """Returns ``value`` converted to the annotation ``tp`` (int → float, mapping copied), or raises ValueError.

    ``expected`` is how the type reads in a mismatch message (for the arm of ``X | None``: ``float or None``).
    """
    expected = expected or _type_name(tp)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (arm,) = (a for a in args if a is not type(None))  # the schema only uses ``X | None``
        if value is None:
            raise ValueError(f"{key}: expected {expected}, got None")
        return _check_type(key, value, arm, expected)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    # bool is an int subclass: `true` is not an epoch count, and `1` is not a switch.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, Mapping),
    }[tp]
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number, got {value!r}")
    if tp is dict:
        _check_plain_data(key, value)
        value = copy.deepcopy(dict(value))  # the config owns its copy; the caller's dict can change freely
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section (the module uses postponed, string annotations)."""
    return typing.get_type_hints(cls)


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}; got {value!r}")


class _Section:
    """Mixin of the section dataclasses: type checks every field, then runs the section's `_validate`."""

    _section = ""  # the key of the section in `Config` and in YAML, used in error messages

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            key, value, tp = f"{self._section}.{f.name}", getattr(self, f.name), hints[f.name]
            if typing.get_origin(tp) is list:  # ``list[X]``: checked element by element
                if not isinstance(value, list | tuple):
                    raise ValueError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
                (arm,) = typing.get_args(tp)
                value = [_check_type(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
            else:
                value = _check_type(key, value, tp)
            object.__setattr__(self, f.name, value)  # frozen: normalise (int → float) in place once
        self._validate()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}"

    def _positive(self, *names: str, allow_zero: bool = False, optional: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            ok = value >= 0 if allow_zero else value > 0
            _require(ok, self._key(name), "must be >= 0" if allow_zero else "must be > 0", value)

    def _validate(self) -> None:  # pragma: no cover - every section overrides it
        pass


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The student model.

    Attributes:
        name: a name from `e2kd_fast.models.list_models()`, e.g. ``"bcos_resnet18"`` or ``"resnet18"``.
        num_classes: number of outputs; None takes the model's default (1000 for ImageNet models).
        checkpoint: weights to start from (any format `load_checkpoint` accepts); None = fresh weights.
        kwargs: extra keyword arguments of `create_model`, e.g. ``{"norm": "bnu", "b": 2}``. A plain
            dict (so it serialises as it is); treat it as read-only. It takes no part in the hash.
    """

    _section = "student"

    name: str
    num_classes: int | None = None
    checkpoint: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        _require(bool(self.name.strip()), self._key("name"), "must be a model name", self.name)
        self._positive("num_classes", optional=True)
        _require(self.checkpoint != "", self._key("checkpoint"), "must be a path or None", self.checkpoint)


@dataclass(frozen=True)
class TeacherConfig(_Section):
    """The teacher.

    Attributes:
        name: a registered model name; None = no teacher (only with ``distill.method: none``).
        checkpoint: the teacher's weights (the official B-cos release files, torchvision files, ...).
        num_classes: number of outputs; None takes the model's default.
        mode: ``"live"`` runs the teacher on every augmented batch; ``"frozen"`` reads its logits and
            explanations, computed once per training image, from ``store`` (spec section 3.6).
        store: folder of the precomputed frozen-explanation store; required when ``mode == "frozen"``.
        kwargs: extra keyword arguments of `create_model`, as ``student.kwargs`` (e.g. ``{"norm": "pn"}``
            for a teacher file saved from the official CIFAR entry points).
    """

    _section = "teacher"

    name: str | None = None
    checkpoint: str | None = None
    num_classes: int | None = None
    mode: TeacherMode = "live"
    store: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        _require(
            self.name is None or bool(self.name.strip()), self._key("name"), "must be a model name or None", self.name
        )
        self._positive("num_classes", optional=True)
        _require(self.checkpoint != "", self._key("checkpoint"), "must be a path or None", self.checkpoint)
        if self.checkpoint is not None and self.name is None:
            raise ValueError(f"teacher.checkpoint is set ({self.checkpoint!r}) but teacher.name is None")
        if self.mode == "frozen" and not self.store:
            raise ValueError(
                "teacher.mode 'frozen' requires teacher.store, the folder of the precomputed teacher "
                f"explanations; got {self.store!r}"
            )


@dataclass(frozen=True)
class DistillConfig(_Section):
    """The objective ``L = gt_coef·L_gt + τ²·KL(p_T ‖ p_S) + lam·(1 − cos(E_S, E_T))`` (spec section 3.1).

    Attributes:
        method: ``"e2kd"`` (logits and explanations), ``"kd"`` (logits only; ``lam`` is ignored) or
            ``"none"`` (plain supervised training on the labels; no teacher needed).
        tau: KD temperature τ (> 0).
        lam: weight λ of the explanation loss (>= 0); λ = 0 turns e²KD into KD.
        explanation: ``"bcos"`` (dynamic weights, B-cos models) or ``"gradcam"`` (standard models).
        gt_coef: weight of the ground-truth label loss in KD / e²KD (every paper config uses 0).
        guided_step_interval: compute the explanation loss on every K-th step only (spec section 3.3).
        multilabel: multi-label targets (PASCAL VOC): the KD term is the per-class sigmoid KL of
            `e2kd_fast.distill.multilabel.multilabel_kd` instead of the softmax KL; the explained class
            stays the teacher's top-1 logit. Must be set exactly when ``data.dataset == "voc"``.
        feature_weight: weight of the feature term of a baseline method (``at``, ``nst``, ``ab``,
            ``catkd``, ``reviewkd``; docs/baselines.md); None = the paper default in `BASELINE_DEFAULTS`.
        kd_coef: weight of an added τ²·KL term in a baseline's loss (0 = the papers' CE + feature loss).
        feature_options: the baseline's options (keys and defaults in `BASELINE_DEFAULTS`, e.g.
            ``{pool_size: 4}`` for CAT-KD); a plain dict, read-only.
    """

    _section = "distill"

    method: DistillMethod = "e2kd"
    tau: float = 1.0
    lam: float = 1.0
    explanation: ExplanationKind = "bcos"
    gt_coef: float = 0.0
    guided_step_interval: int = 1
    multilabel: bool = False
    feature_weight: float | None = None
    kd_coef: float = 0.0
    feature_options: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        self._positive("tau", "guided_step_interval")
        self._positive("lam", "gt_coef", allow_zero=True)
        self._validate_baseline()

    def _validate_baseline(self) -> None:
        """Baseline-only keys are errors elsewhere; option names and values are checked against the table."""
        self._positive("kd_coef", allow_zero=True)
        self._positive("feature_weight", allow_zero=True, optional=True)
        defaults = BASELINE_DEFAULTS.get(self.method)
        if defaults is None:
            for name, unset in (("feature_weight", None), ("kd_coef", 0.0), ("feature_options", {})):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"distill.{name} is set ({getattr(self, name)!r}) but is used only by the feature baselines "
                        f"({', '.join(BASELINE_DEFAULTS)}); distill.method is {self.method!r}"
                    )
            return
        if self.gt_coef != 0:
            raise ValueError(
                f"distill.gt_coef is {self.gt_coef!r}, but baseline method {self.method!r} always weighs its label "
                "loss by 1 (the papers' recipe); set distill.gt_coef to 0"
            )
        allowed = [k for k in defaults if k != "weight"]
        for key, value in self.feature_options.items():
            if key not in allowed:
                raise _unknown_key(f"distill.feature_options.{key}", allowed or ["(none)"], f"method {self.method!r}")
            default = defaults[key]
            kind = type(default)
            ok = isinstance(value, bool) if kind is bool else isinstance(value, kind | (int if kind is float else kind))
            if not ok or (kind is not bool and isinstance(value, bool)):
                raise ValueError(
                    f"distill.feature_options.{key}: expected {kind.__name__} (default {default!r}), got {value!r}"
                )
            if kind is not bool and value <= 0 and key != "init_epochs":
                raise ValueError(f"distill.feature_options.{key}: must be > 0; got {value!r}")
            if key == "init_epochs" and value < 0:
                raise ValueError(f"distill.feature_options.init_epochs: must be >= 0; got {value!r}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimiser, learning-rate schedule and gradient clipping.

    Attributes:
        name: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: peak learning rate.
        weight_decay: weight decay (decoupled for AdamW, L2 for Adam and SGD).
        momentum: SGD momentum (ignored by Adam/AdamW).
        warmup_epochs: linear warm-up length in epochs when ``schedule_unit == "epoch"``.
        warmup_start_factor: the warm-up starts at this fraction of ``lr``.
        schedule: ``"cosine"`` (to 0 at the end of training) or ``"constant"``, after the warm-up.
        schedule_unit: ``"epoch"`` updates the rate once per epoch (B-cos ResNet recipe), ``"step"``
            after every optimiser step (ViT recipe).
        warmup_steps: linear warm-up length in optimiser steps when ``schedule_unit == "step"``.
        agc: adaptive gradient clipping (unit-wise), as every B-cos recipe uses.
        agc_clip: AGC clip factor.
        agc_eps: AGC floor on the parameter norm.
        grad_clip_norm: clip the global gradient norm to this value; None = no clipping.
    """

    _section = "optim"

    name: OptimizerName = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.01
    schedule: ScheduleName = "cosine"
    schedule_unit: ScheduleUnit = "epoch"
    warmup_steps: int = 0
    agc: bool = True
    agc_clip: float = 0.01
    agc_eps: float = 1e-3
    grad_clip_norm: float | None = None

    def _validate(self) -> None:
        self._positive("lr", "agc_clip", "agc_eps")
        self._positive("weight_decay", "warmup_epochs", "warmup_steps", allow_zero=True)
        self._positive("grad_clip_norm", optional=True)
        _require(0 <= self.momentum < 1, self._key("momentum"), "must be in [0, 1)", self.momentum)
        _require(
            0 < self.warmup_start_factor <= 1,
            self._key("warmup_start_factor"),
            "must be in (0, 1]",
            self.warmup_start_factor,
        )
        if self.schedule_unit == "epoch" and self.warmup_steps != 0:
            # Silently ignoring a step warm-up would train a different schedule than the file says.
            raise ValueError(
                f"optim.warmup_steps is {self.warmup_steps} but is used only with optim.schedule_unit 'step'; "
                "with 'epoch' set optim.warmup_epochs instead"
            )


@dataclass(frozen=True)
class DataConfig(_Section):
    """Dataset, splits and augmentation.

    Attributes:
        root: dataset folder (ImageFolder layout: ``<root>/<split>/<class>/<image>``); unused by
            ``"synthetic"``.
        dataset: ``"folder"``, ``"synthetic"`` (the built-in shapes data), ``"voc"`` (PASCAL VOC: ``root``
            is the year folder with JPEGImages/, Annotations/, ImageSets/Main/; splits are image-set
            names such as ``trainval`` and ``test``) or ``"waterbirds"`` (``root`` holds
            ``metadata.csv``; splits ``train``, ``val``, ``test``). See docs/datasets.md.
        train_split, val_split: sub-folders of ``root``. With ``val_per_class`` set, ``val_split`` is
            the final test split and model selection uses the held-out train images.
        image_size: training crop (RandomResizedCrop) and evaluation crop (CenterCrop) size.
        eval_resize: evaluation Resize before the centre crop (>= ``image_size``).
        crop_scale_min: lower bound of the RandomResizedCrop area scale.
        batch_size: total training batch per optimiser micro-step (all devices together).
        eval_batch_size: evaluation batch; None = ``batch_size``.
        num_workers: data-loader worker processes (DALI: pipeline threads).
        loader: input pipeline: ``"torchvision"`` (default), ``"dali"`` (NVIDIA DALI; GPU decoding on
            CUDA, CPU operators otherwise) or ``"auto"`` (DALI when it imports and the data is an image
            folder). Without DALI installed, ``dali``/``auto`` fall back to torchvision with a one-line notice.
        shots: images per class drawn from the train split (few-shot); None = all.
        shot_seed: seed of the few-shot draw (taken after the held-out split is removed).
        val_per_class: images per class held out of the train split for validation; None = none.
        val_seed: seed of the held-out draw.
        mixup_alpha, cutmix_alpha: batch mixing strengths; 0 = off.
    """

    _section = "data"

    root: str | None = None
    dataset: DatasetKind = "folder"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    eval_resize: int = 256
    crop_scale_min: float = 0.08
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 8
    loader: LoaderName = "torchvision"
    shots: int | None = None
    shot_seed: int = 42
    val_per_class: int | None = None
    val_seed: int = 42
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def _validate(self) -> None:
        self._positive("image_size", "eval_resize", "batch_size")
        self._positive("eval_batch_size", "shots", "val_per_class", optional=True)
        self._positive("num_workers", "shot_seed", "val_seed", "mixup_alpha", "cutmix_alpha", allow_zero=True)
        _require(0 < self.crop_scale_min <= 1, self._key("crop_scale_min"), "must be in (0, 1]", self.crop_scale_min)
        _require(
            self.eval_resize >= self.image_size,
            self._key("eval_resize"),
            f"must be >= data.image_size ({self.image_size}) so that the centre crop fits",
            self.eval_resize,
        )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The training loop.

    Attributes:
        epochs: training epochs.
        grad_accum: micro-batches per optimiser step.
        precision: ``"fp32"`` or ``"bf16"`` autocast.
        channels_last: run convolutions in channels-last memory format.
        seed: global seed.
        out_dir: run folder (checkpoints, logs, the resolved config).
        checkpoint_every_steps: also checkpoint every N optimiser steps; None = at epoch ends only.
        keep_best: checkpoints kept by validation accuracy, besides the last one.
        eval_every_epochs: validate every N epochs.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        compile: compile the step's forward-to-loss part with `torch.compile(fullgraph=True)` (the
            first steps then take the compile time; `false` runs eagerly).
        activation_checkpointing: recompute the student's stages (ResNet layers, DenseNet blocks, ViT
            encoder blocks) in the backward instead of keeping their activations: less memory, same result.
        log_every_steps: log training metrics every N optimiser steps.
    """

    _section = "train"

    epochs: int = 90
    grad_accum: int = 1
    precision: Precision = "fp32"
    channels_last: bool = False
    seed: int = 0
    out_dir: str = "runs/train"
    checkpoint_every_steps: int | None = None
    keep_best: int = 3
    eval_every_epochs: int = 1
    device: DeviceName = "auto"
    compile: bool = True
    activation_checkpointing: bool = False
    log_every_steps: int = 50

    def _validate(self) -> None:
        self._positive("epochs", "grad_accum", "eval_every_epochs", "log_every_steps")
        self._positive("checkpoint_every_steps", optional=True)
        self._positive("seed", "keep_best", allow_zero=True)
        _require(bool(self.out_dir.strip()), self._key("out_dir"), "must be a folder path", self.out_dir)


@dataclass(frozen=True)
class EngineConfig(_Section):
    """How the step is distributed (see `e2kd_fast.engine.distributed` and docs/scaling.md).

    Attributes:
        backend: ``"single"`` (one process), ``"ddp"`` (torch DistributedDataParallel) or
            ``"deepspeed"`` (DeepSpeed ZeRO stage ``zero_stage``). ``data.batch_size`` stays the global
            batch and is split evenly across the processes of the launch (torchrun / deepspeed).
        zero_stage: DeepSpeed ZeRO stage, 1 or 2 (3 is refused: see `_validate`; without partitioning
            use ``backend: ddp``).
        dist_backend: process-group back end; ``"auto"`` = nccl on CUDA, gloo on CPU.
        timeout_minutes: collective-operation timeout of the process group.
        find_unused_parameters: DDP's option of that name (only for students with unused parameters).
        deepspeed_config: extra DeepSpeed config entries merged over the generated ones (e.g.
            ``{"zero_optimization": {"overlap_comm": true}}``); the keys the other sections own
            (batch sizes, accumulation, bf16, clipping, optimizer, ZeRO stage) are refused.
    """

    _section = "engine"

    backend: BackendName = "single"
    zero_stage: int = 1
    dist_backend: DistBackendName = "auto"
    timeout_minutes: int = 30
    find_unused_parameters: bool = False
    deepspeed_config: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        self._positive("timeout_minutes")
        if self.zero_stage == 3:
            # ZeRO-3 releases each parameter after its module's forward and re-gathers it through module
            # hooks; the explanation sweep re-uses the layer weights outside those forwards (the adjoint,
            # transposed convolutions) and the backward of the explanation loss differentiates through
            # them again, so the weights are gone when they are needed (platform_notes.md section 9.5).
            raise ValueError(
                "engine.zero_stage 3 is not supported: ZeRO-3 partitions the parameters and gathers each one "
                "only around its own module's forward, but the e²KD explanation (the gradient of the logit "
                "w.r.t. the input, computed by the reverse sweep) and the backward of the explanation loss use "
                "the layer weights again outside that forward, where ZeRO-3 has already released them. Use "
                "zero_stage 1 or 2 (parameters stay replicated; for CNNs of <= 25M parameters ZeRO-3 would save "
                "little memory anyway); got 3"
            )
        _require(
            self.zero_stage in (1, 2),
            self._key("zero_stage"),
            "must be 1 or 2 (stage 0, no partitioning, is what engine.backend 'ddp' does)",
            self.zero_stage,
        )
        owned = {
            "train_batch_size": "data.batch_size x train.grad_accum",
            "train_micro_batch_size_per_gpu": "data.batch_size / number of processes",
            "gradient_accumulation_steps": "train.grad_accum",
            "bf16": "train.precision",
            "fp16": "train.precision",
            "gradient_clipping": "optim.grad_clip_norm",
            "optimizer": "optim.*",
            "scheduler": "optim.schedule",
        }
        for key, instead in owned.items():
            if key in self.deepspeed_config:
                raise ValueError(f"engine.deepspeed_config.{key} is set by {instead}; remove it from deepspeed_config")
        stage = (self.deepspeed_config.get("zero_optimization") or {}).get("stage")
        if stage is not None:
            raise ValueError(
                f"engine.deepspeed_config.zero_optimization.stage is set by engine.zero_stage; got {stage!r}"
            )


_SECTIONS: dict[str, type[_Section]] = {
    "student": ModelConfig,
    "teacher": TeacherConfig,
    "distill": DistillConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "engine": EngineConfig,
}


@dataclass(frozen=True)
class Config:
    """A complete, validated training configuration (see the module docstring for the sections).

    Build it from YAML with `load_config`, from a mapping with `config_from_dict`, or directly; derive
    variants with `dataclasses.replace`. Construction checks every section and their combinations.
    """

    student: ModelConfig
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ValueError(
                    f"{name}: expected {cls.__name__}, got {type(value).__name__}; "
                    "build a Config from a mapping with config_from_dict"
                )
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        student, teacher, distill, data = self.student, self.teacher, self.distill, self.data
        if distill.method != "none" and teacher.name is None:
            raise ValueError(f"distill.method {distill.method!r} requires teacher.name; use method 'none' without one")
        if teacher.mode == "frozen" and (data.mixup_alpha > 0 or data.cutmix_alpha > 0):
            raise ValueError(
                "teacher.mode 'frozen' cannot be combined with data.mixup_alpha / data.cutmix_alpha > 0 "
                f"(got {data.mixup_alpha} / {data.cutmix_alpha}): mixup/cutmix cannot be applied consistently to "
                "stored explanations, which exist once per unmixed image"
            )
        if distill.method != "none" and None not in (student.num_classes, teacher.num_classes):
            if student.num_classes != teacher.num_classes:
                raise ValueError(
                    f"student.num_classes ({student.num_classes}) != teacher.num_classes ({teacher.num_classes}): "
                    "distillation compares the two models' logits class by class"
                )
        self._validate_dataset()
        self._validate_explanation()
        self._validate_baseline()

    def _validate_baseline(self) -> None:
        """Feature baselines need a live teacher and architectures whose stages they know."""
        method = self.distill.method
        if method not in BASELINE_DEFAULTS:
            return
        if self.teacher.mode == "frozen":
            raise ValueError(
                f"distill.method {method!r} compares intermediate features, which the frozen store does not hold; "
                "use teacher.mode 'live'"
            )
        if self.distill.multilabel:
            raise ValueError(f"distill.method {method!r} is single-label only; distill.multilabel must be false")
        for role, name in (("student", self.student.name), ("teacher", self.teacher.name)):
            if not str(name).startswith(_FEATURE_ARCHS):
                raise ValueError(
                    f"{role}.name {name!r} is not supported by distill.method {method!r}: feature baselines need "
                    "B-cos ResNets/ResNeXts/DenseNets/ViTs or torchvision ResNets/DenseNets "
                    f"(names starting with {', '.join(_FEATURE_ARCHS)})"
                )
            if method == "catkd" and str(name).startswith("bcos_vit"):
                raise ValueError(
                    f"{role}.name {name!r}: CAT-KD needs class activation maps, which a ViT (pooling before its "
                    "head) does not have; use a CNN"
                )

    def _validate_dataset(self) -> None:
        """VOC targets are multi-hot: the multi-label objective, and no label mixing or few-shot draws."""
        data, multilabel = self.data, self.distill.multilabel
        if (data.dataset == "voc") != multilabel:
            raise ValueError(
                f"distill.multilabel is {multilabel} but data.dataset is {data.dataset!r}: multi-label targets "
                "come only from 'voc', and 'voc' needs distill.multilabel: true"
            )
        if data.dataset == "voc":
            for key in ("mixup_alpha", "cutmix_alpha", "shots", "val_per_class"):
                if getattr(data, key):
                    raise ValueError(
                        f"data.{key} is {getattr(data, key)!r} but is not supported with data.dataset 'voc' "
                        "(multi-hot targets); leave it unset"
                    )

    def _validate_explanation(self) -> None:
        """GradCAM explains standard networks, B-cos weights explain B-cos networks: check the names agree."""
        kind, method = self.distill.explanation, self.distill.method
        if kind == "gradcam" and self.student.name.startswith(_BCOS_PREFIX):
            raise ValueError(
                f"distill.explanation 'gradcam' is meant for standard (non-B-cos) students, but student.name is "
                f"{self.student.name!r}; use distill.explanation 'bcos' for B-cos models"
            )
        if method != "e2kd":
            return  # KD and supervised training compute no explanations
        for role, name in (("student", self.student.name), ("teacher", self.teacher.name)):
            is_bcos = name is not None and name.startswith(_BCOS_PREFIX)
            if kind == "bcos" and not is_bcos:
                raise ValueError(
                    f"distill.explanation 'bcos' (dynamic linear weights) needs B-cos models, but {role}.name is "
                    f"{name!r}; use distill.explanation 'gradcam' for standard models"
                )
            if kind == "gradcam" and is_bcos:
                raise ValueError(
                    f"distill.explanation 'gradcam' is meant for standard (non-B-cos) models, but {role}.name is "
                    f"{name!r}; e²KD compares explanations of the same kind for student and teacher"
                )


# ----------------------------------------------------------------------------------------------------------------------
# Mappings
# ----------------------------------------------------------------------------------------------------------------------


def _unknown_key(key: str, allowed: Sequence[str], where: str) -> ValueError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown key {key!r}; allowed keys of {where}: {', '.join(allowed)}{hint}")


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Builds and validates a `Config` from a nested mapping (as YAML holds it).

    Strict: an unknown key anywhere, a missing ``student.name``, a value of the wrong type or outside
    its allowed values raises a ValueError naming the dotted key (``optim.learning_rate``) and what is
    allowed. Ints are accepted for float fields; None only where the field allows it. A section given
    as None (an empty YAML block) takes its defaults.

    Args:
        d: ``{"student": {...}, "teacher": {...}, ...}``; every section but ``student`` may be omitted.

    Returns:
        The frozen `Config`.
    """
    return Config(**_sections_from_dict(d, _SECTIONS, "the config"))


def _sections_from_dict(d: Any, sections: Mapping[str, type[_Section]], where: str) -> dict[str, _Section]:
    """Each section of ``sections`` built from its mapping in ``d`` (absent or None: its defaults).

    Shared by `config_from_dict` and the XDistillation config; ``where`` names the config in errors.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping of sections ({', '.join(sections)}), got {type(d).__name__}")
    for key in d:
        if key not in sections:
            raise _unknown_key(str(key), list(sections), where)
    built: dict[str, _Section] = {}
    for name, cls in sections.items():
        values = d.get(name)
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{name}: expected a mapping of its keys, got {type(values).__name__} {values!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in allowed:
                raise _unknown_key(f"{name}.{key}", allowed, repr(name))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _is_required(f)]
        if missing:
            raise ValueError(f"missing required key '{name}.{missing[0]}'")
        built[name] = cls(**values)
    return built


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested mapping of ``cfg`` (a deep copy), as `config_from_dict` takes it and YAML stores it."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: PyYAML (YAML 1.1) reads ``3e-4`` as a string, which no one means."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{source}: invalid YAML{where}: {problem}") from None


def _read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        return {}  # an empty file is an empty mapping
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of ``path`` with its ``base`` files resolved (recursively; cycles are errors)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise ValueError(f"config files name each other as base in a cycle: {cycle}")
    data = _read_yaml_file(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ValueError(f"{path}: 'base' must be a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:  # later bases override earlier ones, and the file overrides them all
        base_path = path.parent / base
        if not base_path.is_file():
            raise FileNotFoundError(f"base file {base!r} of {path} not found: {base_path}")
        merged = _deep_merge(merged, _load_tree(base_path, (*chain, resolved)))
    return _deep_merge(merged, data)


def _accepts(tp: Any, kind: type) -> bool:
    """Whether the annotation ``tp`` is ``kind`` or ``kind | None`` (a Literal counts as str)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return kind is str
    return tp is kind


def _parse_override_value(raw: str, tp: Any, override: str) -> Any:
    """Parses ``raw`` as a YAML scalar (or flow collection), then fits it to the field type ``tp``."""
    value = _parse_yaml(raw, f"override {override!r}")
    if tp is None:  # a free key inside a dict field (student.kwargs.norm): plain YAML
        return value
    if isinstance(value, str) and _accepts(tp, float) and not _accepts(tp, str):
        try:
            return float(value)  # belt and braces for number spellings the float resolver misses
        except ValueError:
            return value  # left for config_from_dict to reject with the dotted key
    if isinstance(value, (bool, int, float)) and _accepts(tp, str) and not _accepts(tp, float):
        return raw.strip()  # a string field given `2012` or `yes` means the text, not a number or bool
    return value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``"dotted.key=value"`` overrides to a config mapping; returns a new mapping.

    The key must name a field of the schema (``optim.lr``), or a key inside a mapping field
    (``student.kwargs.norm``). The value is read as YAML: ``optim.lr=3e-4`` gives a float,
    ``teacher.name=null`` None, ``train.channels_last=true`` a bool and ``student.kwargs={norm: bnu}``
    a mapping; string fields keep number-like text as text. Types are checked later by
    `config_from_dict`.

    Args:
        d: a config mapping (sections may be missing or None).
        overrides: e.g. ``["optim.lr=3e-4", "data.batch_size=32"]``; applied in order.

    Returns:
        A deep copy of ``d`` with the overrides applied.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'dotted.key=value' strings, not one string")
    out = copy.deepcopy(dict(d))
    for override in overrides:
        key, sep, raw = str(override).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"malformed override {override!r}: expected 'dotted.key=value', e.g. 'optim.lr=3e-4'")
        section, *rest = key.split(".")
        if section not in _SECTIONS:
            raise _unknown_key(key if not rest else section, list(_SECTIONS), "the config")
        allowed = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if not rest:
            raise ValueError(f"override {override!r} names a section; name one of its keys: {', '.join(allowed)}")
        if rest[0] not in allowed:
            raise _unknown_key(f"{section}.{rest[0]}", allowed, repr(section))
        tp = _field_types(_SECTIONS[section])[rest[0]]
        if len(rest) > 1 and not _accepts(tp, dict):
            raise ValueError(f"override {override!r}: {section}.{rest[0]} is a {_type_name(tp)}, not a mapping")
        value = _parse_override_value(raw, tp if len(rest) == 1 else None, override)
        node = out
        for i, part in enumerate([section, *rest[:-1]]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                where = ".".join([section, *rest][: i + 1])
                raise ValueError(f"override {override!r}: {where} holds {node[part]!r}, not a mapping")
            node = node[part]
        node[rest[-1]] = value
    return out


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config, resolving ``base`` files, applies overrides and validates the result.

    Args:
        path: the YAML file.
        overrides: ``"dotted.key=value"`` strings (see `apply_overrides`), applied after the file.

    Returns:
        The frozen `Config`.

    Raises:
        FileNotFoundError: ``path`` or one of its base files does not exist.
        ValueError: invalid YAML (with file and line), a base cycle, an unknown key, a wrong type or an
            invalid combination (with the dotted key).
    """
    path = Path(path)
    d = apply_overrides(_load_tree(path), overrides)
    try:
        return config_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Writes ``cfg`` as a complete YAML file (no ``base``) that `load_config` reads back equal.

    The file is written to a temporary name and renamed into place, so readers never see half a file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# e2kd-fast config, fully resolved (written by e2kd_fast.config.save_config)\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
