"""The report's and demo's pictures: labelled explanation grids, GradCAM colour key, training-curve panels.

Structure is checked through matplotlib's objects (titles, labels, colour bars, lines) and the written
HTML / markdown; no model is trained.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from e2kd_fast.demo import explanation_grid
from e2kd_fast.explain import GRADCAM_COLORMAP, gradcam_heat, gradcam_overlay
from e2kd_fast.models import create_model
from e2kd_fast.report.plots import (
    EXPLAIN_ROWS_PER_GRID,
    GRADCAM_KEY,
    ExplanationGrid,
    curves_figure,
    explain_grid,
    explain_grids,
    explanation_picture,
    grid_figure,
)
from e2kd_fast.report.render import labelled_grid, write_html, write_markdown


def _records(method: str, steps: int = 6) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        record = {"kind": "train", "step": step, "lr": 1e-3 * step / steps, "loss": math.exp(-step)}
        if method != "none":
            record.update(kd=0.5 * math.exp(-step), exp=0.0 if method == "kd" else 0.1 / step, agreement=0.9)
        out.append(record)
    out.append({"kind": "eval", "step": steps, "top1": 0.5, "loss": 0.3})
    return out


def _lines(fig) -> dict[str, list[str]]:
    """Panel title → the labels of its lines."""
    return {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_title()}


def test_curves_keep_the_supervised_loss_apart_omit_absent_terms_and_plot_the_learning_rate():
    curves = {"teacher": _records("none"), "kd": _records("kd"), "e2kd": _records("e2kd")}
    fig = curves_figure(curves, {"teacher": "none", "kd": "kd", "e2kd": "e2kd"})
    panels = _lines(fig)
    assert panels["train loss (distillation objective)"] == ["kd", "e2kd"]
    assert panels["train loss (supervised: label loss)"] == ["teacher"]
    assert panels["val loss (distillation objective)"] == ["kd", "e2kd"]
    assert panels["val loss (supervised: label loss)"] == ["teacher"]
    assert panels["train explanation term"] == ["e2kd"]  # KD's constant 0 is no curve
    assert panels["train KD term"] == ["kd", "e2kd"]
    assert panels["learning rate"] == ["teacher", "kd", "e2kd"]
    assert len([ax for ax in fig.axes if ax.get_title()]) == len(panels) == 9
    # Without the methods every run counts as distilled (one loss panel), as before.
    assert "train loss (supervised: label loss)" not in _lines(curves_figure(curves))


def test_gradcam_overlay_uses_the_colormap_and_the_grid_shows_its_key():
    image = np.full((4, 4, 3), 0.5)
    cam = torch.zeros(1, 4, 4)
    cam[0, 1, 2] = 2.0
    cam[0, 0, 0] = -1.0  # negatives are clamped: the same colour as 0
    heat = gradcam_heat(cam)
    assert heat.max() == 1.0 and heat[0, 0] == 0.0
    overlay = gradcam_overlay(image, cam)
    np.testing.assert_allclose(overlay[1, 2], 0.25 + 0.5 * np.asarray(colormaps[GRADCAM_COLORMAP](1.0)[:3]))
    np.testing.assert_allclose(overlay[0, 0], 0.25 + 0.5 * np.asarray(colormaps[GRADCAM_COLORMAP](0.0)[:3]))
    with pytest.raises(ValueError, match="colormap"):
        gradcam_overlay(image, cam, colormap="no-such-map")
    x = torch.rand(3, 4, 4)
    assert explanation_picture(x, cam).shape == (4, 4, 3)

    cells = [[np.zeros((4, 4, 3)), overlay]]
    fig = grid_figure(ExplanationGrid(["image", "resnet"], cells, ["#0\ntrue: cat"], colour_key=GRADCAM_KEY))
    bars = [ax for ax in fig.axes if ax.get_ylabel() == GRADCAM_KEY]
    assert len(fig.axes) == 3 and len(bars) == 1  # two pictures and the colour bar
    fig = grid_figure(ExplanationGrid(["image", "resnet"], cells, ["#0"]))
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="row labels"):
        ExplanationGrid(["image", "resnet"], cells, [])


def _report_grid(gradcam: bool = False) -> dict:
    picture = np.full((8, 8, 3), 0.5)
    return {
        "columns": ["image", "teacher", "kd"],
        "cells": [[picture] * 3, [picture] * 3],
        "indices": [3, 7],
        "labels": ["cat", "dog"],
        "classes": ["rocket", "dog"],
        "explained_correct": [False, True],
        "predictions": [["rocket", "cat"], ["dog", "rocket"]],
        "correct": [[False, True], [True, False]],
        "gradcam": gradcam,
    }


def test_report_grid_rows_name_the_label_and_the_explained_class_and_mark_mistakes(tmp_path):
    grid = _report_grid()
    fig = grid_figure(labelled_grid(grid))
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["image", "teacher", "kd"]
    first, second = axes[0].get_ylabel(), axes[3].get_ylabel()
    assert first == "#3\ntrue: cat\nexplained: rocket\n✗ misclassified" and "misclassified" not in second
    assert [ax.get_xlabel() for ax in axes] == [
        "",
        "top-1: rocket ✗",
        "top-1: cat",
        "",
        "top-1: dog",
        "top-1: rocket ✗",
    ]
    assert axes[1].spines["top"].get_visible() and not axes[2].spines["top"].get_visible()

    rows = [{"model": "kd", "method": "kd", "top1": 0.5}]
    page = write_html(tmp_path / "r.html", "t", rows, {}, grid, []).read_text()
    headers = re.findall(r"<tr(?: class='(\w+)')?><th class='row'>(.*?)</th>", page)
    assert headers[0] == (
        "misclassified",
        "#3<br>true: cat<br>explained: rocket<br><span class='wrong'>✗ misclassified</span>",
    )
    assert headers[1] == ("", "#7<br>true: dog<br>explained: dog")
    assert (
        page.count("<div class='pred wrong'>top-1: rocket</div>") == 2 and "<div class='pred'>top-1: cat</div>" in page
    )
    assert page.count("class='cell wrong'") == 2 and "alt='colour key" not in page
    assert "alt='colour key" in write_html(tmp_path / "g.html", "t", rows, {}, _report_grid(True), []).read_text()

    markdown = write_markdown(tmp_path / "r.md", "t", rows, {}, grid, []).read_text()
    assert "#3 (cat, explained as rocket, misclassified), #7 (dog, explained as dog)" in markdown
    assert (tmp_path / "r_files" / "explanations.png").read_bytes().startswith(b"\x89PNG")


def test_demo_grid_labels_rows_and_columns():
    torch.manual_seed(0)
    models = {name: create_model("bcos_resnet20_cifar", num_classes=2).eval() for name in ("teacher", "kd", "e2kd")}
    x = torch.rand(3, 3, 16, 16)
    ood = {"image": torch.cat([x, 1 - x], 1), "target": torch.tensor([1, 0, 1])}
    grid = explanation_grid(models, ood, ["landbird", "waterbird"], 2)
    fig = grid_figure(grid)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "teacher", "KD", "e²KD"]
    labels = [fig.axes[4 * r].get_ylabel() for r in range(2)]
    assert labels[0].startswith("true: landbird\nexplained: ") and labels[1].startswith("true: waterbird\n")
    captions = [ax.get_xlabel() for ax in fig.axes]
    assert all(c.startswith("top-1: ") for i, c in enumerate(captions) if i % 4) and captions[0] == ""
    with torch.no_grad():
        teacher_top1 = models["teacher"](ood["image"][[1, 0]]).argmax(1).tolist()
    assert grid.row_wrong == [t != c for t, c in zip(teacher_top1, [0, 1], strict=True)]


def test_explain_grid_names_the_predicted_and_explained_classes_and_pages_many_inputs(tmp_path):
    picture = np.zeros((4, 4, 3))
    rows = [
        (f"img{i}.png", picture, picture, torch.tensor([0.1, 0.7, 0.2]), 2) for i in range(EXPLAIN_ROWS_PER_GRID + 1)
    ]
    fig = grid_figure(explain_grid(rows[:2], ["cat", "dog", "bird"]))
    assert [ax.get_title() for ax in fig.axes[:2]] == ["image", "explanation"]
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["img0.png", "img1.png"]
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["predicted: dog (1), 70%", "explained: bird (2)"]
    assert len(grid_figure(explain_grid(rows[:1], gradcam=True)).axes) == 3  # with the GradCAM colour bar
    assert explain_grid(rows[:1]).captions == [["predicted: class 1, 70%", "explained: class 2"]]
    with pytest.raises(ValueError, match="2 class names given .* of 3 classes"):
        explain_grid(rows, ["cat", "dog"])
    written = explain_grids(rows, tmp_path)
    assert [p.name for p in written] == ["explanations_1.png", "explanations_2.png"]
    assert [p.name for p in explain_grids(rows[:3], tmp_path / ".")] == ["explanations.png"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Runs after the page has loaded: how many pictures it holds, how many failed to decode, and whether the
# page is wider than its window; written into the title, which --dump-dom prints.
_PAGE_PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.title = JSON.stringify({
    images: images.length,
    broken: images.filter((img) => !img.complete || img.naturalWidth === 0).map((img) => img.alt),
    too_wide: document.documentElement.scrollWidth > window.innerWidth,
  });
});
</script>"""


def test_the_html_report_renders_in_a_headless_browser(tmp_path):
    """Every picture of the page decodes in Chromium and the page fits a 1400 px window."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    rows = [
        {"model": "kd", "method": "kd", "top1": 0.5, "agreement": 0.75},
        {"model": "e2kd", "method": "e2kd", "top1": 0.625, "agreement": 1.0},
    ]
    curves = {"kd": _records("kd"), "e2kd": _records("e2kd")}
    page = write_html(tmp_path / "report.html", "t", rows, curves, _report_grid(gradcam=True), ["a note"])
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", _PAGE_PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    flags += ["--window-size=1400,1000", "--virtual-time-budget=5000"]
    done = subprocess.run([browser, *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", done.stdout, re.S)
    assert title is not None, done.stderr[-2000:]
    found = json.loads(html.unescape(title.group(1)))
    # The curves, the grid's six cells and the GradCAM colour key.
    assert found["images"] >= 8 and found["broken"] == [] and not found["too_wide"], found
