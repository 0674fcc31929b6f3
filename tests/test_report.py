"""`e2kd-fast report`: two tiny runs (one step each) rendered into a self-contained HTML page and markdown."""

from __future__ import annotations

import json
import re

import pytest
import torch

from e2kd_fast.cli import main
from e2kd_fast.config import config_from_dict
from e2kd_fast.data import generate_waterbirds_like
from e2kd_fast.data.build import build_datasets
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.models import create_model, save_checkpoint
from e2kd_fast.report import make_report
from e2kd_fast.report.build import load_run, unicam_scores
from e2kd_fast.report.render import table_columns

MODEL = "bcos_resnet20_cifar"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A KD and an e²KD run (one optimiser step each) from the same saved teacher, on masked data."""
    base = tmp_path_factory.mktemp("report")
    root = base / "data"
    counts = {"train_biased": 16, "train_unbiased": 2, "val": 6, "test_id": 2, "test_ood": 4}
    generate_waterbirds_like(root, num_classes=2, image_size=16, per_split=counts, seed=0)
    torch.manual_seed(0)
    teacher = base / "teacher.pt"
    save_checkpoint(create_model(MODEL, num_classes=2), teacher)
    runs = []
    for method, lam in (("kd", 0.0), ("e2kd", 1.0)):
        cfg = config_from_dict(
            {
                "student": {"name": MODEL, "num_classes": 2},
                "teacher": {"name": MODEL, "num_classes": 2, "checkpoint": str(teacher)},
                "distill": {"method": method, "lam": lam},
                "optim": {"warmup_epochs": 0},
                "data": {
                    "root": str(root),
                    "train_split": "train_biased",
                    "val_split": "val",
                    "image_size": 16,
                    "eval_resize": 16,
                    "batch_size": 16,
                    "num_workers": 0,
                },
                "train": {"epochs": 1, "out_dir": str(base / method), "device": "cpu", "compile": False},
            }
        )
        data = build_datasets(cfg)
        Trainer(cfg, data.train, data.val, show_progress=False).fit()
        runs.append(base / method)
    (base / "e2kd" / "unicam.json").write_text(json.dumps({"fss": [0.25, 0.75], "rs": 0.4}))
    return base, runs


def test_report_renders_a_self_contained_page(two_runs):
    base, runs = two_runs
    out = base / "out"
    result = make_report(runs, out, images=2, device="cpu")
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher (bcos_resnet20_cifar)", "kd", "e2kd"]
    assert rows["teacher (bcos_resnet20_cifar)"]["agreement"] == 1.0
    for name in ("kd", "e2kd"):
        assert 0 <= rows[name]["top1"] <= 1 and 0 <= rows[name]["agreement"] <= 1
        assert -1 <= rows[name]["explanation_cosine"] <= 1 and rows[name]["images"] == 6
    assert rows["e2kd"]["fss"] == 0.5 and rows["e2kd"]["rs"] == 0.4 and "fss" not in rows["kd"]
    # The run's last checkpoint is the model its only evaluation saw: the same validation loss; the
    # train top-1 is the last epoch's from metrics.jsonl. Teacher rows have neither.
    for name, run in zip(("kd", "e2kd"), runs, strict=True):
        (evaluation,) = read_metrics(run, "eval")
        assert rows[name]["loss"] == pytest.approx(evaluation["loss"], rel=1e-5)
        assert rows[name]["train_top1"] == read_metrics(run, "train")[-1]["epoch_top1"]
    assert "loss" not in rows["teacher (bcos_resnet20_cifar)"]

    page = (out / "report.html").read_text()
    # Self-contained: every image is an inlined PNG; no scripts, stylesheets or remote addresses.
    sources = re.findall(r"src='([^']*)'", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == 1 + 2 * 4  # the curves, then 2 images × (image, teacher, kd, e2kd)
    assert not re.search(r"<script|<link|https?://|url\(", page)
    headers = ("top-1", "val loss", "train top-1", "agreement", "expl. sim.", "FSS")
    for text in (*(f"<th>{h}</th>" for h in headers), ">e2kd<"):
        assert text in page

    markdown = (out / "report.md").read_text()
    assert "| e2kd |" in markdown and "| kd |" in markdown
    assert (out / "report_files" / "curves.png").is_file() and (out / "report_files" / "explanations.png").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in saved["rows"]] == list(rows)


def test_report_fills_localisation_when_the_metrics_exist(two_runs):
    """EPG / IoU come from e2kd_fast.metrics.localisation (another module); with it, the masks give them."""
    pytest.importorskip("e2kd_fast.metrics.localisation")
    pytest.importorskip("e2kd_fast.metrics.unicam")
    base, runs = two_runs
    result = make_report(runs[:1], base / "out_loc", images=0, device="cpu", markdown_name=None, unicam=True)
    rows = {r["model"]: r for r in result["rows"]}
    assert all(0 <= r["epg"] <= 1 and 0 <= r["iou"] <= 1 for r in rows.values())
    assert set(rows) == {"teacher (bcos_resnet20_cifar)", "kd"} and result["markdown"] is None
    assert -1 <= rows["kd"]["fss"] <= 1 and -1 <= rows["kd"]["rs"] <= 1


def test_report_command_line_and_errors(two_runs, tmp_path, capsys):
    base, runs = two_runs
    assert main(["report", str(runs[1]), "--out", str(tmp_path / "cli"), "--images", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "cli" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="checkpoint of run .* not found"):
        load_run(runs[0], checkpoint=str(tmp_path / "missing.pt"))
    (tmp_path / "unicam.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"unicam\.json: invalid JSON at line 1"):
        unicam_scores(tmp_path)


def test_columns_appear_only_when_some_row_has_them():
    rows = [{"model": "a", "top1": 0.5, "group2_acc": 0.1}, {"model": "b", "map": 0.3, "epg": None}]
    keys = [k for k, _ in table_columns(rows)]
    assert keys == ["top1", "map", "group2_acc"]
