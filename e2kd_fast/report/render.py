"""The report's HTML (one file, images inlined as base64 PNG, no scripts or external assets) and markdown."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from e2kd_fast.report.plots import curves_png, grid_png, png_bytes

# Table columns in display order: (row key, header, description used in the legend).
COLUMNS = (
    ("method", "method", "none (supervised), kd or e2kd; teacher rows are teachers that are not runs themselves"),
    ("architecture", "architecture", "the registered model name"),
    ("lam", "λ", "weight of the explanation term (e²KD)"),
    ("images", "images", "validation images evaluated"),
    ("top1", "top-1", "top-1 accuracy (multi-label: the top-1 class is present)"),
    ("top5", "top-5", "top-5 accuracy"),
    ("loss", "val loss", "the run's training objective on the validation images (teacher run live; docs/report.md)"),
    ("train_top1", "train top-1", "the student's top-1 on its training batches in the run's last logged epoch"),
    ("map", "mAP", "mean average precision over classes (VOC, all-point interpolated)"),
    ("agreement", "agreement", "share of images where the model's top-1 equals the teacher's"),
    ("explanation_cosine", "expl. sim.", "mean cosine between the model's and the teacher's explanations"),
    ("epg", "EPG", "energy pointing game: share of positive attribution inside the mask / boxes"),
    ("iou", "IoU", "IoU of the thresholded attribution with the mask / boxes"),
    ("fss", "FSS", "UniCAM feature similarity score (from unicam.json)"),
    ("rs", "RS", "UniCAM relevance score (from unicam.json)"),
    ("id_acc", "ID acc", "accuracy where the background matches the class (Waterbirds groups 0, 3)"),
    ("ood_acc", "OOD acc", "accuracy where it does not (groups 1, 2)"),
    ("worst_group_acc", "worst group", "lowest accuracy over groups (group = 2·y + place)"),
    ("mean_group_acc", "mean group", "unweighted mean of the group accuracies"),
)


def table_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, header) of every column that at least one row fills, then group{g}_acc columns."""
    present = [(k, h) for k, h, _ in COLUMNS if any(r.get(k) is not None for r in rows)]
    groups = sorted({k for r in rows for k in r if k.startswith("group") and k.endswith("_acc")})
    return present + [(k, k.replace("_acc", " acc")) for k in groups]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; font-size: 0.9em; }
th { background: #f3f3f3; }
td.name, th.name { text-align: left; }
table.grid td { text-align: center; border: none; padding: 2px; }
table.grid th { background: none; border: none; font-weight: 600; }
img.cell { image-rendering: pixelated; display: block; }
dl { font-size: 0.85em; } dt { font-weight: 600; float: left; width: 9em; } dd { margin-left: 10em; }
"""


def write_html(
    path: Path, title: str, rows: list[dict], curves: dict[str, list[dict]], grid: dict | None, notes: list[str]
) -> Path:
    """Writes the self-contained HTML page; returns its path."""
    esc = html.escape
    columns = table_columns(rows)
    head = "".join(f"<th>{esc(h)}</th>" for _, h in columns)
    body = "".join(
        f"<tr><td class='name'>{esc(str(r['model']))}</td>"
        + "".join(f"<td>{esc(_fmt(r.get(k)))}</td>" for k, _ in columns)
        + "</tr>"
        for r in rows
    )
    legend = "".join(f"<dt>{esc(h)}</dt><dd>{esc(d)}</dd>" for k, h, d in COLUMNS if k in dict(columns))
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Metrics</h2>",
        f"<table><tr><th class='name'>model</th>{head}</tr>{body}</table>",
        f"<dl>{legend}</dl>",
        "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>",
    ]
    curves_image = curves_png(curves)
    parts.append("<h2>Training curves</h2>")
    if curves_image is None:
        parts.append("<p>No run has training records (metrics.jsonl).</p>")
    else:
        parts.append(f"<img alt='training curves' src='{_data_uri(curves_image)}'>")
    if grid is not None:
        parts.append("<h2>Explanations</h2>")
        parts.append(
            "<p>The same validation images for every model, each explained for the class in the first column "
            "(the teacher's top-1; the label without a teacher). B-cos: colour from the dynamic weights, opacity "
            "from their norm where the contribution is positive; standard nets: GradCAM.</p>"
        )
        header = "".join(f"<th>{esc(c)}</th>" for c in grid["columns"])
        grid_rows = []
        for cells, cls, index in zip(grid["cells"], grid["classes"], grid["indices"], strict=True):
            tds = "".join(
                f"<td><img class='cell' alt='{esc(col)}' src='{_data_uri(png_bytes(cell))}'></td>"
                for col, cell in zip(grid["columns"], cells, strict=True)
            )
            grid_rows.append(f"<tr><th>#{index}<br>{esc(cls)}</th>{tds}</tr>")
        parts.append(f"<table class='grid'><tr><th>image, class</th>{header}</tr>{''.join(grid_rows)}</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def write_markdown(
    path: Path, title: str, rows: list[dict], curves: dict[str, list[dict]], grid: dict | None, notes: list[str]
) -> Path:
    """Writes the markdown report, with its pictures in ``<stem>_files/`` beside it; returns its path."""
    columns = table_columns(rows)
    files = path.parent / f"{path.stem}_files"
    lines = [f"# {title}", "", "| model | " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    lines += [f"| {r['model']} | " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    lines.append("")
    lines += [f"- *{h}*: {d}" for k, h, d in COLUMNS if k in dict(columns)]
    lines += [f"- {n}" for n in notes]
    curves_image = curves_png(curves)
    if curves_image is not None:
        files.mkdir(parents=True, exist_ok=True)
        (files / "curves.png").write_bytes(curves_image)
        lines += ["", "## Training curves", "", f"![training curves]({files.name}/curves.png)"]
    if grid is not None:
        files.mkdir(parents=True, exist_ok=True)
        (files / "explanations.png").write_bytes(grid_png(grid["cells"]))
        described = ", ".join(f"#{i} ({c})" for i, c in zip(grid["indices"], grid["classes"], strict=True))
        lines += [
            "",
            "## Explanations",
            "",
            f"Columns: {', '.join(grid['columns'])}. Rows: validation images {described}, each explained for "
            "that class (the teacher's top-1; the label without a teacher).",
            "",
            f"![explanations]({files.name}/explanations.png)",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["COLUMNS", "table_columns", "write_html", "write_markdown"]
