"""Presets, encodings and paired geometry (one crop/flip for an image and its maps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairedRandomResizedCropFlip,
    PairedResizeCenterCrop,
    center_crop_box,
    encoding_transform,
    eval_transform,
    paired_eval_transform,
    paired_train_transform,
    random_resized_crop_box,
    resized_crop_relative,
    train_transform,
)
from e2kd_fast.nn import AddInverse


def _pil(h: int = 40, w: int = 56) -> Image.Image:
    g = torch.Generator().manual_seed(1)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _smooth(h: int, w: int) -> torch.Tensor:
    """A smooth RGB image [3, h, w] in [0, 1], a function of the relative pixel-centre position."""
    y = ((torch.arange(h) + 0.5) / h)[:, None]
    x = ((torch.arange(w) + 0.5) / w)[None, :]
    return torch.stack([0.5 + 0.4 * torch.sin(2 * y + 3 * x), 0.3 + 0.5 * x * y, 0.5 + 0.3 * torch.cos(3 * y - x)])


def _ramp(h: int, w: int) -> torch.Tensor:
    """[3, h, w]: linear in the relative position, so bilinear resampling reproduces it exactly."""
    y = ((torch.arange(h, dtype=torch.float64) + 0.5) / h)[:, None].expand(h, w)
    x = ((torch.arange(w, dtype=torch.float64) + 0.5) / w)[None, :].expand(h, w)
    return torch.stack([0.2 + 0.6 * y, 0.1 + 0.8 * x, 0.3 + 0.3 * y + 0.3 * x])


@pytest.mark.parametrize("encoding, channels", [("bcos", 6), ("standard", 3), ("none", 3)])
def test_presets_shapes_and_encodings(encoding, channels):
    for make in (train_transform, eval_transform):
        x = make(24, encoding=encoding)(_pil()) if make is train_transform else make(24, 32, encoding)(_pil())
        assert type(x) is torch.Tensor and x.shape == (channels, 24, 24) and x.dtype == torch.float32
    plain = eval_transform(24, 32, "none")(_pil())
    assert 0 <= plain.min() and plain.max() <= 1
    encoded = eval_transform(24, 32, encoding)(_pil())
    if encoding == "bcos":
        assert torch.equal(encoded, torch.cat([plain, 1 - plain]))
    elif encoding == "standard":
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        torch.testing.assert_close(encoded, (plain - mean) / std)


def test_eval_preset_is_resize_then_center_crop():
    pil = _pil(40, 56)
    expected = TF.to_dtype(TF.pil_to_tensor(TF.center_crop(TF.resize(pil, 32), [24, 24])), torch.float32, scale=True)
    torch.testing.assert_close(eval_transform(24, 32, "none")(pil), expected)


def test_unknown_encoding_names_the_allowed_ones():
    for make in (train_transform, eval_transform, paired_train_transform, paired_eval_transform, encoding_transform):
        with pytest.raises(ValueError, match="bcos, standard, none"):
            make(encoding="imagenet") if make is not encoding_transform else make("imagenet")


@pytest.mark.parametrize(
    "box, size",
    [((5, 7, 30, 40), (16, 16)), ((3, 2, 10, 9), (32, 32)), ((0, 0, 50, 70), (7, 9)), ((10, 0, 3, 70), (5, 33))],
)
def test_resized_crop_relative_matches_torchvision_on_whole_pixels(box, size):
    x = torch.rand(3, 50, 70)
    top, left, h, w = box
    expected = TF.resized_crop(x, top, left, h, w, list(size), antialias=True)
    torch.testing.assert_close(resized_crop_relative(x, (top / 50, left / 70, h / 50, w / 70), size), expected)


def test_resized_crop_relative_keeps_dtype_and_uses_nearest_for_masks():
    x16 = torch.rand(6, 20, 20).half()
    assert resized_crop_relative(x16, (0.1, 0.1, 0.5, 0.5), 8).dtype == torch.float16
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:, 10:] = True
    out = resized_crop_relative(mask, (0.0, 0.0, 1.0, 1.0), (4, 8))
    assert out.dtype == torch.bool and out[:, :4].logical_not().all() and out[:, 4:].all()


def test_paired_eval_geometry_matches_resize_then_center_crop():
    for h, w in [(30, 40), (41, 29)]:
        x = torch.rand(3, h, w)
        expected = TF.center_crop(TF.resize(x, 24, antialias=True), [20, 20])
        torch.testing.assert_close(PairedResizeCenterCrop(20, 24)(x), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="larger"):
        center_crop_box(30, 40, 32, 24)


def test_random_resized_crop_boxes_lie_inside_and_follow_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 80, (0.3, 0.9), generator=g)
        assert 0 <= top and 0 <= left and top + h <= 1 + 1e-9 and left + w <= 1 + 1e-9
        assert 0.25 < h * w < 0.95  # area fraction in scale, up to whole-pixel rounding
        assert abs(top * 60 - round(top * 60)) < 1e-9 and abs(h * 60 - round(h * 60)) < 1e-9  # whole pixels


def test_paired_crop_flip_same_resolution_map_is_exact():
    image = torch.rand(3, 48, 64)
    maps = (2 * image, AddInverse(dim=0)(image))
    paired = PairedRandomResizedCropFlip(24, scale=(0.1, 1.0), generator=torch.Generator().manual_seed(0))
    for _ in range(20):  # covers many crops, with and without the flip
        out, doubled, encoded = paired(image, *maps)
        assert out.shape == (3, 24, 24) and encoded.shape == (6, 24, 24)
        torch.testing.assert_close(doubled, 2 * out)
        torch.testing.assert_close(encoded, AddInverse(dim=0)(out))  # 1 − x commutes with the crop


def test_paired_flip_applies_to_all_or_none():
    image = torch.rand(3, 32, 40)
    lowres = F.interpolate(image[None], size=(16, 20), mode="bilinear", antialias=True)[0]
    a = PairedRandomResizedCropFlip(16, flip_p=0.0, generator=torch.Generator().manual_seed(5))(image, lowres)
    b = PairedRandomResizedCropFlip(16, flip_p=1.0, generator=torch.Generator().manual_seed(5))(image, lowres)
    for x, y in zip(a, b, strict=True):  # same crop (same generator state), flipped in b for every tensor
        torch.testing.assert_close(y, x.flip(-1))
    assert not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("map_size", [(24, 32), (48, 64), (96, 128), (30, 50)])
def test_paired_crop_of_a_map_at_another_resolution_is_the_map_of_the_crop(map_size):
    image = _smooth(48, 64)
    explanation = AddInverse(dim=0)(_smooth(*map_size))  # the "same" picture at another resolution, 6 channels
    paired = PairedRandomResizedCropFlip(24, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        out, out_map = paired(image, explanation)
        assert out_map.shape == (6, 24, 24)
        torch.testing.assert_close(out_map, AddInverse(dim=0)(out), atol=0.03, rtol=0)


@pytest.mark.parametrize("map_size", [(24, 32), (96, 128), (37, 51)])
def test_paired_crop_samples_the_same_relative_positions(map_size):
    """On a ramp, resampling is exact away from the borders (up to the antialias filter's discrete taps, ~0.1 px;
    one output pixel of misalignment would be >2e-2): every output pixel must show the scene at the same relative
    position, in the image and in a map of any resolution."""
    h, w = 60, 80
    image, ramp_map = _ramp(h, w).float(), _ramp(*map_size).float()
    mask = _ramp(*map_size)[0] > 0.5  # a mask of the scene at the map's resolution (nearest)
    paired = PairedRandomResizedCropFlip(20, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(2))
    for _ in range(10):
        state = paired.generator.get_state()
        (top, left, bh, bw), flip = paired.get_params(h, w)
        paired.generator.set_state(state)
        out, out_map, out_mask = paired(image, ramp_map, mask)
        ys = top + (torch.arange(20, dtype=torch.float64) + 0.5) / 20 * bh
        xs = left + (torch.arange(20, dtype=torch.float64) + 0.5) / 20 * bw
        xs = xs.flip(0) if flip else xs
        yy, xx = ys[:, None].expand(20, 20), xs[None, :].expand(20, 20)
        expected = torch.stack([0.2 + 0.6 * yy, 0.1 + 0.8 * xx, 0.3 + 0.3 * yy + 0.3 * xx]).float()
        inner = (slice(None), slice(2, -2), slice(2, -2))
        torch.testing.assert_close(out[inner], expected[inner], atol=5e-3, rtol=0)
        torch.testing.assert_close(out_map[inner], expected[inner], atol=5e-3, rtol=0)
        agree = (out_mask == (expected[0] > 0.5)).float().mean()
        assert agree > 0.9, f"mask agrees on {agree:.2f} of the pixels"


def test_paired_transform_takes_pil_and_masks():
    pil = _pil(40, 56)
    mask = torch.zeros(40, 56, dtype=torch.bool)
    mask[10:30, 20:40] = True
    for t in (paired_train_transform(24, encoding="bcos"), paired_eval_transform(24, 32, encoding="bcos")):
        image, out_mask = t(pil, mask)
        assert image.shape == (6, 24, 24) and out_mask.shape == (24, 24) and out_mask.dtype == torch.bool
        torch.testing.assert_close(image[3:], 1 - image[:3])
        assert isinstance(t(pil), torch.Tensor)  # without maps, only the image
    image, out_mask = paired_eval_transform(24, 24, encoding="none")(pil, mask)
    torch.testing.assert_close(image, eval_transform(24, 24, "none")(pil), atol=2 / 255, rtol=0)  # PIL vs float
    assert math.isclose(out_mask.float().mean().item(), 20 * 20 / (40 * 40), abs_tol=0.05)
