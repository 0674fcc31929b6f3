"""Pictures of the report: explanation cells, the labelled explanation grid and the training curves (PNG bytes)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from e2kd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2kd_fast.explain import GRADCAM_COLORMAP, explanation_to_rgba, gradcam_overlay

_MIN_SIDE = 96  # small inputs (32 px) are enlarged with nearest-neighbour so that pixels stay visible


def input_picture(x: Tensor) -> np.ndarray:
    """The RGB image in [0, 1], [H, W, 3], from a model input: [x, 1 − x] (6 ch.) or mean/std-normalised (3 ch.)."""
    x = x.detach().float().cpu()
    if x.shape[0] == 6:
        rgb = x[:3]
    else:
        mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = x.new_tensor(IMAGENET_STD)[:, None, None]
        rgb = x * std + mean
    return rgb.clamp(0, 1).permute(1, 2, 0).numpy()


def explanation_picture(x: Tensor, explanation: Tensor) -> np.ndarray:
    """[H, W, 3] in [0, 1]: the B-cos colour picture on black (6-channel W) or a GradCAM overlay ([1, H, W]).

    GradCAM is drawn through the matplotlib colormap `GRADCAM_COLORMAP` over the image; pictures that
    hold one show `GRADCAM_KEY` as their colour bar.
    """
    if explanation.shape[0] == 6:
        rgba = explanation_to_rgba(x.detach().cpu(), explanation.detach().cpu())
        return rgba[..., :3] * rgba[..., 3:]
    return gradcam_overlay(input_picture(x), explanation)


def png_bytes(picture: np.ndarray, min_side: int = _MIN_SIDE) -> bytes:
    """PNG of a float [H, W, 3] picture in [0, 1], enlarged by an integer factor to at least ``min_side``."""
    image = Image.fromarray((np.clip(picture, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, math.ceil(min_side / min(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


GRADCAM_KEY = "GradCAM ÷ its maximum per image"
WRONG_COLOUR = "#c62828"  # misclassified: row headers, captions and cell frames


@dataclass
class ExplanationGrid:
    """A labelled grid of pictures: one row per image, one column per picture of it.

    Attributes:
        columns: column headers (e.g. "image", then one per model).
        cells: rows × columns float [H, W, 3] pictures in [0, 1], all of one size.
        row_labels: one header per row; lines separated by newlines.
        captions: rows × columns texts under the pictures ("" for none), e.g. each model's top-1.
        wrong: rows × columns flags: the cell's caption is a wrong prediction (red, framed, ✗).
        row_wrong: per row: the row's image is misclassified (header in red).
        colour_key: label of a GradCAM colour bar (`GRADCAM_COLORMAP`, 0 to 1); None: no bar.
    """

    columns: list[str]
    cells: list[list[np.ndarray]]
    row_labels: list[str]
    captions: list[list[str]] | None = None
    wrong: list[list[bool]] | None = None
    row_wrong: list[bool] | None = None
    colour_key: str | None = None

    def __post_init__(self) -> None:
        rows, cols = len(self.cells), len(self.columns)
        if not rows or any(len(r) != cols for r in self.cells):
            raise ValueError(f"the grid needs at least one row of {cols} pictures (one per column)")
        if len(self.row_labels) != rows:
            raise ValueError(f"{len(self.row_labels)} row labels for {rows} rows")
        for name in ("captions", "wrong"):
            value = getattr(self, name)
            if value is not None and (len(value) != rows or any(len(r) != cols for r in value)):
                raise ValueError(f"{name} must be {rows} rows × {cols} columns")
        if self.row_wrong is not None and len(self.row_wrong) != rows:
            raise ValueError(f"row_wrong has {len(self.row_wrong)} entries for {rows} rows")


def grid_figure(grid: ExplanationGrid, cell_inches: float = 1.7):
    """The grid as a matplotlib Figure (object API): column titles, row headers, captions, colour key."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows, cols = len(grid.cells), len(grid.columns)
    label_lines = max(label.count("\n") + 1 for label in grid.row_labels)
    label_width = 0.6 + 0.06 * max(len(line) for label in grid.row_labels for line in label.split("\n"))
    width = label_width + cols * cell_inches + (0.9 if grid.colour_key else 0.0)
    height = 0.5 + rows * (cell_inches + (0.3 if grid.captions else 0.05)) + 0.02 * label_lines
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(np.clip(grid.cells[r][c], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = bool(grid.wrong and grid.wrong[r][c])
            for spine in ax.spines.values():
                spine.set_visible(wrong)
                spine.set_color(WRONG_COLOUR)
                spine.set_linewidth(3)
            if r == 0:
                ax.set_title(grid.columns[c], fontsize=9)
            if grid.captions and grid.captions[r][c]:
                text = grid.captions[r][c] + (" ✗" if wrong else "")
                ax.set_xlabel(text, fontsize=8, color=WRONG_COLOUR if wrong else "black")
        row_wrong = bool(grid.row_wrong and grid.row_wrong[r])
        axes[r, 0].set_ylabel(
            grid.row_labels[r],
            rotation=0,
            ha="right",
            va="center",
            fontsize=8,
            color=WRONG_COLOUR if row_wrong else "black",
        )
    if grid.colour_key:
        key = ScalarMappable(Normalize(0, 1), colormaps[GRADCAM_COLORMAP])
        fig.colorbar(key, ax=axes, fraction=0.04, shrink=min(1.0, 2.5 / rows + 0.3), label=grid.colour_key)
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # no label cut off
    return buffer.getvalue()


def grid_png(grid: ExplanationGrid) -> bytes:
    """PNG of `grid_figure`."""
    return figure_png(grid_figure(grid))


def colour_key_png(label: str = GRADCAM_KEY) -> bytes:
    """A horizontal colour bar of `GRADCAM_COLORMAP` from 0 to 1 (the key of GradCAM overlays)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 0.75), layout="constrained")
    ax = fig.add_subplot()
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[GRADCAM_COLORMAP]), cax=ax, orientation="horizontal")
    ax.set_xlabel(label, fontsize=8)
    ax.tick_params(labelsize=7)
    return figure_png(fig)


EXPLAIN_ROWS_PER_GRID = 16  # `e2kd-fast explain`: more inputs are spread over several grid files


ExplainRow = tuple[str, np.ndarray, np.ndarray, Tensor, int]
"""One input of `e2kd-fast explain`: (file name, image [H, W, 3], explanation picture [H, W, 3], class
probabilities [C], explained class)."""


def explain_grid(
    rows: Sequence[ExplainRow], class_names: Sequence[str] | None = None, gradcam: bool = False
) -> ExplanationGrid:
    """The labelled grid of `e2kd-fast explain`: per input its image and explanation, the predicted class
    (with its probability) and the explained one, named by ``class_names`` (None: "class k"); GradCAM
    overlays (``gradcam``) get their colour bar."""
    num_classes = len(rows[0][3]) if rows else 0
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given (--class-names) for a model of {num_classes} classes")

    def name(k: int) -> str:
        return f"{class_names[k]} ({k})" if class_names is not None else f"class {k}"

    predicted = [int(row[3].argmax()) for row in rows]
    return ExplanationGrid(
        columns=["image", "explanation"],
        cells=[[row[1], row[2]] for row in rows],
        row_labels=[row[0] for row in rows],
        captions=[
            [f"predicted: {name(p)}, {float(row[3][p]):.0%}", f"explained: {name(row[4])}"]
            for p, row in zip(predicted, rows, strict=True)
        ],
        colour_key=GRADCAM_KEY if gradcam else None,
    )


def explain_grids(
    rows: Sequence[ExplainRow], out: Path, class_names: Sequence[str] | None = None, gradcam: bool = False
) -> list[Path]:
    """Writes `explain_grid` pictures into ``out``: ``explanations.png``, or ``explanations_1.png``,
    ``_2``, ... for more than `EXPLAIN_ROWS_PER_GRID` inputs; returns their paths."""
    pages = [rows[i : i + EXPLAIN_ROWS_PER_GRID] for i in range(0, len(rows), EXPLAIN_ROWS_PER_GRID)]
    written = []
    for number, page in enumerate(pages, start=1):
        path = out / ("explanations.png" if len(pages) == 1 else f"explanations_{number}.png")
        path.write_bytes(grid_png(explain_grid(page, class_names, gradcam)))
        written.append(path)
    return written


# Curves worth plotting, in this order: (record kind, key, title, runs). ``runs``: "distilled" (runs
# with a teacher), "supervised" (distill.method none: their loss is the label loss, BCE for B-cos,
# on another scale than a distillation objective, so it gets its own panel) or "all".
CURVES = (
    ("train", "loss", "train loss (distillation objective)", "distilled"),
    ("train", "loss", "train loss (supervised: label loss)", "supervised"),
    ("train", "kd", "train KD term", "distilled"),
    ("train", "exp", "train explanation term", "distilled"),
    ("train", "agreement", "train agreement", "distilled"),
    ("train", "epoch_top1", "train top-1 (per epoch)", "all"),
    ("train", "lr", "learning rate", "all"),
    ("eval", "top1", "val top-1", "all"),
    ("eval", "loss", "val loss (distillation objective)", "distilled"),
    ("eval", "loss", "val loss (supervised: label loss)", "supervised"),
    ("eval", "map", "val mAP", "all"),
    ("eval", "agreement", "val agreement", "all"),
    ("eval", "explanation_cosine", "val explanation similarity", "all"),
    ("eval", "worst_group_acc", "val worst-group accuracy", "all"),
)

# Terms a method does not have: KD logs its explanation term as a constant 0, which is not a curve.
ABSENT_TERMS = {"kd": frozenset({"exp"}), "none": frozenset({"kd", "exp", "agreement"})}


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        if r.get("kind") != kind:
            continue
        try:
            value = float(r.get(key))  # NaN was written as the string "nan"
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            steps.append(int(r["step"]))
            values.append(value)
    return steps, values


def _drawn(method: str | None, key: str, runs: str) -> bool:
    """Whether a run of ``method`` (None: unknown, taken as distilled) belongs in a panel of ``key`` for ``runs``."""
    if key in ABSENT_TERMS.get(method or "", ()):
        return False
    supervised = method == "none"
    return runs == "all" or (runs == "supervised") == supervised


def curves_figure(curves: dict[str, list[dict]], methods: dict[str, str] | None = None):
    """Training curves of every run, one panel per (metric, group of runs) that has data; None if none has.

    Args:
        curves: run name → its metrics.jsonl records.
        methods: run name → ``distill.method``: supervised runs (``none``) get their own loss panels, and
            terms a method does not have (KD's explanation term) are not drawn. Without it every run
            counts as distilled.
    """
    methods = methods or {}

    def series(name: str, kind: str, key: str, runs: str) -> tuple[list[int], list[float]]:
        if not _drawn(methods.get(name), key, runs):
            return [], []
        return _series(curves[name], kind, key)

    panels = [p for p in CURVES if any(series(name, *p[:2], p[3])[0] for name in curves)]
    if not panels:
        return None
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no window

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (kind, key, title, runs) in zip(axes.flat, panels, strict=False):
        # One colour per run in every panel (a run without this metric must not shift the others').
        for index, name in enumerate(curves):
            steps, values = series(name, kind, key, runs)
            if steps:
                marker = "o" if len(steps) < 20 else None
                ax.plot(steps, values, color=f"C{index % 10}", marker=marker, markersize=3, label=name)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def curves_png(curves: dict[str, list[dict]], methods: dict[str, str] | None = None) -> bytes | None:
    """PNG of `curves_figure`, or None if no run has a curve."""
    fig = curves_figure(curves, methods)
    return None if fig is None else figure_png(fig, dpi=90)


__all__ = [
    "ABSENT_TERMS",
    "EXPLAIN_ROWS_PER_GRID",
    "ExplainRow",
    "CURVES",
    "GRADCAM_KEY",
    "ExplanationGrid",
    "colour_key_png",
    "curves_figure",
    "curves_png",
    "explain_grid",
    "explain_grids",
    "explanation_picture",
    "figure_png",
    "grid_figure",
    "grid_png",
    "input_picture",
    "png_bytes",
]
