"""`e2kd-fast report RUN [RUN ...] --out DIR`: compare training runs in one self-contained page.

For every run folder (as the trainer writes it: ``config.yaml``, ``checkpoints/last.pt``,
``metrics.jsonl``, ``summary.json``) the report

1. rebuilds the student from ``config.yaml`` and loads its checkpoint (``last`` or the ``best`` one
   listed in ``summary.json``), and rebuilds the run's teacher from the same file;
2. evaluates the student on the run's validation data (or another split, ``split``) with
   `e2kd_fast.engine.evaluate`: top-1/top-5, agreement with the teacher, explanation similarity,
   VOC mAP, Waterbirds group and worst-group accuracy;
3. measures localisation where the data has masks or boxes: the energy pointing game and IoU from
   `e2kd_fast.metrics.localisation` of the contribution map (B-cos) or GradCAM (standard nets) of
   the true class (every present class on VOC); ``<root>/masks/<split>/`` for image folders, the
   annotation boxes for VOC;
4. reads FSS / RS from ``<run>/unicam.json`` when a UniCAM analysis wrote one;
5. plots the training curves of ``metrics.jsonl`` and draws the explanations of the same
   validation images for the teacher and every run.

A teacher that is not itself one of the runs gets its own row. Rows and pictures are written to
``report.html`` (images inlined as base64 PNG), ``report.md`` (pictures in ``report_files/``) and
``report.json`` (the table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from e2kd_fast.config import Config, load_config
from e2kd_fast.data import ImageFolderDataset, collate_skipping
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.folders import class_folders
from e2kd_fast.data.transforms import PairedResizeCenterCrop, PairedTransform
from e2kd_fast.data.voc import VOCDataset
from e2kd_fast.engine.builders import resolve_device
from e2kd_fast.engine.evaluate import ValidationLoss, evaluate
from e2kd_fast.engine.logging import read_metrics
from e2kd_fast.explain import contribution_map, dynamic_weights, gradcam
from e2kd_fast.metrics import localisation
from e2kd_fast.metrics.unicam import feature_similarity_score, relevance_score
from e2kd_fast.models import create_model, load_checkpoint
from e2kd_fast.report import render
from e2kd_fast.report.plots import explanation_picture, input_picture


class ReportError(ValueError):
    """A run folder that the report cannot read (the message names the file)."""


@dataclass
class Run:
    """One run folder and what the report derived from it."""

    name: str
    path: Path
    cfg: Config
    checkpoint: Path
    summary: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, prefixed with their parent where two runs share one (``a/e2kd``, ``b/e2kd``)."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def load_run(path: str | os.PathLike, checkpoint: str = "last", name: str | None = None) -> Run:
    """Reads a run folder.

    Args:
        path: the run's ``train.out_dir``.
        checkpoint: ``"last"`` (``checkpoints/last.pt``), ``"best"`` (the first of ``summary.json``'s
            ``best`` list) or a path to a checkpoint file.
        name: the run's label (default: the folder name).

    Raises:
        ReportError / FileNotFoundError: no ``config.yaml``, no such checkpoint, unreadable summary.
    """
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"not a run folder (no config.yaml): {path}")
    cfg = load_config(path / "config.yaml")
    summary: dict = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path / 'summary.json'}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if checkpoint == "last":
        ckpt = path / "checkpoints" / "last.pt"
    elif checkpoint == "best":
        best = summary.get("best") or []
        if not best:
            raise ReportError(f"{path / 'summary.json'} lists no best checkpoint; use checkpoint 'last'")
        ckpt = path / best[0]["checkpoint"]  # absolute (older summaries: relative to the run folder)
        if not ckpt.is_file():  # a moved or copied run folder: its own file of that name
            ckpt = path / "checkpoints" / ckpt.name
    else:
        ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint of run {path} not found: {ckpt}")
    try:
        records = read_metrics(path)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path / 'metrics.jsonl'}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return Run(name or path.name, path, cfg, ckpt, summary, records)


# ----------------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    return getattr(model, "e2kd_family", "bcos")


def _load(name: str, num_classes: int | None, checkpoint: Path | str | None, kwargs: dict | None = None) -> nn.Module:
    model = create_model(name, num_classes=num_classes, **(kwargs or {}))
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval().requires_grad_(False)


def _eval_config(cfg: Config, split: str | None) -> Config:
    """The run's config with its validation split replaced by ``split`` (no held-out draw then)."""
    if split is None:
        return cfg
    data = dataclasses.replace(cfg.data, val_split=split, val_per_class=None, shots=None)
    return dataclasses.replace(cfg, data=data)


def _val_data(cfg: Config, split: str | None, limit: int | None) -> tuple[Any, Tensor]:
    bundle = build_datasets(_eval_config(cfg, split), train=False)
    if bundle.val is None:
        raise ReportError(f"{cfg.train.out_dir}: the config has no validation data (data.val_split)")
    indices = bundle.val_indices if bundle.val_indices is not None else torch.arange(len(bundle.val))
    return bundle.val, indices[:limit] if limit else indices


def _localisation_data(cfg: Config, split: str | None, encoding: str, limit: int | None):
    """(dataset, indices, kind) with per-image masks, or None when the data has neither masks nor boxes."""
    cfg = _eval_config(cfg, split)
    data = cfg.data
    if data.root is None:
        return None
    if data.dataset == "voc":
        dataset = VOCDataset(data.root, data.val_split, box_size=data.image_size, encoding=encoding)
        return dataset, torch.arange(len(dataset))[:limit] if limit else torch.arange(len(dataset)), "boxes"
    masks = Path(data.root) / "masks"
    if data.dataset == "folder" and (masks / data.val_split).is_dir():
        geometry = PairedResizeCenterCrop(data.image_size, data.eval_resize)
        dataset = ImageFolderDataset(
            data.root,
            data.val_split,
            transform=PairedTransform(geometry, encoding),
            masks_root=masks,
            classes=class_folders(data.root, data.train_split),  # the labels the run was trained with
        )
        indices = torch.arange(len(dataset))
        return dataset, indices[:limit] if limit else indices, "masks"
    return None


def _batches(dataset, indices: Tensor, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield collate_skipping([dataset[int(i)] for i in indices[start : start + batch_size]])


def attribution(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The map localisation is measured on: Σ_c x·W (B-cos contribution map) or GradCAM; [N, H, W]."""
    if _family(model) == "bcos":
        weights = dynamic_weights(model, x, target, algorithm="sweep", create_graph=False)
        return contribution_map(x, weights).detach()
    return gradcam(model, x, target, create_graph=False)[:, 0].detach()


def explanation(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """What e²KD compares: the dynamic weights [N, 6, H, W] (B-cos) or GradCAM [N, 1, H, W]."""
    if _family(model) == "bcos":
        return dynamic_weights(model, x, target, algorithm="sweep", create_graph=False).detach()
    return gradcam(model, x, target, create_graph=False).detach()


def localisation_scores(
    model: nn.Module, dataset, indices: Tensor, kind: str, device: torch.device, batch_size: int = 32
) -> dict[str, float]:
    """Mean EPG and IoU of ``model``'s attributions against masks (true class) or VOC boxes (each present class).

    Uses `e2kd_fast.metrics.localisation` (``energy_pointing_game``, ``iou``).
    """
    sums: dict[str, float] = {}
    count = 0
    model = model.to(device)
    for batch in _batches(dataset, indices, batch_size):
        if batch["image"].shape[0] == 0:
            continue
        x = batch["image"].to(device)
        if kind == "boxes":  # explain every (image, present class) pair against that class's boxes
            present = batch["target"] > 0
            rows, classes = present.nonzero(as_tuple=True)
            x, target = x[rows.to(device)], classes.to(device)
            masks = batch["box_masks"][rows, classes].to(device)
        else:
            target, masks = batch["target"].to(device), batch["mask"].to(device)
        maps = attribution(model, x, target)
        scores = {"epg": localisation.energy_pointing_game(maps, masks), "iou": localisation.iou(maps, masks)}
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + float(torch.as_tensor(value, dtype=torch.float64).sum())
        count += x.shape[0]
    return {key: value / count for key, value in sums.items()} if count else {}


def computed_unicam_scores(
    student: nn.Module, teacher: nn.Module, dataset, indices: Tensor, device: torch.device
) -> dict[str, float]:
    """FSS (student vs teacher) and RS (student given teacher, one-hot labels), averaged over stages.

    Uses `e2kd_fast.metrics.unicam` on the evaluated images (single-label data only); {} when the
    labels are multi-hot or the models' stages do not pair up.
    """
    batch = next(_batches(dataset, indices, len(indices)), None)
    if batch is None or batch["image"].shape[0] < 4 or batch["target"].dim() != 1:
        return {}
    x, labels = batch["image"].to(device), batch["target"]
    try:
        fss = feature_similarity_score(student.to(device), teacher.to(device), x)
        rs = relevance_score(student, x, labels, given=teacher)
    except ValueError:  # unpaired stages, or too few images per class for the U-statistic
        return {}
    return {"fss": sum(fss.values()) / len(fss), "rs": sum(rs.values()) / len(rs)}


def unicam_scores(run_dir: Path) -> dict[str, float]:
    """``fss`` and ``rs`` from ``<run>/unicam.json`` if present (a per-stage FSS list is averaged)."""
    path = run_dir / "unicam.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    out = {}
    for key in ("fss", "rs"):
        value = data.get(key)
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list) and value:
            value = sum(value) / len(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A model in the report: a run's student, or a teacher that is not itself a run."""

    label: str
    model: nn.Module
    cfg: Config
    teacher_key: tuple | None
    run: Run | None = None


def _teacher_key(cfg: Config) -> tuple | None:
    t = cfg.teacher
    if t.name is None or cfg.distill.method == "none":
        return None
    ckpt = str(Path(t.checkpoint).resolve()) if t.checkpoint else None
    return (t.name, t.num_classes, ckpt)


def make_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    images: int = 4,
    checkpoint: str = "last",
    split: str | None = None,
    max_eval: int | None = None,
    device: str = "auto",
    unicam: bool = False,
    html_name: str = "report.html",
    markdown_name: str | None = "report.md",
    title: str = "e2kd-fast report",
) -> dict[str, Any]:
    """Evaluates the runs and writes the report (see the module docstring).

    Args:
        runs: run folders.
        out: output folder.
        images: validation images in the explanation grid.
        checkpoint: ``"last"`` or ``"best"`` (see `load_run`).
        split: evaluate on this split instead of each run's ``data.val_split``.
        max_eval: evaluate on the first N validation images only (None: all).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        unicam: also compute FSS / RS of each student against its teacher (`computed_unicam_scores`);
            otherwise they are read from ``<run>/unicam.json`` when present.
        html_name, markdown_name: file names in ``out`` (markdown None: HTML only).
        title: the page title.

    Returns:
        ``{"rows": [{"model": ..., metric: value, ...}], "html": path, "markdown": path or None}``.
    """
    if not runs:
        raise ReportError("no run folders given")
    if images < 0:
        raise ReportError(f"images must be >= 0, got {images}")
    paths = [Path(r) for r in runs]
    loaded = [load_run(p, checkpoint, name) for p, name in zip(paths, _unique_names(paths), strict=True)]
    dev = resolve_device(device)

    teachers: dict[tuple, nn.Module] = {}
    for run in loaded:
        key = _teacher_key(run.cfg)
        if key is not None and key not in teachers:
            t = run.cfg.teacher
            teachers[key] = _load(t.name, t.num_classes, t.checkpoint)
    run_checkpoints = {str(r.checkpoint.resolve()) for r in loaded}
    entries: list[_Entry] = []
    for key, model in teachers.items():
        if key[2] is None or key[2] not in run_checkpoints:  # a teacher that is not itself a run
            owner = next(r for r in loaded if _teacher_key(r.cfg) == key)
            entries.append(_Entry(f"teacher ({key[0]})", model, owner.cfg, key))
    reference = next(iter(teachers), None)
    for run in loaded:
        s = run.cfg.student
        model = _load(s.name, s.num_classes, run.checkpoint, dict(s.kwargs))
        entries.append(_Entry(run.name, model, run.cfg, _teacher_key(run.cfg) or reference, run))

    rows = []
    for entry in entries:
        teacher = teachers.get(entry.teacher_key) if entry.teacher_key is not None else None
        same_family = teacher is not None and _family(teacher) == _family(entry.model)
        kind = ("bcos" if _family(entry.model) == "bcos" else "gradcam") if same_family else None
        dataset, indices = _val_data(entry.cfg, split, max_eval)
        batch_size = entry.cfg.data.eval_batch_size or entry.cfg.data.batch_size
        metrics = evaluate(
            entry.model.to(dev),
            _batches(dataset, indices, batch_size),
            teacher=None if teacher is None or not same_family else teacher.to(dev),
            explanation=kind,
            device=dev,
            # A run's own objective (teacher rows and runs evaluated against another family's teacher: none)
            loss=None if entry.run is None else ValidationLoss.from_config(entry.cfg, _family(entry.model) == "bcos"),
        )
        row: dict[str, Any] = {
            "model": entry.label,
            "method": entry.cfg.distill.method if entry.run is not None else "teacher",
            "architecture": getattr(entry.model, "e2kd_name", entry.cfg.student.name),
            "lam": entry.cfg.distill.lam if entry.run is not None and entry.cfg.distill.method == "e2kd" else None,
            **{k: v for k, v in metrics.items() if k != "skipped"},
            "train_top1": None if entry.run is None else _last_train_top1(entry.run.records),
        }
        encoding = "bcos" if _family(entry.model) == "bcos" else "standard"
        loc = _localisation_data(entry.cfg, split, encoding, max_eval)
        if loc is not None:
            row.update(localisation_scores(entry.model, *loc, dev, batch_size))
        if entry.run is not None:
            row.update(unicam_scores(entry.run.path))
            if unicam and teacher is not None and "fss" not in row:
                row.update(computed_unicam_scores(entry.model, teacher, dataset, indices, dev))
        rows.append(row)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = _explanation_grid(entries, teachers, reference, split, images, dev) if images else None
    curves = {run.name: run.records for run in loaded}
    notes = _notes(rows, split, checkpoint, max_eval)
    html_path = render.write_html(out / html_name, title, rows, curves, grid, notes)
    md_path = None
    if markdown_name is not None:
        md_path = render.write_markdown(out / markdown_name, title, rows, curves, grid, notes)
    (out / "report.json").write_text(json.dumps({"rows": _json_safe(rows)}, indent=2) + "\n")
    return {"rows": rows, "html": html_path, "markdown": md_path}


def _last_train_top1(records: list[dict]) -> float | None:
    """The ``epoch_top1`` of the run's last epoch that logged one (metrics.jsonl), or None."""
    values = [r["epoch_top1"] for r in records if r.get("kind") == "train" and "epoch_top1" in r]
    return float(values[-1]) if values else None


def _notes(rows: list[dict], split: str | None, checkpoint: str, max_eval: int | None) -> list[str]:
    notes = [
        f"Evaluated on {'split ' + repr(split) if split else 'each run’s validation data'}"
        f"{f' (first {max_eval} images)' if max_eval else ''}, checkpoint `{checkpoint}`.",
    ]
    if not any("epg" in r for r in rows):
        notes.append("EPG / IoU: the validation data has no masks or boxes.")
    if not any("fss" in r or "rs" in r for r in rows):
        notes.append("FSS / RS: not computed (pass unicam=True / --unicam) and no run folder holds a unicam.json.")
    return notes


def _json_safe(rows: list[dict]) -> list[dict]:
    def fix(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return [{k: fix(v) for k, v in row.items()} for row in rows]


def _class_name(names, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def _explanation_grid(entries, teachers, reference, split, images, device):
    """One validation image per row, then each model's explanation of the same class (see render).

    Returns a dict: ``columns`` ("image", then the models), ``cells`` (rows × columns pictures),
    ``indices`` (dataset indices), ``labels`` (true class names; multi-label: the present ones joined
    by "+"), ``classes`` (the explained class), ``explained_correct`` (the explained class is a true
    one; None without a teacher, where it is the label), ``predictions`` / ``correct`` (rows × models:
    each model's top-1 and whether it is a true class) and ``gradcam`` (some cell is a GradCAM overlay).
    """
    first = entries[0]
    dataset, indices = _val_data(first.cfg, split, None)
    if len(indices) == 0:
        return None
    picks = indices[torch.linspace(0, len(indices) - 1, min(images, len(indices))).round().long()]
    ref_teacher = teachers.get(reference) if reference is not None else None
    columns = ["image"] + [e.label for e in entries]
    per_entry = []
    for entry in entries:
        ds, _ = _val_data(entry.cfg, split, None) if entry.cfg is not first.cfg else (dataset, indices)
        batch = next(_batches(ds, picks, len(picks)))
        per_entry.append(batch)
    base = per_entry[0]
    labels = base["target"]
    present = [set(row.nonzero()[:, 0].tolist()) for row in labels] if labels.dim() == 2 else None
    truths = present or [{int(t)} for t in labels]
    by_teacher = ref_teacher is not None and _family(ref_teacher) == _family(entries[0].model)
    with torch.no_grad():
        if by_teacher:
            targets = ref_teacher.to(device)(base["image"].to(device)).argmax(1)
        else:
            targets = (labels.argmax(1) if labels.dim() == 2 else labels).to(device)
    pictures, predictions = [], []
    gradcam_drawn = False
    for entry, batch in zip(entries, per_entry, strict=True):
        x = batch["image"].to(device)
        model = entry.model.to(device)
        maps = explanation(model, x, targets)
        gradcam_drawn |= maps.shape[1] != 6
        pictures.append([explanation_picture(x[i], maps[i]) for i in range(x.shape[0])])
        with torch.no_grad():
            predictions.append(model(x).argmax(1).cpu().tolist())
    names = getattr(dataset, "classes", None)
    cells = [[input_picture(base["image"][i])] + [p[i] for p in pictures] for i in range(len(picks))]
    explained = [int(t) for t in targets.cpu()]
    return {
        "columns": columns,
        "cells": cells,
        "indices": [int(i) for i in picks],
        "labels": ["+".join(_class_name(names, c) for c in sorted(truth)) for truth in truths],
        "classes": [_class_name(names, t) for t in explained],
        "explained_correct": [t in truth for t, truth in zip(explained, truths, strict=True)] if by_teacher else None,
        "predictions": [[_class_name(names, p[i]) for p in predictions] for i in range(len(picks))],
        "correct": [[p[i] in truths[i] for p in predictions] for i in range(len(picks))],
        "gradcam": gradcam_drawn,
    }


__all__ = [
    "ReportError",
    "Run",
    "attribution",
    "computed_unicam_scores",
    "load_run",
    "localisation_scores",
    "make_report",
    "unicam_scores",
]
