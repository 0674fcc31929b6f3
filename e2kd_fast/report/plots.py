"""Pictures of the report: explanation cells, the explanation grid and the training curves (PNG bytes)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from torch import Tensor

from e2kd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2kd_fast.explain import explanation_to_rgba

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
    """[H, W, 3] in [0, 1]: the B-cos colour picture on black (6-channel W) or a GradCAM heat overlay ([1, H, W])."""
    if explanation.shape[0] == 6:
        rgba = explanation_to_rgba(x.detach().cpu(), explanation.detach().cpu())
        return rgba[..., :3] * rgba[..., 3:]
    heat = explanation[0].detach().float().cpu()
    heat = (heat / heat.max().clamp_min(1e-12)).numpy()
    return 0.5 * input_picture(x) + 0.5 * np.stack([heat, np.zeros_like(heat), 1 - heat], -1)


def png_bytes(picture: np.ndarray, min_side: int = _MIN_SIDE) -> bytes:
    """PNG of a float [H, W, 3] picture in [0, 1], enlarged by an integer factor to at least ``min_side``."""
    image = Image.fromarray((np.clip(picture, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, math.ceil(min_side / min(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(cells: list[list[np.ndarray]], gap: int = 2) -> bytes:
    """One PNG of a grid of equally sized pictures (rows × columns), separated by white gaps."""
    h, w = cells[0][0].shape[:2]
    rows, cols = len(cells), len(cells[0])
    canvas = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3))
    for r, row in enumerate(cells):
        for c, picture in enumerate(row):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = picture
    return png_bytes(canvas, min_side=rows * _MIN_SIDE)


# Curves worth plotting, in this order: (record kind, key, title).
CURVES = (
    ("train", "loss", "train loss"),
    ("train", "kd", "train KD term"),
    ("train", "exp", "train explanation term"),
    ("train", "agreement", "train agreement"),
    ("train", "epoch_top1", "train top-1 (per epoch)"),
    ("eval", "top1", "val top-1"),
    ("eval", "loss", "val loss"),
    ("eval", "map", "val mAP"),
    ("eval", "agreement", "val agreement"),
    ("eval", "explanation_cosine", "val explanation similarity"),
    ("eval", "worst_group_acc", "val worst-group accuracy"),
)


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


def curves_png(curves: dict[str, list[dict]]) -> bytes | None:
    """Training curves of every run (one panel per metric that any run logged), or None if there are none."""
    panels = [(k, key, t) for k, key, t in CURVES if any(_series(rec, k, key)[0] for rec in curves.values())]
    if not panels:
        return None
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no window

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (kind, key, title) in zip(axes.flat, panels, strict=False):
        # One colour per run in every panel (a run without this metric must not shift the others').
        for index, (name, records) in enumerate(curves.items()):
            steps, values = _series(records, kind, key)
            if steps:
                marker = "o" if len(steps) < 20 else None
                ax.plot(steps, values, color=f"C{index % 10}", marker=marker, markersize=3, label=name)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


__all__ = ["CURVES", "curves_png", "explanation_picture", "grid_png", "input_picture", "png_bytes"]
