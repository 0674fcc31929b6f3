"""The XDistillation run configuration: frozen dataclasses validated on construction, read from YAML.

Sections (every key optional; defaults are the paper's values or a named choice, see docs/xdistill.md)::

    data     where the images come from (built-in synthetic shapes, or ImageNet-style folders)
    teacher  the teacher: a checkpoint, or trained in the run (small data)
    explain  the teacher explanations that train the CAE (explainer, SLIC, samples, normalisation)
    cae      the convolutional autoencoder and its L1 training
    student  the student CNN, its fusion with the CAE, and its loss and training
    eval     the evaluation: explainers, images explained, top-k values, MSE level
    run      device and seed

Errors name the dotted key (``student.alpha``) and what is allowed; unknown keys are rejected with a
suggestion, as in `e2kd_fast.config`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from e2kd_fast.config.files import read_yaml_file
from e2kd_fast.config.sections import Section, require, sections_from_dict

__all__ = [
    "CaeSection",
    "DataSection",
    "EvalSection",
    "ExplainSection",
    "RunSection",
    "StudentSection",
    "TeacherSection",
    "XDistillConfig",
    "load_xdistill_config",
    "xdistill_config_from_dict",
    "xdistill_config_to_dict",
]

Explainer = Literal["kernel_shap", "lime", "gradcam"]


@dataclass(frozen=True)
class DataSection(Section):
    """Images, labels and their size.

    Attributes:
        dataset: ``"synthetic"`` (the built-in coloured shapes, 4 classes) or ``"folder"``
            (``root/<split>/<class>/<image>``).
        root, train_split, val_split: the folder data set.
        image_size: side of the square images every model sees (folders: Resize(shorter side →
            ``resize``) + CenterCrop; no random augmentation, since the CAE targets are per image).
        resize: the Resize before the crop; None = ``image_size``.
        num_train, num_val: synthetic image counts.
        max_train_images, max_val_images: folders: use at most this many images (the first ones in
            dataset order after a seeded shuffle); None = all. Everything is held in memory.
        normalize: input normalisation of the CNNs: ``"none"`` or ``"imagenet"`` mean/std. The CAE
            always sees the image in [0, 1].
        seed: synthetic data seed and the shuffle seed of the folder subsets.
    """

    _section = "data"

    dataset: Literal["synthetic", "folder"] = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 32
    resize: int | None = None
    num_train: int = 512
    num_val: int = 128
    max_train_images: int | None = None
    max_val_images: int | None = None
    normalize: Literal["none", "imagenet"] = "none"
    seed: int = 0

    def _validate(self) -> None:
        self._positive("image_size", "num_train", "num_val")
        self._positive("resize", "max_train_images", "max_val_images", optional=True)
        if self.dataset == "folder" and not self.root:
            raise ValueError("data.root: required with data.dataset 'folder' (the folder with <split>/<class>/...)")
        if self.dataset == "synthetic" and self.image_size < 16:
            raise ValueError(f"data.image_size: the synthetic shapes need >= 16 pixels; got {self.image_size}")


@dataclass(frozen=True)
class TeacherSection(Section):
    """The teacher.

    Attributes:
        name: ``"small_cnn"`` or a standard model of the registry (``resnet34``, ``densenet169``, ...).
        checkpoint: its weights; None trains it here for ``epochs`` (meant for small data).
        widths: conv widths of a ``small_cnn`` teacher.
        epochs, lr, batch_size: training when there is no checkpoint (Adam, cross-entropy).
    """

    _section = "teacher"

    name: str = "small_cnn"
    checkpoint: str | None = None
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64

    def _validate(self) -> None:
        require(bool(self.name.strip()), self._key("name"), "must be a model name", self.name)
        require(self.checkpoint != "", self._key("checkpoint"), "must be a path or None", self.checkpoint)
        require(all(w > 0 for w in self.widths) and bool(self.widths), self._key("widths"), "must be > 0", self.widths)
        self._positive("lr", "batch_size")
        self._positive("epochs", allow_zero=True)


@dataclass(frozen=True)
class ExplainSection(Section):
    """Teacher explanations that train the CAE.

    Attributes:
        explainer: ``"kernel_shap"`` (the paper's SHAP), ``"lime"`` or ``"gradcam"``.
        n_segments: SLIC's requested superpixel count k (paper: 19; it advises 3 ≤ k ≤ 20).
        compactness, sigma: SLIC parameters (compactness 10 as scikit-image; sigma 1, not its 0: see
            `slic_segments`).
        num_samples: perturbations per image; None = the explainer's default (KernelSHAP 2M + 2048,
            LIME 1000).
        hide: replacement of switched-off superpixels: ``"mean"`` (image mean colour), ``"zero"``,
            ``"segment_mean"`` (LIME's default).
        output: ``"probability"`` or ``"logit"`` of the explained class.
        target: explain the teacher's ``"predicted"`` class or the ``"label"``.
        normalise: ``"maxabs"`` (per image, to [−1, 1]: the CAE's tanh range) or ``"none"``.
        lime_kernel_width, lime_ridge_alpha: LIME's kernel width (0.25) and ridge penalty (1).
        batch_size: perturbed images per model call.
        seed: sampling seed.
    """

    _section = "explain"

    explainer: Explainer = "kernel_shap"
    n_segments: int = 19
    compactness: float = 10.0
    sigma: float = 1.0
    num_samples: int | None = None
    hide: Literal["mean", "zero", "segment_mean"] = "mean"
    output: Literal["probability", "logit"] = "probability"
    target: Literal["predicted", "label"] = "predicted"
    normalise: Literal["maxabs", "none"] = "maxabs"
    lime_kernel_width: float = 0.25
    lime_ridge_alpha: float = 1.0
    batch_size: int = 256
    seed: int = 0

    def _validate(self) -> None:
        self._positive("n_segments", "compactness", "lime_kernel_width", "batch_size")
        self._positive("sigma", "lime_ridge_alpha", allow_zero=True)
        self._positive("num_samples", optional=True)
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError(f"explain.num_samples: must be >= 2 (or null for the default); got {self.num_samples}")


@dataclass(frozen=True)
class CaeSection(Section):
    """The CAE (paper Table I) and its training (L1 loss, Adam 1e-3).

    Attributes:
        variant: ``"small"`` (1,077 parameters on grey input) or ``"large"`` (198,796 on RGB).
        in_channels: None = the paper's (small: 1, the image's channel mean; large: 3).
        epochs, lr, batch_size: training.
    """

    _section = "cae"

    variant: Literal["small", "large"] = "large"
    in_channels: int | None = None
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64

    def _validate(self) -> None:
        self._positive("lr", "batch_size")
        self._positive("epochs", allow_zero=True)
        require(self.in_channels in (None, 1, 3), self._key("in_channels"), "must be 1, 3 or null", self.in_channels)


@dataclass(frozen=True)
class StudentSection(Section):
    """The student and its loss ``w_cls·CE + (1 − α)·τ²·KD + λ‖c‖²``.

    Attributes:
        name: ``"small_cnn"`` or a standard torchvision model of the registry (``resnet18``, ...).
        widths: conv widths of a ``small_cnn`` student.
        use_cae: False trains the plain student with the same loss (a KD baseline).
        fusion_size: average-pool the CAE map to this side before flattening; None = full map.
        alpha, tau, lam: α, τ, λ (paper 0.9, 1, 5e-4).
        penalty: what c is: ``"classifier"`` (the weight of the layer after the concatenation),
            ``"all"`` (every trainable weight) or ``"features"`` (the concatenated feature vector).
        cls_weight: ``"one"`` (Eq. 6) or ``"alpha"`` (α·CE, the Keras KD-example convention).
        epochs, lr, batch_size, optimizer: training (Adam 1e-3 by default).
    """

    _section = "student"

    name: str = "small_cnn"
    widths: list[int] = field(default_factory=lambda: [16, 32])
    use_cae: bool = True
    fusion_size: int | None = None
    alpha: float = 0.9
    tau: float = 1.0
    lam: float = 5e-4
    penalty: Literal["classifier", "all", "features"] = "classifier"
    cls_weight: Literal["one", "alpha"] = "one"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"

    def _validate(self) -> None:
        require(bool(self.name.strip()), self._key("name"), "must be a model name", self.name)
        require(all(w > 0 for w in self.widths) and bool(self.widths), self._key("widths"), "must be > 0", self.widths)
        require(0 <= self.alpha <= 1, self._key("alpha"), "must be in [0, 1]", self.alpha)
        self._positive("tau", "lr", "batch_size")
        self._positive("lam", "epochs", allow_zero=True)
        self._positive("fusion_size", optional=True)


@dataclass(frozen=True)
class EvalSection(Section):
    """Evaluation.

    Attributes:
        explainers: explainers compared between teacher and student (same class, superpixels, seed).
        num_images: validation images explained (the first ones); accuracy uses all of them.
        num_samples: perturbations per image for KernelSHAP/LIME here; None = the explain section's.
        topk: the k values of the sign-overlap score (the paper's figure: 2).
        mse_level: ``"pixel"`` (area-weighted maps) or ``"segment"``.
    """

    _section = "eval"

    explainers: list[Explainer] = field(default_factory=lambda: ["kernel_shap", "lime", "gradcam"])
    num_images: int = 64
    num_samples: int | None = None
    topk: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    mse_level: Literal["pixel", "segment"] = "pixel"

    def _validate(self) -> None:
        self._positive("num_images")
        self._positive("num_samples", optional=True)
        require(all(k > 0 for k in self.topk), self._key("topk"), "must be positive integers", self.topk)


@dataclass(frozen=True)
class RunSection(Section):
    """Device and global seed (model initialisation, batch order)."""

    _section = "run"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "teacher": TeacherSection,
    "explain": ExplainSection,
    "cae": CaeSection,
    "student": StudentSection,
    "eval": EvalSection,
    "run": RunSection,
}


@dataclass(frozen=True)
class XDistillConfig:
    """A whole XDistillation run (see the module docstring)."""

    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    explain: ExplainSection = field(default_factory=ExplainSection)
    cae: CaeSection = field(default_factory=CaeSection)
    student: StudentSection = field(default_factory=StudentSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)


def xdistill_config_from_dict(d: Mapping[str, Any] | None) -> XDistillConfig:
    """Builds and validates an `XDistillConfig` from a nested mapping; unknown keys are errors."""
    return XDistillConfig(**sections_from_dict({} if d is None else d, _SECTIONS, "the xdistill config"))


def xdistill_config_to_dict(cfg: XDistillConfig) -> dict[str, Any]:
    """The nested mapping of ``cfg`` (what `xdistill_config_from_dict` reads back equal)."""
    return dataclasses.asdict(cfg)


def load_xdistill_config(path: str | os.PathLike) -> XDistillConfig:
    """Reads and validates a YAML file; errors name the file and the dotted key."""
    path = Path(path)
    data = read_yaml_file(path)
    try:
        return xdistill_config_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
