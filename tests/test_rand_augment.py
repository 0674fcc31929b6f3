"""RandAugment (data.rand_augment_ops / _magnitude): its place in the training chain, seeding, config errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.config import config_from_dict, config_to_dict, load_config
from e2kd_fast.data import dali
from e2kd_fast.data.build import build_datasets
from e2kd_fast.data.transforms import train_transform
from e2kd_fast.nn import AddInverse
from tests.helpers import write_image_folder

VIT = ("e2kd", "kd")


def _tiny(config: str, root) -> dict:
    """A paper config pointed at a 4-class folder (no held-out draw, 4 classes)."""
    d = config_to_dict(load_config(f"configs/{config}.yaml"))
    d["data"].update(root=str(root), val_per_class=None, num_workers=0)
    d["student"]["num_classes"] = d["teacher"]["num_classes"] = 4
    d["teacher"]["checkpoint"] = None
    return d


def _pil(seed: int = 0, h: int = 40, w: int = 48) -> Image.Image:
    pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("method", VIT)
def test_vit_configs_apply_rand_augment_after_crop_and_flip_before_the_bcos_encoding(tmp_path, method):
    root = write_image_folder(tmp_path / "data", per_split={"train": 1, "val": 1})
    bundle = build_datasets(config_from_dict(_tiny(f"imagenet_bcos_vit_ti_from_d169_{method}", root)))
    names = [type(t).__name__ for t in bundle.train.transform.transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandAugment",
        "ToImage",
        "ToDtype",
        "ToPureTensor",
        "AddInverse",
    ]
    augment = bundle.train.transform.transforms[2]
    assert (augment.num_ops, augment.magnitude, augment.interpolation) == (2, 10, InterpolationMode.BILINEAR)
    assert "RandAugment" not in [type(t).__name__ for t in bundle.val.transform.transforms]


@pytest.mark.parametrize(
    "config",
    [
        "imagenet_bcos_vit_ti_from_d169_e2kd_frozen",
        "imagenet_bcos_r18_from_d169_e2kd",
        "imagenet_std_r18_from_r34_gradcam_kd",
    ],
)
def test_other_paper_configs_have_no_rand_augment(config):
    assert load_config(f"configs/{config}.yaml").data.rand_augment_ops == 0


def test_rand_augment_is_seeded_and_is_the_by_hand_chain():
    """Under one torch seed the preset equals crop → flip → RandAugment → [x, 1 − x] done by hand."""
    image = _pil()
    tf = train_transform(16, encoding="bcos", rand_augment_ops=2, rand_augment_magnitude=10)
    crop, flip, augment = tf.transforms[:3]
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(tf(image))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    torch.manual_seed(3)
    by_hand = RandAugment(2, 10, interpolation=InterpolationMode.BILINEAR)  # the official class and options
    x = by_hand(flip(crop(image)))
    x = AddInverse(dim=-3)(TF.to_dtype(TF.pil_to_tensor(x), torch.float32, scale=True))
    assert torch.equal(outputs[0], x)
    assert outputs[0].shape == (6, 16, 16) and torch.equal(outputs[0][3:], 1 - outputs[0][:3])
    torch.manual_seed(3)
    plain = train_transform(16, encoding="bcos")(image)  # without RandAugment: another image, same crop draw
    assert not torch.equal(plain, outputs[0])


def test_rand_augment_config_errors(tmp_path):
    base = _tiny("imagenet_bcos_vit_ti_from_d169_e2kd", tmp_path)
    for key, value, message in (
        ("rand_augment_ops", -1, "data.rand_augment_ops.*>= 0"),
        ("rand_augment_magnitude", 31, "data.rand_augment_magnitude.*0..30"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_dict({**base, "data": {**base["data"], key: value}})
    frozen = {**base, "teacher": {**base["teacher"], "mode": "frozen", "store": str(tmp_path / "store")}}
    with pytest.raises(ValueError, match="teacher.mode 'frozen'.*data.rand_augment_ops"):
        config_from_dict(frozen)
    with pytest.raises(ValueError, match="rand_augment_magnitude"):
        train_transform(16, rand_augment_ops=1, rand_augment_magnitude=40)


def test_dali_training_loader_falls_back_to_torchvision_with_rand_augment(tmp_path, monkeypatch, capsys):
    root = write_image_folder(tmp_path / "data", per_split={"train": 1, "val": 1})
    d = _tiny("imagenet_bcos_vit_ti_from_d169_e2kd", root)
    d["data"]["loader"] = "dali"
    cfg = config_from_dict(d)
    bundle = build_datasets(cfg)
    monkeypatch.setattr(dali, "resolve_loader", lambda kind, folder=True: "dali")  # as if DALI were installed
    common = dict(batch_size=2, shuffle=True, epoch=0, start=0, seed=0, drop_last=False, device=torch.device("cpu"))
    assert dali.maybe_dali_loader(cfg, bundle.train, bundle.train_indices, train=True, **common) is None
    assert "data.loader=dali with data.rand_augment_ops=2" in capsys.readouterr().err
