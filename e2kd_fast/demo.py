"""`make demo`: does e²KD transfer a teacher's *reasons*? Measured on built-in data, on the CPU.

1. Generates a Waterbirds-like task (`e2kd_fast.data.waterbirds_synthetic`): the class is decided by
   a foreground "bird", while the background "place" matches the class in the biased training split
   and points to another class in the out-of-distribution (OOD) split.
2. Trains a B-cos teacher on unbiased data, where the background carries no signal: it learns to
   look at the bird.
3. Distils a smaller B-cos student on the *biased* split twice, with KD (logits only) and with e²KD
   (logits and explanations), through the same engine and configs as any run.
4. Evaluates all three on the in-distribution and OOD test splits: accuracy, agreement with the
   teacher, explanation similarity to the teacher, and the energy pointing game (EPG: the share of
   positive contribution that falls on the bird, from the object masks).
5. Writes ``report.md``, ``metrics.json`` and PNG grids of the explanations into the output folder,
   and ``report.html`` comparing the three runs (`e2kd_fast.report`).

On the biased split the background alone predicts the teacher's outputs, so a KD student can match
the teacher by looking at the background; e²KD also asks it to match *where* the teacher looks.

    python -m e2kd_fast.demo --out runs/demo [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from e2kd_fast.config import config_from_dict
from e2kd_fast.data import ImageFolderDataset, collate_skipping, generate_waterbirds_like
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.folders import class_folders
from e2kd_fast.data.transforms import PairedResizeCenterCrop, PairedTransform
from e2kd_fast.engine import Trainer
from e2kd_fast.engine.builders import resolve_device
from e2kd_fast.engine.evaluate import evaluate
from e2kd_fast.explain import dynamic_weights
from e2kd_fast.models import create_model, load_checkpoint
from e2kd_fast.report import make_report
from e2kd_fast.report.plots import ExplanationGrid, explanation_picture, grid_png, input_picture


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (the defaults fit in minutes on a 2-core CPU)."""

    num_classes: int = 4
    image_size: int = 32
    train_images: int = 1600
    test_images: int = 400
    teacher: str = "bcos_resnet32_cifar"
    student: str = "bcos_resnet20_cifar"
    teacher_epochs: int = 5
    student_epochs: int = 8
    lam: float = 5.0
    batch_size: int = 64
    bias: float = 1.0


QUICK = DemoSettings(train_images=64, test_images=32, teacher_epochs=1, student_epochs=1, batch_size=16)


def _run_config(settings: DemoSettings, out: Path, name: str, **sections) -> dict:
    cfg = {
        "student": {"name": settings.student, "num_classes": settings.num_classes},
        "optim": {"lr": 1e-3, "warmup_epochs": 0},
        "data": {
            "root": str(out / "data"),
            "image_size": settings.image_size,
            "eval_resize": settings.image_size,
            "crop_scale_min": 0.6,
            "batch_size": settings.batch_size,
            "num_workers": 0,
            "val_split": "val",
        },
        "train": {
            "out_dir": str(out / name),
            "log_every_steps": 10,
            "seed": 0,
            "device": "auto",
            # On a 2-core CPU compiling takes minutes, more than these small models gain from it.
            "compile": False,
        },
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _train(cfg_dict: dict, show_progress: bool) -> Path:
    cfg = config_from_dict(cfg_dict)
    data = build_datasets(cfg)
    trainer = Trainer(cfg, data.train, data.val, train_indices=data.train_indices, show_progress=show_progress)
    trainer.fit(overwrite=True)  # the demo's own run folders: a second demo into the same folder starts over
    return Path(cfg.train.out_dir) / "checkpoints" / "last.pt"


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), show_progress: bool = True) -> dict:
    """Runs the whole demo into ``out`` and returns the metrics per model."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    n, t = settings.train_images, settings.test_images
    generate_waterbirds_like(
        out / "data",
        num_classes=settings.num_classes,
        image_size=settings.image_size,
        per_split={"train_biased": n, "train_unbiased": n, "val": t // 2, "test_id": t, "test_ood": t},
        bias=settings.bias,
        seed=0,
    )
    print(f"[demo] data in {out / 'data'}; training the teacher ({settings.teacher}) on unbiased data")
    teacher_ckpt = _train(
        _run_config(
            settings,
            out,
            "teacher",
            student={"name": settings.teacher},
            distill={"method": "none"},
            data={"train_split": "train_unbiased"},
            train={"epochs": settings.teacher_epochs},
        ),
        show_progress,
    )
    teacher_section = {"name": settings.teacher, "checkpoint": str(teacher_ckpt), "num_classes": settings.num_classes}
    checkpoints = {"teacher": teacher_ckpt}
    for method, lam in (("kd", 0.0), ("e2kd", settings.lam)):
        print(f"[demo] distilling {settings.student} on the biased split with {method.upper()}")
        checkpoints[method] = _train(
            _run_config(
                settings,
                out,
                method,
                teacher=teacher_section,
                distill={"method": method, "lam": lam},
                data={"train_split": "train_biased"},
                train={"epochs": settings.student_epochs},
            ),
            show_progress,
        )

    models = {}
    for name, ckpt in checkpoints.items():
        arch = settings.teacher if name == "teacher" else settings.student
        model = create_model(arch, num_classes=settings.num_classes)
        load_checkpoint(model, ckpt)
        models[name] = model.eval()

    report = make_report(
        [out / name for name in ("teacher", "kd", "e2kd")],
        out,
        images=settings.num_classes,
        split="test_ood",
        markdown_name=None,  # report.md below stays the demo's own summary
        title="e2kd-fast demo: teacher, KD and e²KD students on the OOD split",
    )
    metrics = evaluate_demo(report["rows"], models, out / "data", settings)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_report(out, models, settings, metrics, time.perf_counter() - started)
    return metrics


def _split_batch(root: Path, split: str, settings: DemoSettings) -> dict:
    geometry = PairedResizeCenterCrop(settings.image_size, settings.image_size)
    dataset = ImageFolderDataset(root, split, transform=PairedTransform(geometry, "bcos"), masks_root=root / "masks")
    return collate_skipping([dataset[i] for i in range(len(dataset))])


def evaluate_demo(
    report_rows: list[dict], models: dict[str, torch.nn.Module], root: Path, settings: DemoSettings
) -> dict[str, dict]:
    """id_acc, and on the OOD split ood_acc, agreement, explanation_similarity and EPG per model.

    The OOD scores are those `make_report` measured (its rows, one per run folder: top-1, agreement
    and explanation cosine from `e2kd_fast.engine.evaluate`, EPG of the true-class contribution map
    from `e2kd_fast.metrics.localisation`); only the in-distribution accuracy is evaluated here.
    """
    device = resolve_device("auto")
    id_batch = _split_batch(root, "test_id", settings)
    rows = {row["model"]: row for row in report_rows}
    results = {}
    for name, model in models.items():
        row = rows[name]
        id_acc = evaluate(model.to(device), [id_batch], explanation=None, device=device)["top1"]
        results[name] = {
            "id_acc": round(id_acc, 4),
            "ood_acc": round(row["top1"], 4),
            "agreement": round(row["agreement"], 4),
            "explanation_similarity": round(row["explanation_cosine"], 4),
            "epg": round(row["epg"], 4),
        }
    return results


def explanation_grid(models: dict[str, torch.nn.Module], ood: dict, classes: list[str], num_classes: int):
    """The labelled grid of ``explanations_ood.png``: one OOD image per class, explained by every model.

    ``models`` maps names to B-cos models and holds a ``"teacher"``; ``ood`` is a collated batch with
    at least one image of each of the ``num_classes`` classes named by ``classes``.

    Each row is explained for the teacher's top-1; its header gives the true class and that class
    (red when the teacher is wrong), and each model's top-1 is written under its picture.
    """
    picks = [int(torch.nonzero(ood["target"] == c)[0]) for c in range(num_classes)]
    x6, truth = ood["image"][picks], ood["target"][picks].tolist()
    with torch.no_grad():
        top1 = {name: model(x6).argmax(1).tolist() for name, model in models.items()}
    teacher_top1 = torch.tensor(top1["teacher"])
    columns = [[input_picture(x) for x in x6]]
    for name in models:
        weights = dynamic_weights(models[name], x6, teacher_top1, create_graph=False)
        columns.append([explanation_picture(x, w) for x, w in zip(x6, weights, strict=True)])
    wrong = [[False] + [top1[name][r] != truth[r] for name in models] for r in range(len(picks))]
    teacher_wrong = [top1["teacher"][r] != truth[r] for r in range(len(picks))]
    return ExplanationGrid(
        columns=["image", *(_DISPLAY_NAMES.get(name, name) for name in models)],
        cells=[list(row) for row in zip(*columns, strict=True)],
        row_labels=[
            f"true: {classes[truth[r]]}\nexplained: {classes[top1['teacher'][r]]}"
            + ("\n✗ teacher wrong" if teacher_wrong[r] else "")
            for r in range(len(picks))
        ],
        captions=[[""] + [f"top-1: {classes[top1[name][r]]}" for name in models] for r in range(len(picks))],
        wrong=wrong,
        row_wrong=teacher_wrong,
    )


_DISPLAY_NAMES = {"kd": "KD", "e2kd": "e²KD"}


def _write_report(out: Path, models: dict, settings: DemoSettings, metrics: dict, seconds: float) -> None:
    ood = _split_batch(out / "data", "test_ood", settings)
    classes = class_folders(out / "data", "test_ood")
    grid = explanation_grid(
        {name: models[name] for name in ("teacher", "kd", "e2kd")}, ood, classes, settings.num_classes
    )
    (out / "explanations_ood.png").write_bytes(grid_png(grid))

    rows = "\n".join(
        f"| {name} | {m['id_acc']:.3f} | {m['ood_acc']:.3f} | {m['agreement']:.3f} | "
        f"{m['explanation_similarity']:.3f} | {m['epg']:.3f} |"
        for name, m in metrics.items()
    )
    kd, e2kd = metrics["kd"], metrics["e2kd"]
    verdict = (
        "e²KD is ahead of KD on OOD accuracy and on explanation similarity."
        if e2kd["ood_acc"] > kd["ood_acc"] and e2kd["explanation_similarity"] > kd["explanation_similarity"]
        else "e²KD is NOT ahead of KD on both OOD accuracy and explanation similarity in this run."
    )
    (out / "report.md").write_text(
        f"""# e2kd-fast demo: KD vs e²KD on a Waterbirds-like task

Teacher `{settings.teacher}` trained on unbiased data ({settings.teacher_epochs} epochs); students
`{settings.student}` distilled on the biased split ({settings.train_images} images, background = class
with probability {settings.bias}) for {settings.student_epochs} epochs, KD (λ = 0) and e²KD (λ = {settings.lam},
τ = 1). OOD test: the background points to another class. Wall time {seconds / 60:.1f} min.

| model | ID acc | OOD acc | agreement (OOD) | explanation similarity (OOD) | EPG (OOD) |
|---|---|---|---|---|---|
{rows}

{verdict}

- *agreement*: the student's top-1 equals the teacher's; *explanation similarity*: cosine between the
  model's and the teacher's dynamic weights for the teacher's top-1; *EPG*: share of the positive
  contribution (for the true class) inside the bird's mask.
- `explanations_ood.png`: one OOD image per class (rows: its true class and the class explained, the
  teacher's top-1); columns: image, teacher, KD, e²KD explanations, each model's top-1 under its
  picture (red, ✗: wrong).
- Training logs: `teacher/`, `kd/`, `e2kd/` (`metrics.jsonl`, TensorBoard in `tb/`, checkpoints).
"""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    metrics = run_demo(args.out, QUICK if args.quick else DemoSettings(), show_progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"[demo] report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
