"""The training-configuration schema: the `Config` sections, their checks, and loading and saving them.

Frozen dataclasses, validated on construction; YAML only serialises them. The checking machinery is the
library in `e2kd_fast.config.sections` (checked sections) and `e2kd_fast.config.files` (YAML files,
``base:`` inheritance, dotted overrides); this module holds what is particular to training runs.

A run is described by one `Config` with seven sections::

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

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from e2kd_fast.config.files import apply_section_overrides, read_yaml_with_bases
from e2kd_fast.config.sections import Section, require, sections_from_dict, unknown_key_error

__all__ = [
    "BASELINE_DEFAULTS",
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
# of each method's feature term and its options with their defaults (the reference implementations'
# defaults: HobbitLong/RepDistiller, GzyAftermath/CAT-KD, megvii-research/mdistiller).
BASELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "at": {"weight": 1000.0, "p": 2.0},
    "nst": {"weight": 50.0},
    "ab": {"weight": 1.0, "margin": 1.0, "init_epochs": 30},
    "catkd": {"weight": 0.5, "pool_size": 4, "normalize": False},
    "reviewkd": {"weight": 1.0, "warmup_epochs": 20, "max_mid_channels": 512},
}
ExplanationKind = Literal["bcos", "gradcam"]
GuidedStepCounter = Literal["epoch", "run"]
OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["cosine", "constant"]
ScheduleUnit = Literal["epoch", "step"]
DatasetKind = Literal["folder", "synthetic", "voc", "waterbirds"]
LoaderName = Literal["torchvision", "dali", "auto"]
SubsetDraw = Literal["official", "per_class"]  # e2kd_fast.data.splits
Precision = Literal["fp32", "bf16", "fp16"]
DeviceName = Literal["auto", "cpu", "cuda"]
StrategyName = Literal["single", "ddp", "deepspeed"]
ProcessGroupName = Literal["auto", "nccl", "gloo"]

# Architectures whose stages e2kd_fast.distill.features knows, by name prefix.
_FEATURE_ARCHS = ("bcos_resnet", "bcos_resnext", "bcos_densenet", "bcos_vit", "resnet", "densenet")

# B-cos models are recognised by name; the registry (`e2kd_fast.models`) follows this convention and
# importing it here would pull torch into what is otherwise a plain-data module.
_BCOS_PREFIX = "bcos_"


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(Section):
    """The student model.

    Attributes:
        name: a name from `e2kd_fast.models.list_models()`, e.g. ``"bcos_resnet18"`` or ``"resnet18"``.
        num_classes: number of outputs; None takes the model's default (1000 for ImageNet models).
        checkpoint: weights to start from (any format `load_checkpoint` accepts; of a checkpoint that
            holds EMA weights, those); None = fresh weights.
        kwargs: extra keyword arguments of `create_model`, e.g. ``{"norm": "bnu", "b": 2}``. A plain
            dict (so it serialises as it is); treat it as read-only. It takes no part in the hash.
    """

    _section = "student"

    name: str
    num_classes: int | None = None
    checkpoint: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        require(bool(self.name.strip()), self._key("name"), "must be a model name", self.name)
        self._positive("num_classes", optional=True)
        require(self.checkpoint != "", self._key("checkpoint"), "must be a path or None", self.checkpoint)


@dataclass(frozen=True)
class TeacherConfig(Section):
    """The teacher.

    Attributes:
        name: a registered model name; None = no teacher (only with ``distill.method: none``).
        checkpoint: the teacher's weights (the official B-cos release files, torchvision files, ...; of
            a checkpoint that holds EMA weights, those).
        num_classes: number of outputs; None takes the model's default.
        mode: ``"live"`` runs the teacher on every augmented batch; ``"frozen"`` reads its logits and
            explanations, computed once per training image, from ``store`` (GTE's frozen explanations,
            ``ffkd_training``; docs/architecture.md#frozen-teacher-store).
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
        require(
            self.name is None or bool(self.name.strip()), self._key("name"), "must be a model name or None", self.name
        )
        self._positive("num_classes", optional=True)
        require(self.checkpoint != "", self._key("checkpoint"), "must be a path or None", self.checkpoint)
        if self.checkpoint is not None and self.name is None:
            raise ValueError(f"teacher.checkpoint is set ({self.checkpoint!r}) but teacher.name is None")
        if self.mode == "frozen" and not self.store:
            raise ValueError(
                "teacher.mode 'frozen' requires teacher.store, the folder of the precomputed teacher "
                f"explanations; got {self.store!r}"
            )


@dataclass(frozen=True)
class DistillConfig(Section):
    """The objective ``L = gt_coef·L_gt + logit_coef·τ²·KL(p_T ‖ p_S) + lam·(1 − cos(E_S, E_T))``.

    As GTE's ``TeachersExplainCriterion`` (``m-parchami/GoodTeachersExplain``) computes it.

    Attributes:
        method: ``"e2kd"`` (logits and explanations), ``"kd"`` (logits only; ``lam`` is ignored) or
            ``"none"`` (plain supervised training on the labels; no teacher needed).
        tau: KD temperature τ (> 0).
        lam: weight λ of the explanation loss (>= 0); λ = 0 turns e²KD into KD.
        explanation: ``"bcos"`` (dynamic weights, B-cos models) or ``"gradcam"`` (standard models).
        gt_coef: weight of the ground-truth label loss in KD / e²KD (every paper config uses 0).
        logit_coef: weight β > 0 of the KD (teacher-logit) term in KD / e²KD: GTE's
            ``teacher_logit_loss_coef``, 1 in every paper config; its standard-network sweep also tried 0.5.
        guided_step_interval: compute the explanation loss on every K-th step only (GTE's option of that name;
            its "efficient" configs use K = 16 for ResNets, 4 for ViTs).
        guided_step_counter: the step count that ``guided_step_interval`` divides: ``"run"`` (the
            run's optimiser step count) or ``"epoch"`` (the optimiser step's index within its epoch,
            from 0: the official batch index, so every epoch starts with an explained step; set in the
            ImageNet paper configs).
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
    logit_coef: float = 1.0
    guided_step_interval: int = 1
    guided_step_counter: GuidedStepCounter = "run"
    multilabel: bool = False
    feature_weight: float | None = None
    kd_coef: float = 0.0
    feature_options: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        self._positive("tau", "guided_step_interval", "logit_coef")
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
        if self.logit_coef != 1:
            raise ValueError(
                f"distill.logit_coef is {self.logit_coef!r}, but baseline method {self.method!r} weighs its KD term "
                "by distill.kd_coef; set distill.logit_coef to 1"
            )
        allowed = [k for k in defaults if k != "weight"]
        for key, value in self.feature_options.items():
            if key not in allowed:
                raise unknown_key_error(
                    f"distill.feature_options.{key}", allowed or ["(none)"], f"method {self.method!r}"
                )
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
class OptimConfig(Section):
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
        require(0 <= self.momentum < 1, self._key("momentum"), "must be in [0, 1)", self.momentum)
        require(
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
class DataConfig(Section):
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
        drop_last: leave out the epoch's last training step when it would be partial (fewer than
            ``batch_size × train.grad_accum`` images); false trains on it, its loss and gradient the mean
            over the images it has, as the official loaders (``drop_last=False``) do; the paper configs
            set false.
        eval_batch_size: evaluation batch of each process (every process evaluates its share of the
            validation set); None = ``batch_size``.
        num_workers: data-loader worker processes (DALI: pipeline threads). None (the default): one less
            than the CPU cores this process may use (``os.sched_getaffinity``), shared among the processes
            of a multi-process launch on the node, at most 8 (`e2kd_fast.data.loaders.default_num_workers`).
        loader: input pipeline: ``"torchvision"`` (default), ``"dali"`` (NVIDIA DALI; GPU decoding on
            CUDA, CPU operators otherwise) or ``"auto"`` (DALI when it imports and the data is an image
            folder). Without DALI installed, ``dali``/``auto`` fall back to torchvision with a one-line notice.
        shots: images per class drawn from the train split (few-shot); None = all.
        shot_seed: seed of the few-shot draw (taken after the held-out split is removed).
        val_per_class: images per class held out of the train split for validation; None = none.
        val_seed: seed of the held-out draw.
        subset_draw: how ``val_per_class`` and ``shots`` pick their images: ``"official"`` (the images
            the official GTE code picks for the same image list and seed, index for index; the paper
            configs) or ``"per_class"`` (an independent seeded draw per class). See `e2kd_fast.data.splits`.
        mixup_alpha, cutmix_alpha: batch mixing strengths; 0 = off.
        rand_augment_ops: RandAugment operations per training image (torchvision's ``RandAugment``,
            bilinear, after the crop and flip and before the input encoding, as the official ViT
            recipe); 0 = off (default), 2 in the ViT configs. Not with a frozen teacher; DALI falls back
            to torchvision for the training loader (`e2kd_fast.data.transforms.train_transform`).
        rand_augment_magnitude: its magnitude, 0..30 (torchvision's 31 bins); 10 in the ViT configs.
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
    drop_last: bool = True
    eval_batch_size: int | None = None
    num_workers: int | None = None
    loader: LoaderName = "torchvision"
    shots: int | None = None
    shot_seed: int = 42
    val_per_class: int | None = None
    val_seed: int = 42
    subset_draw: SubsetDraw = "per_class"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    rand_augment_ops: int = 0
    rand_augment_magnitude: int = 9

    def _validate(self) -> None:
        self._positive("image_size", "eval_resize", "batch_size")
        self._positive("rand_augment_ops", allow_zero=True)
        require(
            0 <= self.rand_augment_magnitude <= 30,
            self._key("rand_augment_magnitude"),
            "must be in 0..30 (torchvision RandAugment's 31 magnitude bins)",
            self.rand_augment_magnitude,
        )
        self._positive("eval_batch_size", "shots", "val_per_class", optional=True)
        self._positive("num_workers", optional=True, allow_zero=True)
        self._positive("shot_seed", "val_seed", "mixup_alpha", "cutmix_alpha", allow_zero=True)
        require(0 < self.crop_scale_min <= 1, self._key("crop_scale_min"), "must be in (0, 1]", self.crop_scale_min)
        require(
            self.eval_resize >= self.image_size,
            self._key("eval_resize"),
            f"must be >= data.image_size ({self.image_size}) so that the centre crop fits",
            self.eval_resize,
        )


@dataclass(frozen=True)
class TrainConfig(Section):
    """The training loop.

    Attributes:
        epochs: training epochs.
        grad_accum: micro-batches per optimiser step.
        precision: ``"fp32"``, ``"bf16"`` autocast (CUDA), or ``"fp16"`` autocast with a dynamic loss
            scale (`torch.amp.GradScaler`, the official ``--amp``): a step whose gradient overflows is
            skipped and the scale halved; not under DeepSpeed.
        channels_last: run convolutions in channels-last memory format.
        seed: global seed.
        out_dir: run folder (checkpoints, logs, the resolved config). None (the default): a new folder per
            run, ``runs/<config file stem>-<YYYYmmdd-HHMMSS>`` (``runs/train-...`` without a file), chosen
            when training starts; a multi-process launch or ``--resume auto`` needs it set. A folder that
            already holds a run is refused unless the run resumes it or starts over (``--overwrite``).
        checkpoint_every_steps: also checkpoint every N optimiser steps; None = at epoch ends only.
        checkpoint_every_minutes: also checkpoint after a step once this many minutes passed since the
            last checkpoint (``last.pt``, atomically); None = off. Bounds what a kill (``kill -9``, an
            out-of-memory end) loses in wall time whatever the step time; the paper's ImageNet configs set it.
        keep_best: checkpoints kept by validation accuracy, besides the last one.
        eval_every_epochs: validate every N epochs.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        compile: compile the step's forward-to-loss part with `torch.compile(fullgraph=True)`: ``true``,
            ``false`` (eager) or ``"auto"`` (the default: compiled on CUDA, eager on a CPU, where compiling
            takes minutes; the log says which). The first step of each graph takes its compile time.
        tf32: on CUDA, let fp32 matrix products and convolutions use TensorFloat-32
            (`torch.set_float32_matmul_precision("high")`, ``torch.backends.cudnn.allow_tf32``) while the
            run trains; no effect on a CPU.
        cudnn_benchmark: on CUDA, let cuDNN time its convolution algorithms for each input shape and keep
            the fastest (``torch.backends.cudnn.benchmark``) while the run trains; no effect on a CPU.
        activation_checkpointing: recompute the student's stages (ResNet layers, DenseNet blocks, ViT
            encoder blocks) in the backward instead of keeping their activations: less memory, same result.
        log_every_steps: log training metrics every N optimiser steps.
        bn_group_size: images per batch-norm group in training: each device's micro-batch is
            normalised in groups of this many images, dealt as data-parallel ranks are dealt them, so
            one device at batch 256 with 64 computes the statistics of 4 GPUs × 64 without SyncBN
            (the official full-ImageNet runs); running statistics follow the first group, as DDP
            broadcasts rank 0's. None: the whole micro-batch (`e2kd_fast.nn.set_batch_norm_groups`).
        ema_decay: keep an exponential moving average of the student's weights (`e2kd_fast.engine.ema`),
            updated after every applied optimiser step as ``ema ← decay · ema + (1 − decay) · weights``
            (BatchNorm running statistics averaged too). A float in (0, 1), e.g. 0.9998 (about the last
            5,000 steps); None (the default): off. With it on, evaluation, the best-checkpoint ranking and
            ``e2kd-fast eval`` / ``explain`` / ``export`` use the averaged weights; checkpoints hold the
            raw weights (to resume from) and the averaged ones (``model_ema``). The raw student is not
            evaluated as well (that would be a second pass over the validation set): its accuracy is
            ``epoch_top1`` on the training batches, or ``e2kd-fast eval --no-ema`` on a checkpoint.
    """

    _section = "train"

    epochs: int = 90
    grad_accum: int = 1
    precision: Precision = "fp32"
    channels_last: bool = False
    seed: int = 0
    out_dir: str | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    keep_best: int = 3
    eval_every_epochs: int = 1
    device: DeviceName = "auto"
    compile: bool | Literal["auto"] = "auto"
    tf32: bool = True
    cudnn_benchmark: bool = True
    activation_checkpointing: bool = False
    log_every_steps: int = 50
    bn_group_size: int | None = None
    ema_decay: float | None = None

    def _validate(self) -> None:
        self._positive("epochs", "grad_accum", "eval_every_epochs", "log_every_steps")
        require(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            self._key("ema_decay"),
            "must be in (0, 1), e.g. 0.9998 (the weight of the old average per optimiser step), or None for no EMA",
            self.ema_decay,
        )
        self._positive("checkpoint_every_steps", "checkpoint_every_minutes", "bn_group_size", optional=True)
        self._positive("seed", "keep_best", allow_zero=True)
        require(
            self.out_dir is None or bool(self.out_dir.strip()),
            self._key("out_dir"),
            "must be a folder path or None",
            self.out_dir,
        )


@dataclass(frozen=True)
class EngineConfig(Section):
    """How the step is distributed (see `e2kd_fast.engine.distributed` and docs/scaling.md).

    Attributes:
        strategy: ``"single"`` (one process), ``"ddp"`` (torch DistributedDataParallel) or
            ``"deepspeed"`` (DeepSpeed ZeRO stage ``zero_stage``). ``data.batch_size`` stays the global
            batch and is split evenly across the processes of the launch (torchrun / deepspeed).
        zero_stage: DeepSpeed ZeRO stage, 1 or 2 (3 is refused: see `_validate`; without partitioning
            use ``strategy: ddp``).
        process_group: the process group's communication library; ``"auto"`` = nccl on CUDA, gloo on CPU.
        timeout_minutes: collective-operation timeout of the process group.
        find_unused_parameters: DDP's option of that name (only for students with unused parameters).
        deepspeed_config: extra DeepSpeed config entries merged over the generated ones (e.g.
            ``{"zero_optimization": {"overlap_comm": true}}``); the keys the other sections own
            (batch sizes, accumulation, bf16, clipping, optimizer, ZeRO stage) are refused.
    """

    _section = "engine"

    strategy: StrategyName = "single"
    zero_stage: int = 1
    process_group: ProcessGroupName = "auto"
    timeout_minutes: int = 30
    find_unused_parameters: bool = False
    deepspeed_config: dict = field(default_factory=dict, hash=False)

    def _validate(self) -> None:
        self._positive("timeout_minutes")
        if self.zero_stage == 3:
            # ZeRO-3 releases each parameter after its module's forward and re-gathers it through module
            # hooks; the explanation sweep re-uses the layer weights outside those forwards (the adjoint,
            # transposed convolutions) and the backward of the explanation loss differentiates through
            # them again, so the weights are gone when they are needed (docs/architecture.md#platform-notes).
            raise ValueError(
                "engine.zero_stage 3 is not supported: ZeRO-3 partitions the parameters and gathers each one "
                "only around its own module's forward, but the e²KD explanation (the gradient of the logit "
                "w.r.t. the input, computed by the reverse sweep) and the backward of the explanation loss use "
                "the layer weights again outside that forward, where ZeRO-3 has already released them. Use "
                "zero_stage 1 or 2 (parameters stay replicated; for CNNs of <= 25M parameters ZeRO-3 would save "
                "little memory anyway); got 3"
            )
        require(
            self.zero_stage in (1, 2),
            self._key("zero_stage"),
            "must be 1 or 2 (stage 0, no partitioning, is what engine.strategy 'ddp' does)",
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


_SECTIONS: dict[str, type[Section]] = {
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
        if teacher.mode == "frozen" and distill.method != "none" and data.rand_augment_ops > 0:
            raise ValueError(
                "teacher.mode 'frozen' cannot be combined with data.rand_augment_ops > 0 "
                f"(got {data.rand_augment_ops}): a stored explanation follows only its image's crop and flip, "
                "not RandAugment's rotations, shears, translations and colour changes; set "
                "data.rand_augment_ops: 0 or use teacher.mode 'live'"
            )
        if distill.method != "none" and None not in (student.num_classes, teacher.num_classes):
            if student.num_classes != teacher.num_classes:
                raise ValueError(
                    f"student.num_classes ({student.num_classes}) != teacher.num_classes ({teacher.num_classes}): "
                    "distillation compares the two models' logits class by class"
                )
        if self.train.precision == "fp16" and self.engine.strategy == "deepspeed":
            raise ValueError(
                "train.precision 'fp16' is not available with engine.strategy 'deepspeed' (its own fp16 mode and "
                "loss scale are not wired to the B-cos ops); use engine.strategy 'ddp' or train.precision 'bf16'"
            )
        group = self.train.bn_group_size
        if group is not None and data.batch_size % group:
            raise ValueError(
                f"train.bn_group_size {group} does not divide data.batch_size {data.batch_size}: each device's "
                "micro-batch is normalised in whole groups"
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
# Mappings and files
# ----------------------------------------------------------------------------------------------------------------------


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
    return Config(**sections_from_dict(_renamed(d), _SECTIONS, "the config"))


# Keys that an earlier version wrote (run folders keep their config.yaml): old dotted key → new one.
RENAMED_KEYS = {"engine.backend": "engine.strategy", "engine.dist_backend": "engine.process_group"}


def _renamed(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """``d`` with the old keys of `RENAMED_KEYS` moved to their new names (with a warning); both set: an error."""
    moved = None
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        values = (d if moved is None else moved).get(section)
        if not isinstance(values, Mapping) or old_key not in values:
            continue
        if new_key in values:
            raise ValueError(f"{old} is the old name of {new}; set only {new}")
        warnings.warn(f"config key {old} is now {new}; please rename it", FutureWarning, stacklevel=3)
        moved = dict(d) if moved is None else moved
        moved[section] = {(new_key if k == old_key else k): v for k, v in values.items()}
    return d if moved is None else moved


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested mapping of ``cfg`` (a deep copy), as `config_from_dict` takes it and YAML stores it."""
    return dataclasses.asdict(cfg)


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
    if not isinstance(overrides, str):  # a string is refused by name below
        overrides = [_renamed_override(item) for item in overrides]
    return apply_section_overrides(_renamed(d), overrides, _SECTIONS, "the config")


def _renamed_override(item: str) -> str:
    key, sep, value = str(item).partition("=")
    new = RENAMED_KEYS.get(key.strip())
    if new is None:
        return item
    warnings.warn(f"config key {key.strip()} is now {new}; please rename it", FutureWarning, stacklevel=3)
    return f"{new}{sep}{value}"


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
            invalid combination (with the dotted key). The message starts with what is to blame: the
            file (``"configs/x.yaml: ..."``) or the override that made the config invalid
            (``"--set 'optim.lr=fast': ..."``).
    """
    path = Path(path)
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'dotted.key=value' strings, not one string")
    overrides = list(overrides)
    from_file = read_yaml_with_bases(path)
    d = from_file
    for item in overrides:  # one at a time, so that an error names the override it comes from
        try:
            d = apply_overrides(d, [item])
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from None
    try:
        return config_from_dict(d)
    except ValueError as e:
        culprit = _failing_override(from_file, overrides, str(e))
        if culprit is None:
            raise ValueError(f"{path}: {e}") from None
        raise ValueError(f"--set {culprit!r}: {e} (overriding {path})") from None


def _failing_override(from_file: dict[str, Any], overrides: list[str], message: str) -> str | None:
    """The override that makes the config fail with ``message``, or None when the file alone fails so.

    The file is validated alone, then with the overrides added one by one: the first override after
    which the config fails with ``message`` is to blame. Only runs once validation has failed.
    """

    def failure(d: Mapping[str, Any]) -> str | None:
        try:
            config_from_dict(d)
        except ValueError as e:
            return str(e)
        return None

    with warnings.catch_warnings():  # renamed keys were reported already
        warnings.simplefilter("ignore")
        if not overrides or failure(from_file) == message:
            return None
        d = from_file
        for item in overrides:
            d = apply_overrides(d, [item])
            if failure(d) == message:
                return item
    return overrides[-1]  # not reached: with every override applied the config fails with ``message``


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
