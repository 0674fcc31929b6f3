"""XDistillation: CAE sizes, superpixel sums, KernelSHAP/LIME against known answers, metrics, pipeline."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from e2kd_fast.xdistill.cae import LARGE_CAE_PARAMS, SMALL_CAE_PARAMS, count_parameters, large_cae, small_cae
from e2kd_fast.xdistill.config import load_xdistill_config, xdistill_config_from_dict
from e2kd_fast.xdistill.explainers import gradcam_superpixels, hide_image, kernel_shap, lime
from e2kd_fast.xdistill.metrics import explanation_mse, topk_sign_overlap
from e2kd_fast.xdistill.student import SmallCNN, XDistillStudent, xdistill_loss
from e2kd_fast.xdistill.superpixels import (
    broadcast_segments,
    num_segments,
    segment_masks_to_pixels,
    slic_segments,
    superpixel_map,
    superpixel_sums,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# CAE


def test_cae_parameter_counts_match_the_paper():
    assert SMALL_CAE_PARAMS == 1077 and LARGE_CAE_PARAMS == 198796
    assert count_parameters(small_cae()) == 1077
    assert count_parameters(large_cae()) == 198796


@pytest.mark.parametrize(
    "make, shape", [(small_cae, (2, 1, 28, 28)), (large_cae, (2, 3, 32, 32)), (large_cae, (1, 3, 20, 27))]
)
def test_cae_maps_image_to_bounded_single_channel_map(make, shape):
    out = make()(torch.rand(shape))
    assert out.shape == (shape[0], 1, *shape[2:])
    assert out.abs().max() <= 1


# ----------------------------------------------------------------------------------------------------------------------
# Superpixels


def _grid_segments(n: int, h: int, w: int, rows: int, cols: int) -> torch.Tensor:
    ys = torch.arange(h)[:, None] * rows // h
    xs = torch.arange(w)[None, :] * cols // w
    return (ys * cols + xs).expand(n, h, w).clone()


def test_superpixel_sums_preserve_mass_and_are_piecewise_constant():
    images = torch.rand(3, 3, 24, 24)
    segments = slic_segments(images, n_segments=8)
    assert segments.shape == (3, 24, 24) and segments.dtype == torch.int64
    phi = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    emap = superpixel_map(phi, segments)
    assert emap.shape == (3, 1, 24, 24)
    torch.testing.assert_close(superpixel_sums(phi, segments).sum(1), phi.sum((1, 2, 3)))
    # Painting v_s on the segment and summing per segment gives |s|·v_s: divide by the areas to get v back.
    areas = superpixel_sums(torch.ones(3, 1, 24, 24, dtype=torch.float64), segments)
    values = superpixel_sums(phi, segments)
    torch.testing.assert_close(superpixel_sums(emap, segments) / areas.clamp_min(1), values * (areas > 0))
    # A loop over pixels as the independent reference.
    ref = torch.zeros_like(values)
    for n, i, j in itertools.product(range(3), range(24), range(24)):
        ref[n, segments[n, i, j]] += phi[n, :, i, j].sum()
    torch.testing.assert_close(values, ref)


def test_slic_gives_about_k_contiguous_labels():
    from e2kd_fast.data.synthetic import shapes_dataset

    images, _, _ = shapes_dataset(4, 32, seed=0)
    segments = slic_segments(images, n_segments=19)
    counts = num_segments(segments)
    assert ((counts >= 10) & (counts <= 30)).all(), counts
    for n in range(4):  # labels are 0..K−1 without gaps
        assert torch.equal(segments[n].unique(), torch.arange(int(counts[n])))


# ----------------------------------------------------------------------------------------------------------------------
# Explainers


class _PixelLinear(nn.Module):
    """logit_0 = <w, x> + b, logit_1 = 0: linear in the image, hence in the superpixel mask."""

    def __init__(self, c: int, h: int, w: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, h, w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.w).sum((1, 2, 3)) + self.b
        return torch.stack([z, torch.zeros_like(z)], 1)


def _linear_case(rows: int = 3, cols: int = 3, n: int = 2):
    torch.manual_seed(1)
    images = torch.rand(n, 3, 12, 12, dtype=torch.float64)
    segments = _grid_segments(n, 12, 12, rows, cols)
    model = _PixelLinear(3, 12, 12)
    background = hide_image(images, segments, "mean")
    # The true contribution of superpixel s: Σ_{p∈s} w_p (x_p − background_p), computed independently.
    truth = superpixel_sums(model.w * (images - background), segments).detach()
    return model, images, segments, truth


@pytest.mark.parametrize("rows, cols, num_samples", [(2, 3, None), (4, 5, 400)])  # exact (M=6), sampled (M=20)
def test_kernel_shap_recovers_linear_contributions(rows, cols, num_samples):
    model, images, segments, truth = _linear_case(rows, cols)
    target = torch.zeros(2, dtype=torch.long)
    phi = kernel_shap(model, images, segments, target, num_samples=num_samples, output="logit", seed=0)
    torch.testing.assert_close(phi, truth, rtol=1e-7, atol=1e-9)


def test_kernel_shap_exact_mode_equals_brute_force_shapley_values():
    """A non-linear game: enumeration with the Shapley kernel must equal the Shapley formula."""
    torch.manual_seed(2)
    images = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    segments = _grid_segments(1, 8, 8, 2, 2)  # M = 4
    w1, w2 = torch.randn(1, 8, 8, dtype=torch.float64), torch.randn(1, 8, 8, dtype=torch.float64)

    def model(x):
        z = (x * w1).sum((1, 2, 3)) * (x * w2).sum((1, 2, 3)) + torch.tanh((x * w2).sum((1, 2, 3)))
        return torch.stack([z, -z], 1)

    background = hide_image(images, segments, "zero")
    phi = kernel_shap(model, images, segments, torch.zeros(1, dtype=torch.long), hide="zero", output="logit")

    def value(coalition: tuple[int, ...]) -> float:
        z = torch.zeros(1, 1, 4, dtype=torch.float64)
        z[0, 0, list(coalition)] = 1
        mask = segment_masks_to_pixels(z, segments)[:, 0]
        return float(model(mask * images + (1 - mask) * background)[0, 0])

    m = 4
    ref = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for s in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                ref[i] += weight * (value((*s, i)) - value(s))
    torch.testing.assert_close(phi[0], ref, rtol=1e-8, atol=1e-10)


def test_kernel_shap_efficiency_and_seeding_on_a_cnn():
    torch.manual_seed(0)
    model = SmallCNN(3, 4, (4, 8)).eval()
    images = torch.rand(3, 3, 16, 16)
    segments = slic_segments(images, n_segments=10)
    target = torch.tensor([0, 1, 2])
    phi = kernel_shap(model, images, segments, target, num_samples=64, seed=3)
    again = kernel_shap(model, images, segments, target, num_samples=64, seed=3)
    assert torch.equal(phi, again)
    with torch.no_grad():
        full = model(images).softmax(1).gather(1, target[:, None])[:, 0]
        empty = model(hide_image(images, segments, "mean")).softmax(1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(phi.sum(1), full - empty, rtol=1e-4, atol=1e-6)


def test_lime_recovers_linear_contributions():
    model, images, segments, truth = _linear_case(4, 4)
    target = torch.zeros(2, dtype=torch.long)
    exact = lime(model, images, segments, target, num_samples=300, ridge_alpha=0.0, output="logit", seed=0)
    torch.testing.assert_close(exact, truth, rtol=1e-7, atol=1e-9)
    # LIME's own ridge penalty (α = 1) shrinks the coefficients only slightly with 1000 samples.
    shrunk = lime(model, images, segments, target, num_samples=1000, output="logit", seed=0)
    assert (shrunk - truth).abs().max() <= 0.05 * truth.abs().max()


def _autograd_gradcam(features, logits, target, size):
    """Independent GradCAM: channel weights are the spatial mean of ∂y_c/∂A by autograd."""
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), features)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True))
    return torch.nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False).detach()


def test_gradcam_superpixels_of_a_small_cnn_and_of_the_student():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    segments = slic_segments(images, n_segments=6)
    cnn = SmallCNN(3, 4, (4, 8)).eval()
    target = torch.tensor([0, 3])
    a = cnn.features(images)
    expected = _autograd_gradcam(a, cnn.fc(a.mean((2, 3))), target, (16, 16))
    torch.testing.assert_close(cnn.gradcam(images, target), expected)
    values = gradcam_superpixels(cnn, images, segments, target)
    torch.testing.assert_close(values, superpixel_sums(expected, segments))

    # The student: the CAE features enter the classifier too, but do not change ∂y_c/∂A.
    student = XDistillStudent(SmallCNN(3, 4, (4, 8)), large_cae(), 4, (16, 16)).eval()
    target = torch.tensor([1, 2])
    a, fused = student.fused(images)
    expected = _autograd_gradcam(a, student.classifier(fused), target, (16, 16))
    assert expected.abs().sum() > 0
    values = gradcam_superpixels(student, images, segments, target)
    torch.testing.assert_close(values, superpixel_sums(expected, segments))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and loss


def test_topk_sign_overlap_hand_cases():
    t = torch.tensor([[3.0, -2.0, 1.0, 0.5], [1.0, -4.0, 2.0, 0.1], [1.0, 2.0, 3.0, 4.0]])
    s = torch.tensor([[2.5, -1.0, -4.0, 0.0], [-1.0, -3.0, 5.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    # Row 0: teacher top-2 {0, 1}, student top-2 {2, 0}; shared {0}, same sign -> 1/2.
    # Row 1: teacher top-2 {1, 2}, student top-2 {2, 1}; both shared with the same sign -> 1.
    # Row 2: top-2 {3, 2} vs {0, 1}: nothing shared -> 0.
    torch.testing.assert_close(topk_sign_overlap(t, s, 2), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    # k = 1: row 0 {0} vs {2} -> 0; row 1 {1} vs {2} -> 0; row 2 {3} vs {0} -> 0.
    torch.testing.assert_close(topk_sign_overlap(t, s, 1), torch.zeros(3, dtype=torch.float64))
    # Opposite signs on the shared superpixels score 0; k past the valid count divides by that count.
    valid = torch.tensor([[True, True, False, False]])
    assert float(topk_sign_overlap(torch.tensor([[1.0, -1.0, 9, 9]]), torch.tensor([[-1.0, 1.0, 9, 9]]), 3, valid)) == 0
    assert float(topk_sign_overlap(torch.tensor([[1.0, -1.0, 9, 9]]), torch.tensor([[2.0, -1.0, 0, 0]]), 3, valid)) == 1


def test_explanation_mse_levels():
    segments = torch.tensor([[[0, 0, 0], [0, 1, 1]]])  # areas 4 and 2
    t, s = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    assert float(explanation_mse(t, s, segments, level="segment")) == pytest.approx(2.0)  # (0 + 4) / 2
    assert float(explanation_mse(t, s, segments, level="pixel")) == pytest.approx(8 / 6)  # area-weighted
    assert float(explanation_mse(2 * t, s, segments, normalise="none", level="segment")) == pytest.approx((1 + 9) / 2)


def test_xdistill_loss_weights():
    zs, zt = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    pen = torch.tensor(2.0)
    loss, parts = xdistill_loss(zs, zt, y, pen, alpha=0.9, tau=2.0, lam=0.5)
    soft_ce = -(torch.softmax(zt / 2, 1) * torch.log_softmax(zs / 2, 1)).sum(1).mean() * 4
    expected = torch.nn.functional.cross_entropy(zs, y) + 0.1 * soft_ce + 0.5 * 2.0
    torch.testing.assert_close(loss, expected)
    assert parts["kl"] <= parts["kd"] + 1e-6  # KL = soft CE − teacher entropy
    loss_alpha, _ = xdistill_loss(zs, zt, y, pen, alpha=0.9, tau=2.0, lam=0.5, cls_weight="alpha")
    torch.testing.assert_close(loss_alpha, expected - 0.1 * torch.nn.functional.cross_entropy(zs, y))


def test_student_freezes_cae_and_penalises_the_classifier():
    cae = large_cae()
    student = XDistillStudent(SmallCNN(3, 4, (4, 8)), cae, 4, (16, 16))
    assert all(not p.requires_grad for p in cae.parameters())
    assert student.classifier.in_features == 8 + 16 * 16
    student.train()
    assert not cae.training
    torch.testing.assert_close(student.penalty("classifier"), student.classifier.weight.square().sum())
    logits, feats = student.forward_with_features(torch.rand(2, 3, 16, 16))
    assert logits.shape == (2, 4) and feats.shape == (2, 8 + 256)


# ----------------------------------------------------------------------------------------------------------------------
# Config and pipeline


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="student.alpah.*did you mean 'alpha'"):
        xdistill_config_from_dict({"student": {"alpah": 0.5}})
    with pytest.raises(ValueError, match=r"eval.explainers\[0\]"):
        xdistill_config_from_dict({"eval": {"explainers": ["shap"]}})
    with pytest.raises(ValueError, match="student.alpha"):
        xdistill_config_from_dict({"student": {"alpha": 1.5}})
    for name in ("synthetic.yaml", "imagenet_folder.yaml"):
        load_xdistill_config(REPO / "configs" / "xdistill" / name)


def test_folder_val_split_uses_the_training_classes(tmp_path):
    from e2kd_fast.xdistill.run import load_data
    from tests.helpers import write_image_folder

    root = write_image_folder(tmp_path, classes=3, per_split={"train": 1, "val": 1}, size=(8, 8))
    cfg = xdistill_config_from_dict({"data": {"dataset": "folder", "root": str(root), "image_size": 8}})
    assert load_data(cfg)[-1] == 3
    (root / "val" / "class_0").rename(root / "val" / "aardvark")  # would relabel every val image
    with pytest.raises(ValueError, match="missing: class_0; extra: aardvark"):
        load_data(cfg)


TINY = {
    "data": {"num_train": 24, "num_val": 12, "image_size": 16},
    "teacher": {"widths": [8, 16], "epochs": 1},
    "explain": {"num_samples": 32, "n_segments": 6},
    "cae": {"epochs": 1},
    "student": {"widths": [4, 8], "epochs": 1},
    "eval": {"num_images": 6, "num_samples": 16, "topk": [1, 2]},
    "run": {"device": "cpu"},
}


def _tiny_from_synthetic_yaml() -> dict:
    import yaml

    d = yaml.safe_load((REPO / "configs" / "xdistill" / "synthetic.yaml").read_text())
    for section, values in TINY.items():
        d[section].update(values)
    return d


def test_pipeline_runs_end_to_end(tmp_path):
    from e2kd_fast.xdistill.run import run

    metrics = run(_tiny_from_synthetic_yaml(), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["cae_params"] == 198796
    assert set(written["explanations"]) == {"kernel_shap", "lime", "gradcam"}
    for scores in written["explanations"].values():
        assert set(scores) == {"mse", "top1_sign_overlap", "top2_sign_overlap"}
        assert 0 <= scores["mse"] <= 4
    assert 0 <= metrics["student_acc"] <= 1 and "cae_val_l1" in metrics
    for name in ("cae.pt", "student.pt", "teacher.pt", "teacher_explanations.pt", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "run" / name).is_file()


def test_cli_xdistill_on_image_folders(tmp_path):
    import yaml

    from e2kd_fast.cli import main
    from tests.helpers import write_image_folder

    root = write_image_folder(tmp_path / "data", classes=2, per_split={"train": 6, "val": 2}, size=(20, 24))
    d = _tiny_from_synthetic_yaml()
    d["data"] = {"dataset": "folder", "root": str(root), "image_size": 16, "normalize": "imagenet"}
    d["cae"]["variant"] = "small"
    d["student"]["fusion_size"] = 4
    d["eval"]["explainers"] = ["gradcam", "lime"]
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["xdistill", str(cfg), "--out", str(tmp_path / "run")]) == 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["cae_params"] == 1077 and written["num_train_images"] == 12
    assert set(written["explanations"]) == {"gradcam", "lime"}
    # Bad configs fail with the key named, not a traceback.
    cfg.write_text(yaml.safe_dump({"cae": {"variant": "huge"}}))
    assert main(["xdistill", str(cfg), "--out", str(tmp_path / "bad")]) == 2


def test_broadcast_inverts_sums_on_constant_maps():
    segments = _grid_segments(2, 6, 6, 2, 3)
    values = torch.randn(2, 6)
    emap = broadcast_segments(values, segments)
    areas = superpixel_sums(torch.ones(2, 1, 6, 6), segments)
    torch.testing.assert_close(superpixel_sums(emap, segments) / areas, values)
