"""PASCAL VOC and Waterbirds readers, the multi-label KD loss, mAP / group accuracy, and their configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd_fast.config import load_config
from e2kd_fast.data import collate_skipping
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.voc import VOC_CLASSES, VOCDataset, box_masks, parse_voc_annotation, read_image_set
from e2kd_fast.data.waterbirds import WaterbirdsDataset, read_waterbirds_metadata
from e2kd_fast.distill import e2kd_objective
from e2kd_fast.distill.multilabel import multilabel_bce, multilabel_kd
from e2kd_fast.engine import Trainer, evaluate
from e2kd_fast.metrics.scores import EvalExtras, average_precision, group_accuracy, mean_average_precision
from e2kd_fast.reference.losses import uniform_off_label_bce
from tests.helpers import pixel_format_cases

CONFIGS = Path(__file__).parents[1] / "configs"

# ----------------------------------------------------------------------------------------------------------------------
# Writers of tiny data sets in the two layouts
# ----------------------------------------------------------------------------------------------------------------------


def _jpeg(path: Path, size=(16, 16), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _voc_xml(width: int, height: int, objects: list[tuple]) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1), difficult in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{body}</annotation>"
    )


def write_voc(root: Path, n_train: int = 8, n_test: int = 4, size: int = 16) -> Path:
    """A VOC2007 year folder: image i has a dog on its left half, and on even i a difficult-only cat."""
    root = Path(root)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [f"{i:06d}" for i in range(n_train)], "test": [f"{i:06d}" for i in range(100, 100 + n_test)]}
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for k, image_id in enumerate(names):
            _jpeg(root / "JPEGImages" / f"{image_id}.jpg", (size, size), seed=k)
            objects = [("dog", (1, 1, size // 2, size), False), ("person", (3, 3, size, size // 2), k % 3 == 0)]
            if k % 2 == 0:
                objects.append(("cat", (size // 2, 1, size, size), True))
            (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(size, size, objects))
    return root


def write_waterbirds(root: Path, per_split: int = 8, size: int = 16) -> Path:
    """metadata.csv and images: every (y, place) group in every split, folders named like CUB's."""
    root = Path(root)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    k = 0
    for split in (0, 1, 2):
        for i in range(per_split):
            y, place = i % 2, (i // 2) % 2
            name = f"{'001.Albatross' if y else '002.Sparrow'}/img_{k:04d}.jpg"
            _jpeg(root / name, (size, size), seed=k)
            lines.append(f"{k + 1},{name},{y},{split},{place},/b/bamboo_forest/{k:08d}.jpg")
            k += 1
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------------------------
# VOC reader
# ----------------------------------------------------------------------------------------------------------------------


def test_voc_reader_targets_ignore_and_boxes(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    ds = VOCDataset(root, "trainval")
    assert len(ds) == 8 and ds.ids[0] == "000000" and ds.classes == list(VOC_CLASSES)
    dog, cat, person = (VOC_CLASSES.index(c) for c in ("dog", "cat", "person"))
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["target"].shape == (20,)
    assert item["target"].nonzero().flatten().tolist() == sorted([dog, cat, person])
    # Image 0: the cat and the person are difficult only (ignored by mAP); the dog is not.
    assert item["ignore"].nonzero().flatten().tolist() == sorted([cat, person])
    assert ds[1]["ignore"].sum() == 0 and ds[1]["target"][cat] == 0
    assert ds.annotations[0].objects[0].box == (1, 1, 8, 16)

    with_boxes = VOCDataset(root, "test", box_size=32, encoding="bcos")
    item = with_boxes[0]
    assert item["image"].shape == (6, 32, 32) and item["box_masks"].shape == (20, 32, 32)
    # The dog box covers 1-based columns 1..8 of 16, i.e. the left half: 16 of 32 output columns.
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[:, :16] = True
    assert torch.equal(item["box_masks"][dog], expected)
    assert item["box_masks"][VOC_CLASSES.index("bus")].sum() == 0
    batch = collate_skipping([with_boxes[i] for i in range(len(with_boxes))])
    assert batch["target"].shape == (4, 20) and batch["box_masks"].shape == (4, 20, 32, 32)


def test_box_masks_at_the_original_size_are_the_inclusive_pixel_ranges(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_voc_xml(10, 6, [("car", (2, 3, 4, 5), False)]))
    masks = box_masks(parse_voc_annotation(path), (6, 10))
    rows, cols = masks[VOC_CLASSES.index("car")].nonzero(as_tuple=True)
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {1, 2, 3}


@pytest.mark.parametrize(
    "xml, message",
    [
        ("<annotation><size><width>16</width>", r"malformed XML at line 1, column"),
        (_voc_xml(16, 16, [("unicorn", (1, 1, 4, 4), False)]), r"<object> #1 \('unicorn'\): unknown class"),
        (_voc_xml(16, 16, [("dog", (1, 1, 4, 4), False), ("cat", (3, 1, 20, 4), False)]), r"#2 \('cat'\): box"),
        (_voc_xml(16, 16, []), "no <object>"),
        (_voc_xml(16, 16, [("dog", (1, 1, 4, 4), False)]).replace("<xmax>4</xmax>", ""), r"missing or empty <xmax>"),
        (_voc_xml(16, 16, [("dog", (1, 1, 4, 4), False)]).replace("<ymin>1</ymin>", "<ymin>a</ymin>"), "number"),
    ],
)
def test_malformed_voc_annotations_are_clear_errors(tmp_path, xml, message):
    path = tmp_path / "000001.xml"
    path.write_text(xml)
    with pytest.raises(ValueError, match=message) as info:
        parse_voc_annotation(path)
    assert str(path) in str(info.value)


def test_voc_layout_errors_name_the_file_and_line(tmp_path):
    root = write_voc(tmp_path / "VOCdevkit" / "VOC2007", n_train=2, n_test=1)
    with pytest.raises(FileNotFoundError, match=r"year folder, e\.g\. .*VOC2007"):
        VOCDataset(tmp_path / "VOCdevkit", "trainval")
    with pytest.raises(FileNotFoundError, match=r"val\.txt \(splits found: test, trainval\)"):
        read_image_set(root, "val")
    (root / "ImageSets" / "Main" / "train.txt").write_text("000000\n000001  1\n")
    with pytest.raises(ValueError, match=r"train\.txt, line 2: expected one image id"):
        read_image_set(root, "train")
    (root / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images of split 'trainval' are missing.*000001\.jpg"):
        VOCDataset(root, "trainval")


# ----------------------------------------------------------------------------------------------------------------------
# Waterbirds reader
# ----------------------------------------------------------------------------------------------------------------------


def test_waterbirds_reader_labels_places_groups(tmp_path):
    root = write_waterbirds(tmp_path / "wb")
    train, test = WaterbirdsDataset(root, "train"), WaterbirdsDataset(root, 2)
    assert len(train) == len(test) == 8
    assert train.targets.tolist() == [0, 1, 0, 1, 0, 1, 0, 1] and train.places.tolist() == [0, 0, 1, 1] * 2
    assert train.groups.tolist() == [0, 2, 1, 3] * 2  # 2·y + place
    item = test[3]
    assert item["image"].shape == (3, 16, 16)
    assert (item["target"], item["place"], item["group"]) == (1, 1, 3)
    assert test.records[0].filename.startswith("002.Sparrow/") and test.records[0].line == 18


def test_voc_and_waterbirds_read_16_bit_gray_palette_and_alpha_by_hand(tmp_path):
    cases = pixel_format_cases(size=(16, 16))
    voc = write_voc(tmp_path / "VOC2007", n_train=len(cases), n_test=1)
    birds = write_waterbirds(tmp_path / "wb", per_split=len(cases))
    voc_ds, birds_ds = VOCDataset(voc, "trainval"), WaterbirdsDataset(birds, "train")
    for i, (data, _) in enumerate(cases.values()):  # PNG content under the layouts' .jpg names
        voc_ds.image_path(i).write_bytes(data)
        (birds / birds_ds.records[i].filename).write_bytes(data)
    for i, (name, (_, expected)) in enumerate(cases.items()):
        pixels = torch.from_numpy(expected).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(voc_ds[i]["image"], pixels, rtol=0, atol=0, msg=f"VOC {name}")
        torch.testing.assert_close(birds_ds[i]["image"], pixels, rtol=0, atol=0, msg=f"Waterbirds {name}")


def _set_field(lines: list[str], line: int, column: int, value: str) -> list[str]:
    fields = lines[line - 1].split(",")
    fields[column] = value
    return lines[: line - 1] + [",".join(fields)] + lines[line:]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: [lines[0].replace(",place,", ",background,")] + lines[1:], r"line 1: missing column\(s\) place"),
        (lambda lines: _set_field(lines, 4, 2, "2"), r"line 4, column 'y': expected one of 0, 1, got '2'"),
        (lambda lines: _set_field(lines, 3, 3, "7"), r"line 3, column 'split'"),
        (lambda lines: _set_field(lines, 5, 4, "0.5"), r"line 5, column 'place'"),
        (lambda lines: _set_field(lines, 2, 1, " "), r"line 2, column 'img_filename': empty file name"),
        (lambda lines: lines[:5] + [lines[5].rsplit(",", 1)[0]] + lines[6:], r"line 6: expected 6 fields, got 5"),
        (lambda lines: lines[:1], "no rows after the header"),
    ],
)
def test_malformed_waterbirds_metadata_is_a_clear_error(tmp_path, edit, message):
    root = write_waterbirds(tmp_path / "wb", per_split=4)
    path = root / "metadata.csv"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_waterbirds_metadata(path)
    assert str(path) in str(info.value)


def test_waterbirds_missing_image_and_unknown_split(tmp_path):
    root = write_waterbirds(tmp_path / "wb", per_split=4)
    with pytest.raises(ValueError, match="unknown Waterbirds split 'dev'"):
        WaterbirdsDataset(root, "dev")
    first = read_waterbirds_metadata(root / "metadata.csv")[0]
    (root / first.filename).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images listed in .*metadata\.csv are missing.*\(line 2\)"):
        WaterbirdsDataset(root, "train")


# ----------------------------------------------------------------------------------------------------------------------
# Multi-label KD, mAP, group accuracy
# ----------------------------------------------------------------------------------------------------------------------


def _mld_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float, eps: float = 1e-6) -> float:
    """Σ over classes of Bernoulli KL(teacher ‖ student) at temperature τ, batch mean, × τ², element by element."""
    total = 0.0
    for n in range(s.shape[0]):
        for c in range(s.shape[1]):
            q = min(max(1 / (1 + math.exp(-float(s[n, c]) / tau)), eps), 1 - eps)
            p = min(max(1 / (1 + math.exp(-float(t[n, c]) / tau)), eps), 1 - eps)
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return total / s.shape[0] * tau**2


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_multilabel_kd_matches_the_bernoulli_kl_formula(tau):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 20, generator=gen, dtype=torch.float64) * 3, torch.randn(5, 20, generator=gen) * 3
    t[0, 0] = 40.0  # saturates: the clamp at 1 − 1e-6 keeps the loss finite
    loss = multilabel_kd(s, t.double(), tau)
    assert loss.item() == pytest.approx(_mld_by_hand(s, t, tau), rel=1e-10)
    assert multilabel_kd(t.double(), t.double(), tau).abs().item() < 1e-12
    s.requires_grad_(True)
    torch.autograd.gradcheck(lambda z: multilabel_kd(z, t.double(), tau), (s,))


def test_multilabel_bce_and_bcos_off_labels_on_multi_hot_targets():
    logits, targets = torch.randn(3, 4), torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(multilabel_bce(logits, targets), plain)
    off = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0.25))
    assert torch.allclose(uniform_off_label_bce(logits, targets), off)  # 1/C = 0.25
    with pytest.raises(ValueError, match="must match the logits"):
        multilabel_bce(logits, targets[:, :2])


def _devkit_ap(scores: list[float], positives: list[bool]) -> float:
    """The VOC devkit recipe (VOCevalcls, 2010+): sentinel-padded precision envelope, summed over recall steps."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    rec, prec = [], []
    npos = sum(positives)
    for i in order:
        tp, fp = tp + positives[i], fp + (not positives[i])
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_average_precision_matches_the_devkit_recipe():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        scores, positives = torch.rand(30, generator=gen), torch.rand(30, generator=gen) < 0.4
        assert average_precision(scores, positives) == pytest.approx(
            _devkit_ap(scores.tolist(), positives.tolist()), abs=1e-12
        )
    assert average_precision(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, False, True])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    assert math.isnan(average_precision(torch.rand(3), torch.zeros(3, dtype=torch.bool)))
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.8], [0.9, 0.3]])
    targets = torch.tensor([[1.0, 1], [0, 0], [0, 1]])
    ignore = torch.tensor([[False, False], [False, False], [True, False]])
    mean, per_class = mean_average_precision(scores, targets, ignore)
    assert per_class[0] == 1.0 and per_class[1] == pytest.approx(2 / 3)  # the ignored 0.9 does not count
    assert mean == pytest.approx(5 / 6)
    assert mean_average_precision(scores, targets)[1][0] == pytest.approx(0.5)


def test_group_and_worst_group_accuracy():
    correct = torch.tensor([True, False, True, True, False, True])
    groups = torch.tensor([0, 0, 1, 3, 3, 3])
    assert group_accuracy(correct, groups) == {0: 0.5, 1: 1.0, 3: pytest.approx(2 / 3)}
    extras = EvalExtras()
    logits = torch.tensor([[2.0, 0], [0, 2.0], [2.0, 0], [0, 2.0]])
    batch = {
        "target": torch.tensor([0, 0, 1, 1]),
        "group": torch.tensor([0, 1, 2, 3]),
        "place": torch.tensor([0, 1, 0, 1]),
    }
    extras.update(batch, logits)
    out = extras.compute()
    assert out["group0_acc"] == 1 and out["group1_acc"] == 0 and out["group2_acc"] == 0 and out["group3_acc"] == 1
    assert out["worst_group_acc"] == 0 and out["mean_group_acc"] == 0.5
    assert out["id_acc"] == 1.0 and out["ood_acc"] == 0.0


def test_the_objective_uses_the_multilabel_kd_term():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(12, 5), torch.nn.Linear(12, 5).requires_grad_(False)
    flat = torch.nn.Flatten()
    s_net, t_net = torch.nn.Sequential(flat, student), torch.nn.Sequential(flat, teacher)
    x, labels = torch.randn(4, 3, 2, 2), (torch.rand(4, 5) < 0.5).float()
    out = e2kd_objective(s_net, t_net, x, tau=2.0, lam=0.0, labels=labels, gt_coef=0.5, multilabel=True)
    expected_kd = multilabel_kd(s_net(x), t_net(x), 2.0)
    expected_gt = uniform_off_label_bce(s_net(x), labels)  # explanation="bcos": off-labels at 1/C
    assert torch.allclose(out["kd"], expected_kd) and torch.allclose(out["gt"], expected_gt)
    assert torch.allclose(out["loss"], expected_kd + 0.5 * expected_gt)
    weighted = e2kd_objective(
        s_net, t_net, x, tau=2.0, lam=0.0, labels=labels, gt_coef=0.5, logit_coef=0.25, multilabel=True
    )
    assert torch.allclose(weighted["loss"], 0.25 * expected_kd + 0.5 * expected_gt)
    assert torch.equal(out["target"], t_net(x).argmax(1))  # the explained class: the teacher's top-1


# ----------------------------------------------------------------------------------------------------------------------
# The configs train a few steps on the tiny files
# ----------------------------------------------------------------------------------------------------------------------


def _small(path: Path, root: Path, tmp_path: Path, extra: list[str] = ()):
    bcos = load_config(path).student.name.startswith("bcos_")
    model = "bcos_resnet20_cifar" if bcos else "resnet18"
    return load_config(
        path,
        [
            f"data.root={root}",
            "data.image_size=16",
            "data.eval_resize=16",
            "data.batch_size=4",
            "data.num_workers=0",
            "train.epochs=1",
            f"train.out_dir={tmp_path / 'run'}",
            "train.device=cpu",
            "train.compile=false",
            f"student.name={model}",
            "student.kwargs={}",
            f"teacher.name={model}",
            "teacher.checkpoint=null",
            *extra,
        ],
    )


@pytest.mark.parametrize("name", ["voc_bcos_r18_from_r50_e2kd", "voc_bcos_r18_from_r50_kd"])
def test_voc_configs_train_and_report_map(tmp_path, name):
    root = write_voc(tmp_path / "VOC2007", n_train=8, n_test=4)
    cfg = _small(CONFIGS / f"{name}.yaml", root, tmp_path)
    assert cfg.distill.multilabel and cfg.data.dataset == "voc"
    data = build_datasets(cfg)
    trainer = Trainer(cfg, data.train, data.val, show_progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 2
    final = summary["final_eval"]
    assert 0 <= final["map"] <= 1 and final["images"] == 4 and "agreement" in final
    if cfg.distill.method == "e2kd":
        assert "explanation_cosine" in final


@pytest.mark.parametrize("name", ["waterbirds_bcos_r18_from_r50_e2kd", "waterbirds_std_r18_from_r50_e2kd"])
def test_waterbirds_configs_train_and_report_group_accuracy(tmp_path, name):
    root = write_waterbirds(tmp_path / "wb", per_split=8)
    cfg = _small(CONFIGS / f"{name}.yaml", root, tmp_path)
    data = build_datasets(cfg)
    trainer = Trainer(cfg, data.train, data.val, show_progress=False)
    final = trainer.fit()["final_eval"]
    assert {"group0_acc", "group1_acc", "group2_acc", "group3_acc", "worst_group_acc", "id_acc", "ood_acc"} <= set(
        final
    )
    assert final["worst_group_acc"] == min(final[f"group{g}_acc"] for g in range(4))


def test_dataset_config_combinations_are_checked(tmp_path):
    path = CONFIGS / "voc_bcos_r18_from_r50_kd.yaml"
    with pytest.raises(ValueError, match="distill.multilabel is False but data.dataset is 'voc'"):
        load_config(path, ["distill.multilabel=false"])
    with pytest.raises(ValueError, match="data.mixup_alpha is 0.2 but is not supported with data.dataset 'voc'"):
        load_config(path, ["data.mixup_alpha=0.2"])
    with pytest.raises(ValueError, match="student.num_classes is 4 but data.dataset 'waterbirds' has 2 classes"):
        extra = ["student.num_classes=4", "teacher.num_classes=4"]
        cfg = _small(CONFIGS / "waterbirds_bcos_r18_from_r50_kd.yaml", tmp_path, tmp_path, extra)
        build_datasets(cfg)


def test_waterbirds_held_out_and_few_shot_splits_are_the_folder_ones(tmp_path):
    from e2kd_fast.data.splits import few_shot_indices, held_out_split

    root = write_waterbirds(tmp_path / "wb", per_split=8)
    extra = ["data.val_per_class=1", "data.shots=2", "data.val_split=test"]
    cfg = _small(CONFIGS / "waterbirds_bcos_r18_from_r50_kd.yaml", root, tmp_path, extra)
    data = build_datasets(cfg)
    targets = WaterbirdsDataset(root, "train").targets
    _, held_out = held_out_split(targets, 1, cfg.data.val_seed)
    assert data.val.split == "train" and torch.equal(data.val_indices, held_out)  # held out of train, not test
    assert torch.equal(data.train_indices, few_shot_indices(targets, 2, cfg.data.shot_seed, exclude=held_out))
    assert len(data.train_indices) == 4 and not set(data.train_indices.tolist()) & set(held_out.tolist())


def test_evaluate_reports_map_for_multi_hot_batches():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(6, 3, 2, 2)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
    out = evaluate(model, [{"image": x, "target": targets}], explanation=None)
    logits = model(x).detach()
    assert out["map"] == pytest.approx(mean_average_precision(logits, targets)[0])
    top1 = targets.gather(1, logits.argmax(1, keepdim=True)).mean().item()
    assert out["top1"] == pytest.approx(top1)
