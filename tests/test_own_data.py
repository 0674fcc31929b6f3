"""The README's "Your own data" commands, end to end, on a folder of real photos.

The folder is cut from scikit-image's sample photographs (four classes: astronaut, cat, coffee,
rocket): random crops, flips and brightness changes of each photo. The commands are the README's,
with the configs in configs/own_data/, plus overrides that make the models and images small enough
for a CPU test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2kd_fast.cli import main

skimage_data = pytest.importorskip("skimage.data")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "own_data"
PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
# Small models and images: the configs' own sizes (ResNet-50 / ResNet-18 at 224 px) take minutes here.
SMALL = [
    "student.name=bcos_resnet20_cifar",
    "data.image_size=32",
    "data.eval_resize=36",
    "data.crop_scale_min=0.5",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.warmup_epochs=0",
    "train.epochs=2",
    "train.device=cpu",
]


def _photo_folder(root: Path, per_split: dict[str, int]) -> Path:
    """``root/<split>/<class>/<i>.jpg``: crops of each class's photo, as a user's folder would hold."""
    rng = np.random.default_rng(0)
    for name, photo in PHOTOS.items():
        image = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB")
        w, h = image.size
        for split, count in per_split.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                side = int(min(w, h) * rng.uniform(0.5, 0.9))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = image.crop((x, y, x + side, y + side)).resize((48, 48), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                pixels = np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def _train(config: str, photos: Path, out: Path, *extra: str) -> dict:
    args = ["train", "--config", str(CONFIGS / config), "--no-progress"]
    for value in (f"data.root={photos}", "student.num_classes=4", f"train.out_dir={out}", *SMALL, *extra):
        args += ["--set", value]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_a_teacher_a_kd_and_an_e2kd_student_from_a_folder_of_photos(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos", {"train": 8, "val": 2})
    teacher = _train("own_teacher.yaml", photos, tmp_path / "teacher")
    last = tmp_path / "teacher" / "checkpoints" / "last.pt"
    assert last.is_file() and (teacher["status"], teacher["steps"]) == ("finished", 2 * 4)  # 32 images, batch 8

    students = {}
    for method in ("kd", "e2kd"):
        students[method] = _train(
            f"own_{method}.yaml",
            photos,
            tmp_path / method,
            "teacher.name=bcos_resnet20_cifar",
            "teacher.num_classes=4",
            f"teacher.checkpoint={last}",
        )
    capsys.readouterr()
    metrics = {method: summary["final_eval"] for method, summary in students.items()}
    for method, values in metrics.items():
        assert 0.0 <= values["top1"] <= 1.0 and "agreement" in values, (method, values)
    assert "explanation_cosine" in metrics["e2kd"]

    # The student explains a validation photo with nothing but its checkpoint: model, size, class names.
    out = tmp_path / "explained"
    picture = photos / "val" / "cat" / "0.jpg"
    checkpoint = tmp_path / "e2kd" / "checkpoints" / "last.pt"
    assert main(["explain", str(picture), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert any(f"'{name}'" in printed for name in PHOTOS), printed
    assert (out / "explanations.png").is_file()
