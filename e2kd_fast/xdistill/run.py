"""The XDistillation pipeline from a config: teacher explanations -> CAE -> student -> metrics.

``run(config, out_dir)``:

0. loads the images into memory ([0, 1], fixed size) and obtains the teacher (its checkpoint, or
   trains it with cross-entropy when there is none: small data only);
1. segments every training image with SLIC and explains the teacher's class with the configured
   explainer; the per-superpixel values, normalised per image, painted on their superpixels, are the
   CAE targets (saved to ``teacher_explanations.pt``);
2. trains the CAE with the L1 loss (Adam), saves ``cae.pt``;
3. trains the student (CNN + frozen CAE) with ``CE + (1 − α)·KD + λ‖c‖²``, saves ``student.pt``;
4. evaluates accuracy (teacher, student, agreement), the CAE's L1/MSE on validation targets, and, for
   each evaluation explainer, the explanation MSE and the top-k sign-overlap of teacher vs student;
   writes ``metrics.json`` (and per-epoch records in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast._files import ordinary_file_mode
from e2kd_fast.data.folders import ImageFolderDataset
from e2kd_fast.data.synthetic import SHAPE_CLASSES, shapes_dataset
from e2kd_fast.data.transforms import eval_transform
from e2kd_fast.engine.builders import resolve_device
from e2kd_fast.engine.logging import MetricsLogger
from e2kd_fast.models import create_model, load_checkpoint, model_entry, save_checkpoint
from e2kd_fast.xdistill.cae import build_cae, count_parameters
from e2kd_fast.xdistill.config import (
    XDistillConfig,
    load_xdistill_config,
    xdistill_config_from_dict,
    xdistill_config_to_dict,
)
from e2kd_fast.xdistill.explainers import explain_superpixels
from e2kd_fast.xdistill.metrics import explanation_mse, topk_sign_overlap
from e2kd_fast.xdistill.student import Normalised, SmallCNN, TorchvisionTrunk, XDistillStudent, xdistill_loss
from e2kd_fast.xdistill.superpixels import (
    broadcast_segments,
    normalise_values,
    num_segments,
    segment_valid,
    slic_segments,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _load_folder(
    cfg: XDistillConfig, split: str, limit: int | None, classes: list[str] | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """(images [N, C, S, S] in [0, 1], labels [N], class names) of one split; ``classes``: the training map."""
    data = cfg.data
    tf = eval_transform(data.image_size, data.resize or data.image_size, encoding="none")
    dataset = ImageFolderDataset(data.root, split, transform=tf, classes=classes)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(data.seed))
    images, labels = [], []
    for i in order.tolist():
        if limit is not None and len(images) >= limit:
            break
        item = dataset[i]
        if item is None:  # unreadable image: ImageFolderDataset already warned
            continue
        images.append(item["image"])
        labels.append(int(item["target"]))
    if not images:
        raise ValueError(f"no readable images in {Path(data.root) / split}")
    return torch.stack(images), torch.tensor(labels), dataset.classes


def load_data(cfg: XDistillConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(train images [N, C, S, S] in [0, 1], train labels, val images, val labels, num_classes)."""
    data = cfg.data
    if data.dataset == "synthetic":
        xt, yt, _ = shapes_dataset(data.num_train, data.image_size, seed=data.seed)
        xv, yv, _ = shapes_dataset(data.num_val, data.image_size, seed=data.seed + 1)
        return xt, yt, xv, yv, len(SHAPE_CLASSES)
    xt, yt, classes = _load_folder(cfg, data.train_split, data.max_train_images)
    # The val split uses the training class map (its folders must match): no shifted labels.
    xv, yv, _ = _load_folder(cfg, data.val_split, data.max_val_images, classes)
    return xt, yt, xv, yv, len(classes)


def _norm_stats(cfg: XDistillConfig) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    return (IMAGENET_MEAN, IMAGENET_STD) if cfg.data.normalize == "imagenet" else (None, None)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _standard_model(name: str, num_classes: int) -> nn.Module:
    if model_entry(name).family != "standard":
        raise ValueError(f"XDistillation uses standard (non-B-cos) CNNs or 'small_cnn'; got {name!r}")
    return create_model(name, num_classes=num_classes)


def build_teacher(cfg: XDistillConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The teacher, taking images in [0, 1] (weights loaded if a checkpoint is configured)."""
    mean, std = _norm_stats(cfg)
    t = cfg.teacher
    if t.name == "small_cnn":
        model: nn.Module = SmallCNN(in_channels, num_classes, t.widths, mean, std)
        inner = model
    else:
        inner = _standard_model(t.name, num_classes)
        model = Normalised(inner, mean, std)
    if t.checkpoint is not None:
        load_checkpoint(inner, t.checkpoint)
    return model


def build_student(cfg: XDistillConfig, cae: nn.Module, in_channels: int, num_classes: int) -> XDistillStudent:
    mean, std = _norm_stats(cfg)
    s = cfg.student
    if s.name == "small_cnn":
        backbone: nn.Module = SmallCNN(in_channels, num_classes, s.widths, mean, std)
    else:
        backbone = TorchvisionTrunk(_standard_model(s.name, num_classes), mean, std)
    size = (cfg.data.image_size, cfg.data.image_size)
    return XDistillStudent(backbone, cae, num_classes, size, fusion_size=s.fusion_size, use_cae=s.use_cae)


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    """Logits [N, C] (eval mode, on ``device``; returned on the CPU)."""
    model.eval()
    return torch.cat([model(images[i].to(device)).float().cpu() for i in _batches(len(images), batch_size, None)])


def train_classifier(model, images, labels, *, epochs, lr, batch_size, device, gen, log, kind="teacher") -> None:
    """Cross-entropy training with Adam (the in-run teacher)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in _batches(len(images), batch_size, gen):
            x, y = images[idx].to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        log(kind, epoch, loss=total / max(count, 1))
    model.eval()


def teacher_targets(
    cfg: XDistillConfig, teacher: nn.Module, images: Tensor, labels: Tensor, logits: Tensor, device: torch.device
) -> dict[str, Tensor]:
    """Segments [N, H, W], explained classes [N] and per-superpixel values [N, K] of the teacher."""
    e = cfg.explain
    segments = slic_segments(images, e.n_segments, e.compactness, e.sigma)
    target = logits.argmax(1) if e.target == "predicted" else labels
    values = explain_superpixels(
        e.explainer, teacher, images.to(device), segments.to(device), target.to(device),
        num_samples=e.num_samples, hide=e.hide, output=e.output, seed=e.seed, batch_size=e.batch_size,
        lime_kernel_width=e.lime_kernel_width, lime_ridge_alpha=e.lime_ridge_alpha,
    ).cpu()  # fmt: skip
    return {"segments": segments.cpu(), "target": target.cpu(), "values": values.float()}


def cae_target_maps(values: Tensor, segments: Tensor, mode: str) -> Tensor:
    """The CAE targets E' [N, 1, H, W]: normalised values painted on their superpixels."""
    return broadcast_segments(normalise_values(values, mode), segments)


def train_cae(cae, images, maps, *, epochs, lr, batch_size, device, gen, log) -> None:
    """L1 (mean absolute error) training of the CAE with Adam."""
    opt = torch.optim.Adam(cae.parameters(), lr=lr)
    for epoch in range(epochs):
        cae.train()
        total, count = 0.0, 0
        for idx in _batches(len(images), batch_size, gen):
            loss = F.l1_loss(cae(images[idx].to(device)), maps[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        log("cae", epoch, l1=total / max(count, 1))
    cae.eval()


def train_student(cfg, student, teacher_logits, images, labels, *, device, gen, log) -> None:
    """The XDistillation loss; teacher logits are precomputed (fixed images, frozen teacher)."""
    s = cfg.student
    params = [p for p in student.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=s.lr)
    else:
        opt = torch.optim.SGD(params, lr=s.lr, momentum=0.9)
    for epoch in range(s.epochs):
        student.train()
        sums: dict[str, float] = {}
        count = 0
        for idx in _batches(len(images), s.batch_size, gen):
            x, y, zt = images[idx].to(device), labels[idx].to(device), teacher_logits[idx].to(device)
            logits, feats = student.forward_with_features(x)
            penalty = student.penalty(s.penalty, feats)
            loss, parts = xdistill_loss(
                logits, zt, y, penalty, alpha=s.alpha, tau=s.tau, lam=s.lam, cls_weight=s.cls_weight
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * len(idx)
            count += len(idx)
        log("student", epoch, **{k: v / max(count, 1) for k, v in sums.items()})
    student.eval()


def evaluate(cfg, teacher, student, cae, images, labels, device) -> dict[str, Any]:
    """Accuracy, agreement, CAE fidelity and the explanation metrics per explainer."""
    t_logits, s_logits = predict(teacher, images, device), predict(student, images, device)
    t_pred, s_pred = t_logits.argmax(1), s_logits.argmax(1)
    out: dict[str, Any] = {
        "num_val_images": len(images),
        "teacher_acc": float((t_pred == labels).float().mean()),
        "student_acc": float((s_pred == labels).float().mean()),
        "agreement": float((t_pred == s_pred).float().mean()),
    }
    n = min(cfg.eval.num_images, len(images))
    x, y, tp, sp = images[:n], labels[:n], t_pred[:n], s_pred[:n]
    e = cfg.explain
    segments = slic_segments(x, e.n_segments, e.compactness, e.sigma)
    target = tp if e.target == "predicted" else y
    both_correct = (tp == y) & (sp == y)
    out["num_explained_images"] = n
    out["num_both_correct"] = int(both_correct.sum())
    num_samples = cfg.eval.num_samples if cfg.eval.num_samples is not None else e.num_samples
    per_explainer: dict[str, dict[str, float]] = {}
    teacher_train_explainer = None
    for explainer in cfg.eval.explainers:
        kwargs = dict(
            num_samples=num_samples, hide=e.hide, output=e.output, seed=e.seed, batch_size=e.batch_size,
            lime_kernel_width=e.lime_kernel_width, lime_ridge_alpha=e.lime_ridge_alpha,
        )  # fmt: skip
        args = (x.to(device), segments.to(device), target.to(device))
        vt = explain_superpixels(explainer, teacher, *args, **kwargs).cpu()
        vs = explain_superpixels(explainer, student, *args, **kwargs).cpu()
        if explainer == e.explainer:
            teacher_train_explainer = vt
        mse = explanation_mse(vt, vs, segments, level=cfg.eval.mse_level, normalise=e.normalise)
        valid = segment_valid(segments, vt.shape[1])
        scores = {"mse": float(mse.mean())}
        for k in cfg.eval.topk:
            overlap = topk_sign_overlap(vt, vs, k, valid)
            scores[f"top{k}_sign_overlap"] = float(overlap[both_correct].mean()) if both_correct.any() else math.nan
        per_explainer[explainer] = scores
    out["explanations"] = per_explainer
    if cae is not None:
        if teacher_train_explainer is None:  # the CAE's own explainer was not among the evaluated ones
            teacher_train_explainer = teacher_targets(cfg, teacher, x, y, t_logits[:n], device)["values"]
        maps = cae_target_maps(teacher_train_explainer, segments, e.normalise)
        with torch.no_grad():
            pred = torch.cat([cae(x[i].to(device)).cpu() for i in _batches(n, 256, None)])
        out["cae_val_l1"] = float((pred - maps).abs().mean())
        out["cae_val_mse"] = float((pred - maps).square().mean())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (NaN written as null: JSON has none)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, ordinary_file_mode())  # as an ordinary new file, not mkstemp's 0600
    with os.fdopen(fd, "w") as f:
        json.dump(clean(payload), f, indent=2)
    os.replace(tmp, path)


def run(config: str | os.PathLike | Mapping[str, Any] | XDistillConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Runs the whole pipeline and returns the metrics written to ``out_dir/metrics.json``.

    Args:
        config: a YAML path, a mapping, or an `XDistillConfig`.
        out_dir: run folder (created): ``config.yaml``, ``teacher.pt`` (when trained here),
            ``teacher_explanations.pt``, ``cae.pt``, ``student.pt``, ``metrics.jsonl``, ``metrics.json``.
    """
    import yaml

    if isinstance(config, XDistillConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = xdistill_config_from_dict(config)
    else:
        cfg = load_xdistill_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(xdistill_config_to_dict(cfg), sort_keys=False))
    device = resolve_device(cfg.run.device, key="run.device")
    torch.manual_seed(cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    logger = MetricsLogger(out, tensorboard=False)
    times: dict[str, float] = {}
    log = logger.log
    try:
        start = time.perf_counter()
        xt, yt, xv, yv, num_classes = load_data(cfg)
        channels = xt.shape[1]
        teacher = build_teacher(cfg, channels, num_classes).to(device)
        if cfg.teacher.checkpoint is None:
            train_classifier(
                teacher, xt, yt, epochs=cfg.teacher.epochs, lr=cfg.teacher.lr, batch_size=cfg.teacher.batch_size,
                device=device, gen=gen, log=log,
            )  # fmt: skip
            save_checkpoint(teacher, out / "teacher.pt")
        teacher.eval().requires_grad_(False)
        times["data_and_teacher_s"] = time.perf_counter() - start

        start = time.perf_counter()
        t_logits = predict(teacher, xt, device)
        targets = teacher_targets(cfg, teacher, xt, yt, t_logits, device)
        torch.save(
            {**targets, "explainer": cfg.explain.explainer, "normalise": cfg.explain.normalise},
            out / "teacher_explanations.pt",
        )
        maps = cae_target_maps(targets["values"], targets["segments"], cfg.explain.normalise)
        times["teacher_explanations_s"] = time.perf_counter() - start

        start = time.perf_counter()
        cae = build_cae(cfg.cae.variant, cfg.cae.in_channels).to(device)
        train_cae(
            cae, xt, maps, epochs=cfg.cae.epochs, lr=cfg.cae.lr, batch_size=cfg.cae.batch_size, device=device,
            gen=gen, log=log,
        )  # fmt: skip
        save_checkpoint(cae, out / "cae.pt", variant=cfg.cae.variant, num_params=count_parameters(cae))
        times["cae_s"] = time.perf_counter() - start

        start = time.perf_counter()
        student = build_student(cfg, cae, channels, num_classes).to(device)
        train_student(cfg, student, t_logits, xt, yt, device=device, gen=gen, log=log)
        save_checkpoint(student, out / "student.pt")
        times["student_s"] = time.perf_counter() - start

        start = time.perf_counter()
        metrics = evaluate(cfg, teacher, student, cae, xv, yv, device)
        times["eval_s"] = time.perf_counter() - start
        metrics.update(
            {
                "cae_variant": cfg.cae.variant,
                "cae_params": count_parameters(cae),
                "student_params": count_parameters(student),  # CAE included, as the paper counts
                "student_trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
                "mean_train_segments": float(num_segments(targets["segments"]).float().mean()),
                "student_uses_cae": student.use_cae,
                "train_explainer": cfg.explain.explainer,
                "num_train_images": len(xt),
                "device": str(device),
                "seconds": {k: round(v, 3) for k, v in times.items()},
            }
        )
        _write_json(out / "metrics.json", metrics)
        return metrics
    finally:
        logger.close()


__all__ = ["build_student", "build_teacher", "evaluate", "load_data", "run", "train_cae", "train_student"]
