"""The report's HTML (one file, images inlined as base64 PNG, no scripts or external assets) and markdown."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from e2kd_fast.report.plots import GRADCAM_KEY, ExplanationGrid, colour_key_png, curves_png, grid_png, png_bytes

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
img.cell { image-rendering: pixelated; display: block; margin: auto; border: 3px solid transparent; }
img.cell.wrong { border-color: #c62828; }
table.grid th.row { text-align: left; font-weight: normal; font-size: 0.85em; padding-right: 1em; }
table.grid tr.misclassified th.row { border-left: 4px solid #c62828; }
.wrong { color: #c62828; font-weight: 600; }
div.pred { font-size: 0.8em; }
dl { font-size: 0.85em; } dt { font-weight: 600; float: left; width: 9em; } dd { margin-left: 10em; }
"""


_EXPLAINED_AS = "the reference teacher's top-1"
_EXPLAINED_AS_LABEL = "the label: no run has a teacher"


def _methods(rows: list[dict]) -> dict[str, str]:
    """Run name → distill.method, from the table (curves are keyed by the same names)."""
    return {str(r["model"]): r["method"] for r in rows if r.get("method")}


def _caption(grid: dict, row: int, column: int) -> tuple[str, bool]:
    """The text under a grid cell (a model's top-1; none under the image) and whether it is wrong."""
    if column == 0 or "predictions" not in grid:
        return "", False
    return f"top-1: {grid['predictions'][row][column - 1]}", not grid["correct"][row][column - 1]


def _row_wrong(grid: dict, row: int) -> bool:
    flags = grid.get("explained_correct")
    return flags is not None and not flags[row]


def labelled_grid(grid: dict) -> ExplanationGrid:
    """The report's grid dict (`e2kd_fast.report.build`) as a labelled `ExplanationGrid` picture."""
    rows = range(len(grid["cells"]))
    captions = [[_caption(grid, r, c) for c in range(len(grid["columns"]))] for r in rows]
    return ExplanationGrid(
        columns=list(grid["columns"]),
        cells=grid["cells"],
        row_labels=[
            f"#{grid['indices'][r]}\ntrue: {grid['labels'][r]}\nexplained: {grid['classes'][r]}"
            + ("\n✗ misclassified" if _row_wrong(grid, r) else "")
            for r in rows
        ],
        captions=[[text for text, _ in row] for row in captions],
        wrong=[[wrong for _, wrong in row] for row in captions],
        row_wrong=[_row_wrong(grid, r) for r in rows],
        colour_key=GRADCAM_KEY if grid.get("gradcam") else None,
    )


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
    curves_image = curves_png(curves, _methods(rows))
    parts.append("<h2>Training curves</h2>")
    if curves_image is None:
        parts.append("<p>No run has training records (metrics.jsonl).</p>")
    else:
        parts.append(f"<img alt='training curves' src='{_data_uri(curves_image)}'>")
    if grid is not None:
        parts.append("<h2>Explanations</h2>")
        parts.append(
            "<p>The same validation images for every model, each explained for the class its row names "
            f"({_EXPLAINED_AS if grid.get('explained_correct') is not None else _EXPLAINED_AS_LABEL}). "
            "Under each picture: that model's top-1; a wrong one is red and framed (✗), and a row whose "
            "explained class is not the image's label is marked red. B-cos: colour from the dynamic weights, "
            "opacity from their norm where the contribution is positive; standard nets: GradCAM over the image"
            f"{' (colour key below)' if grid.get('gradcam') else ''}.</p>"
        )
        header = "".join(f"<th>{esc(c)}</th>" for c in grid["columns"])
        grid_rows = []
        for r, cells in enumerate(grid["cells"]):
            tds = []
            for c, (col, cell) in enumerate(zip(grid["columns"], cells, strict=True)):
                caption, wrong = _caption(grid, r, c)
                tds.append(
                    f"<td><img class='cell{' wrong' if wrong else ''}' alt='{esc(col)}' "
                    f"src='{_data_uri(png_bytes(cell))}'>"
                    + (f"<div class='pred{' wrong' if wrong else ''}'>{esc(caption)}</div>" if caption else "")
                    + "</td>"
                )
            misclassified = _row_wrong(grid, r)
            head = [f"#{grid['indices'][r]}", f"true: {grid['labels'][r]}", f"explained: {grid['classes'][r]}"]
            if misclassified:
                head.append("<span class='wrong'>✗ misclassified</span>")
            row_class = " class='misclassified'" if misclassified else ""
            header_cell = "<br>".join(h if h.startswith("<span") else esc(h) for h in head)
            grid_rows.append(f"<tr{row_class}><th class='row'>{header_cell}</th>{''.join(tds)}</tr>")
        parts.append(f"<table class='grid'><tr><th>image, label</th>{header}</tr>{''.join(grid_rows)}</table>")
        if grid.get("gradcam"):
            parts.append(f"<p><img alt='colour key: {esc(GRADCAM_KEY)}' src='{_data_uri(colour_key_png())}'></p>")
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
    curves_image = curves_png(curves, _methods(rows))
    if curves_image is not None:
        files.mkdir(parents=True, exist_ok=True)
        (files / "curves.png").write_bytes(curves_image)
        lines += ["", "## Training curves", "", f"![training curves]({files.name}/curves.png)"]
    if grid is not None:
        files.mkdir(parents=True, exist_ok=True)
        (files / "explanations.png").write_bytes(grid_png(labelled_grid(grid)))
        described = ", ".join(
            f"#{i} ({label}, explained as {cls}{', misclassified' if _row_wrong(grid, r) else ''})"
            for r, (i, label, cls) in enumerate(zip(grid["indices"], grid["labels"], grid["classes"], strict=True))
        )
        explained_as = _EXPLAINED_AS if grid.get("explained_correct") is not None else _EXPLAINED_AS_LABEL
        lines += [
            "",
            "## Explanations",
            "",
            f"Columns: {', '.join(grid['columns'])}. Rows: validation images {described}, each explained for "
            f"the class its row names ({explained_as}). Under each picture: that model's top-1 (red, ✗: wrong).",
            "",
            f"![explanations]({files.name}/explanations.png)",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["COLUMNS", "labelled_grid", "table_columns", "write_html", "write_markdown"]
