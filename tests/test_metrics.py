"""e2kd_fast.metrics: distance correlation against the `dcor` package, localisation hand cases, shift
equivariance, UniCAM / FSS / RS properties (docs/metrics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from e2kd_fast.metrics import (
    boxes_to_mask,
    distance_correlation,
    distance_correlation_sqr,
    distance_covariance_sqr,
    distilled_feature_map,
    energy_pointing_game,
    evaluate_grid_pointing_game,
    feature_similarity_score,
    grid_pointing_game,
    iou,
    label_embedding,
    make_grid_images,
    partial_distance_correlation,
    partial_distance_covariance,
    relevance_score,
    residual_feature_map,
    semi_partial_distance_correlation,
    shift_equivariance,
    unicam,
)
from e2kd_fast.metrics import dcor as mdcor
from e2kd_fast.metrics.unicam import check_label_batch, feature_similarity, stage_features

# dcor is only the oracle. Its import compiles numba gufuncs (cached in site-packages afterwards);
# NUMBA_DISABLE_JIT cannot shorten that: the gufuncs then fail to type against the un-jitted helpers.
dcor = pytest.importorskip("dcor")


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(14, 5))
    y = x[:, :3] ** 2 + 0.5 * rng.normal(size=(14, 3))
    z = x[:, :4] + rng.normal(size=(14, 4))
    return x, y, z


def _t(*arrays):
    return [torch.tensor(a) for a in arrays]


# --------------------------------------------------------------------------------------- dcor


def test_biased_dcor_matches_dcor_package(samples):
    x, y, _ = samples
    tx, ty = _t(x, y)
    assert float(distance_correlation_sqr(tx, ty, eps=0)) == pytest.approx(
        dcor.distance_correlation_sqr(x, y), abs=1e-12
    )
    assert float(distance_correlation(tx, ty, eps=0)) == pytest.approx(dcor.distance_correlation(x, y), abs=1e-12)
    assert float(distance_covariance_sqr(tx, ty, eps=0)) == pytest.approx(dcor.distance_covariance_sqr(x, y), abs=1e-12)
    # the code's default stabiliser (1e-12 under the root, diagonal included) moves it by ~1e-7
    assert float(distance_correlation_sqr(tx, ty)) == pytest.approx(dcor.distance_correlation_sqr(x, y), abs=1e-5)


def test_unbiased_dcor_matches_dcor_package(samples):
    x, y, _ = samples
    tx, ty = _t(x, y)
    got = float(distance_correlation_sqr(tx, ty, unbiased=True))
    assert got == pytest.approx(dcor.u_distance_correlation_sqr(x, y), abs=1e-12)
    got_cov = float(distance_covariance_sqr(tx, ty, unbiased=True))
    assert got_cov == pytest.approx(dcor.u_distance_covariance_sqr(x, y), abs=1e-12)


def test_partial_dcor_matches_dcor_package(samples):
    x, y, z = samples
    tx, ty, tz = _t(x, y, z)
    assert float(partial_distance_correlation(tx, ty, tz)) == pytest.approx(
        dcor.partial_distance_correlation(x, y, z), abs=1e-12
    )
    assert float(partial_distance_covariance(tx, ty, tz)) == pytest.approx(
        dcor.partial_distance_covariance(x, y, z), abs=1e-12
    )


def test_semi_partial_is_full_times_norm_ratio(samples):
    tx, ty, tz = _t(*samples)
    a, g, c = (mdcor.u_centred_distances(t) for t in (tx, ty, tz))
    pa, pg = mdcor.project_out(a, c), mdcor.project_out(g, c)
    assert float(mdcor.u_inner(pa, c)) == pytest.approx(0.0, abs=1e-12)  # projection is orthogonal
    ratio = (mdcor.u_inner(pg, pg) / mdcor.u_inner(g, g)).sqrt()
    semi = semi_partial_distance_correlation(tx, ty, tz)
    full = partial_distance_correlation(tx, ty, tz)
    torch.testing.assert_close(semi, full * ratio, rtol=1e-10, atol=1e-12)
    assert abs(float(semi)) < abs(float(full))  # |P(G)| < |G| when z and y share structure


def test_u_centred_matrix_and_rstar_of_self(samples):
    tx, _, _ = _t(*samples)
    a = mdcor.u_centred_distances(tx)
    # the diagonal distance is sqrt(eps) = 1e-9 (the code's stabiliser), so rows sum to ~1e-9
    torch.testing.assert_close(a.sum(1), torch.zeros(14, dtype=torch.float64), atol=1e-8, rtol=0)
    exact = mdcor.u_centred_distances(tx, eps=0)
    torch.testing.assert_close(exact.sum(1), torch.zeros(14, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.all(a.diagonal() == 0)
    assert float(mdcor.rstar(a, a)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 4"):
        mdcor.u_centre(torch.ones(3, 3))


def test_batched_equals_loop_and_gradients_finite():
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    y = torch.randn(3, 9, 2, dtype=torch.float64)
    batched = distance_correlation_sqr(x, y, unbiased=True)
    looped = torch.stack([distance_correlation_sqr(x[i], y[i], unbiased=True) for i in range(3)])
    torch.testing.assert_close(batched, looped)
    dup = torch.randn(8, 3, requires_grad=True)
    data = torch.cat([dup, dup[:2]])  # coinciding samples: the stabiliser keeps the gradient finite
    (g,) = torch.autograd.grad(distance_correlation_sqr(data, torch.randn(10, 2), unbiased=True), dup)
    assert torch.isfinite(g).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="must agree"):
        distance_correlation_sqr(torch.randn(5, 2), torch.randn(6, 2))


# --------------------------------------------------------------------------------------- localisation


def test_energy_pointing_game_hand_case():
    attribution = torch.zeros(2, 4, 4)
    attribution[0, 0, 0], attribution[0, 3, 3], attribution[0, 0, 3] = 3.0, 1.0, -5.0  # negatives ignored
    attribution[1] = -1.0  # no positive energy: undefined
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    torch.testing.assert_close(energy_pointing_game(attribution, mask), torch.tensor([0.75, 0.0]))
    assert torch.isnan(energy_pointing_game(attribution, mask, undefined=float("nan"))[1])
    # a lower-resolution map is upsampled to the mask first
    low = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    upsampled = F.interpolate(low[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    expected = upsampled[0, :2, :2].sum() / upsampled.sum()
    assert float(energy_pointing_game(low, mask[:1])) == pytest.approx(float(expected))


def test_epg_reproduces_the_demo_formula():
    torch.manual_seed(0)
    contrib, masks = torch.randn(16, 8, 8), torch.rand(16, 8, 8) > 0.5
    positive = contrib.clamp(min=0)
    old = (positive * masks).sum((1, 2)) / positive.sum((1, 2)).clamp_min(1e-12)
    assert torch.equal(energy_pointing_game(contrib, masks, min_total=1e-12), old)


def test_iou_hand_cases():
    attribution = torch.zeros(1, 4, 4)
    attribution[0, :2, :2] = 1.0
    attribution[0, 2, 2] = 0.4  # below half the max: not kept by the min-max rule
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :3] = True
    assert float(iou(attribution, mask)) == pytest.approx(4 / 6)
    # quantile rule: the top 5/16 of pixels are the 4 ones and the 0.4
    assert float(iou(attribution, mask, threshold=5 / 16, method="quantile")) == pytest.approx(4 / 7)
    assert float(iou(-attribution, mask)) == 0.0
    with pytest.raises(ValueError, match="thresholding"):
        iou(attribution, mask, method="otsu")


def test_boxes_to_mask():
    mask = boxes_to_mask(torch.tensor([[0, 0, 2, 1], [1, 2, 3, 4]]), 4, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    frac = boxes_to_mask([torch.tensor([[0.5, 0.5, 1.2, 1.2]]), torch.zeros(0, 4)], 3, 3)
    assert frac.shape == (2, 3, 3) and int(frac[0].sum()) == 4 and not frac[1].any()
    with pytest.raises(ValueError, match="x_min"):
        boxes_to_mask(torch.tensor([[2, 0, 1, 1]]), 4, 4)


def test_grid_pointing_game_hand_cases():
    attribution = torch.zeros(3, 6, 6)
    attribution[0, 4:, 4:] = 1.0  # all in cell 8 of a 3x3 grid
    attribution[1] = 1.0  # uniform: chance level
    attribution[2, :3, :3] = 1.0  # cell 0 of a 2x2 grid occupies rows/cols 0..2
    assert float(grid_pointing_game(attribution[:1], 3, 8)) == 1.0
    assert float(grid_pointing_game(attribution[1:2], 3, torch.tensor([4]))) == pytest.approx(1 / 9)
    assert float(grid_pointing_game(attribution[2:], 2, 0)) == 1.0
    assert float(grid_pointing_game(attribution[2:], 2, 3)) == 0.0
    with pytest.raises(ValueError, match="divisible"):
        grid_pointing_game(torch.ones(1, 5, 5), 2, 0)


def test_make_grid_images_and_evaluate():
    classes = 6
    labels = torch.arange(12) % classes
    images = labels.float()[:, None, None, None].expand(12, 1, 4, 4).clone()  # pixel value = class
    logits = F.one_hot(labels, classes).float() * 20
    logits[0] = 0.0  # image 0 is not confidently classified
    other = logits.clone()
    other[1, 1], other[1, 2] = 0.0, 20.0  # the second model misclassifies image 1
    grids = make_grid_images(images, labels, [logits, other], grid=2, num_grids=5, seed=3)
    assert grids.images.shape == (5, 1, 8, 8) and grids.eligible == 10
    assert all(len(set(row.tolist())) == 4 for row in grids.labels)  # distinct classes per grid
    assert not set(grids.indices.flatten().tolist()) & {0, 1}
    assert torch.equal(grids.images[:, 0, 4, 0], grids.labels[:, 2].float())  # cell 2 = bottom-left
    again = make_grid_images(images, labels, [logits, other], grid=2, num_grids=5, seed=3)
    assert torch.equal(again.indices, grids.indices)

    def perfect(x, cls):  # points exactly at the pixels showing the requested class
        return (x[:, 0] == cls[:, None, None].float()).float()

    scores = evaluate_grid_pointing_game(perfect, grids, 2)
    assert scores.shape == (5, 4) and torch.all(scores == 1)
    assert evaluate_grid_pointing_game(perfect, grids, 2, corners_only=True).shape == (5, 2)
    with pytest.raises(ValueError, match="classes"):
        make_grid_images(images, labels, logits, grid=3)


# --------------------------------------------------------------------------------------- shift


def test_shift_equivariance_exact_and_broken():
    torch.manual_seed(0)
    images = torch.rand(3, 2, 12, 12)
    shifts = [0, 2, (1, -3)]
    for border in ("overlap", "circular", "fill"):
        scores = shift_equivariance(lambda x: x, images, shifts, border=border)
        for shift in shifts:
            torch.testing.assert_close(scores[shift], torch.ones(3))

    weight = torch.randn(1, 2, 3, 3)

    def circular_conv(x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), weight)[:, 0]

    circ = shift_equivariance(circular_conv, images, [3, (0, 5)], border="circular")
    assert all(torch.allclose(v, torch.ones(3), atol=1e-6) for v in circ.values())

    ramp = torch.linspace(0.1, 1, 12)[None, None, :]

    def position_dependent(x):
        return x[:, 0] * ramp

    broken = shift_equivariance(position_dependent, images, [0, 4])
    assert torch.allclose(broken[0], torch.ones(3))
    assert torch.all(broken[4] < 0.99)
    with pytest.raises(ValueError, match="input resolution"):
        shift_equivariance(lambda x: x[..., :6, :6], images, [1])


# --------------------------------------------------------------------------------------- UniCAM / FSS / RS


def _tiny_resnet(seed: int, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=classes)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)  # layer4 is 2x2: a spatial target
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    return _tiny_resnet(1), _tiny_resnet(2), images, labels


def test_unicam_maps_shape_range_determinism(tiny):
    student, base, images, labels = tiny
    maps = distilled_feature_map(student, base, images, labels)
    assert maps.shape == (8, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.amax((1, 2)).max() > 0.5
    torch.testing.assert_close(distilled_feature_map(student, base, images, labels), maps, rtol=0, atol=0)
    residual = residual_feature_map(student, base, images, labels)
    assert residual.shape == maps.shape and not torch.allclose(residual, maps)
    label_free = unicam(student, base, images, mode="argmax", cut=3)  # a spatial cut, targets stage 3
    assert label_free.shape == (8, 64, 64) and label_free.min() >= 0 and label_free.max() <= 1
    several = unicam(student, base, images, labels, target_stages=[3, 4], partial="full")
    assert several.shape == (8, 64, 64) and several.max() <= 1


def test_unicam_of_a_model_against_itself_is_zero(tiny):
    student, _, images, labels = tiny
    assert torch.all(unicam(student, student, images, labels) == 0)


def test_unicam_input_errors(tiny):
    student, base, images, labels = tiny
    with pytest.raises(ValueError, match="at least 4"):
        unicam(student, base, images[:3], labels[:3])
    with pytest.raises(ValueError, match="needs the labels"):
        unicam(student, base, images)
    with pytest.raises(ValueError, match="single class"):
        check_label_batch(torch.zeros(6))
    with pytest.raises(ValueError, match="at least 2 images"):
        check_label_batch(torch.tensor([0, 0, 0, 1]))


def test_fss_self_is_one_and_pairs_are_in_range(tiny):
    student, base, images, _ = tiny
    same = feature_similarity_score(student, student, images)
    assert list(same) == [1, 2, 3, 4] and all(v == pytest.approx(1.0, abs=1e-6) for v in same.values())
    features = stage_features(student, images, [2, "pooled"])
    for estimator in ("v", "v_rownorm"):
        for f in features.values():
            assert float(feature_similarity(f, f, estimator)) == pytest.approx(1.0, abs=1e-6)
    pair = feature_similarity_score(student, base, images, stages=[2, "pooled"], estimator="v", batch_size=3)
    assert set(pair) == {2, "pooled"} and all(0 <= v <= 1 for v in pair.values())


def test_rs_two_class_is_embedding_invariant_and_partial_of_self_is_zero(tiny):
    student, base, images, _ = tiny
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    onehot = relevance_score(student, images, labels, stages=[4, "pooled"])
    random = relevance_score(student, images, labels, stages=[4, "pooled"], embedding="random")
    table = relevance_score(student, images, labels, stages=[4, "pooled"], embedding=torch.tensor([[3.0, -1], [0, 7]]))
    for s in onehot:
        assert random[s] == pytest.approx(onehot[s], abs=1e-10) and table[s] == pytest.approx(onehot[s], abs=1e-10)
        assert -1 <= onehot[s] <= 1
    itself = relevance_score(student, images, labels, given=student, stages=[4])
    assert itself[4] == pytest.approx(0.0, abs=1e-6)
    semi = relevance_score(student, images, labels, given=base, stages=[4])
    full = relevance_score(student, images, labels, given=base, stages=[4], partial="full")
    assert abs(semi[4]) <= abs(full[4]) + 1e-12  # the semi-partial shrinks by ‖P(G)‖/‖G‖ ≤ 1


def test_label_embedding():
    labels = torch.tensor([2, 0, 1])
    assert torch.equal(label_embedding(labels), torch.eye(3, dtype=torch.float64)[labels])
    small = label_embedding(labels, "random", dim=4)
    large = label_embedding(labels, "random", dim=4, num_classes=10)
    assert torch.equal(small, large)  # class vectors do not depend on the number of classes
    with pytest.raises(ValueError, match="out of range"):
        label_embedding(labels, num_classes=2)
