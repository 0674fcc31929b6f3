"""A synthetic Waterbirds-like task with ground-truth foreground masks: the paper's Waterbirds setting in miniature.

Each image shows one "bird" (a class-specific colour and shape, with jitter) at a random position and
size (10–25 % of the image) on a "place" background (a hue family with a place-specific texture and
noise). Class k's own place is place k. The background alone is an easy cue, so a student trained on
the biased split learns the shortcut, while the foreground decides the class:

- ``train_biased``, ``val``, ``test_id``: place = class with probability ``bias``, otherwise one of the
  other places, uniformly (the Waterbirds training correlation).
- ``train_unbiased``: place independent of class (uniform), for a teacher that ignores the background.
- ``test_ood``: place = (class + 1) mod C, always: the background points to another class (for two
  classes, the reversed correlation). A model that follows the background gets 0 % here.

On disk (``generate_waterbirds_like``): ``root/<split>/<class>/<k:05d>.png`` (RGB),
``root/masks/<split>/<class>/<k:05d>.png`` (L, 0/255), ``root/metadata.csv`` (place and foreground
fraction of every image) and ``root/info.json`` (parameters, classes, counts), written last.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from e2kd_fast._files import ordinary_dir_mode
from e2kd_fast.data.synthetic import shape_mask

WATERBIRDS_CLASSES = ("landbird", "waterbird", "desertbird", "nightbird")
WATERBIRDS_PLACES = ("forest", "water", "desert", "night")
WATERBIRDS_SPLITS = ("train_biased", "train_unbiased", "val", "test_id", "test_ood")
DEFAULT_PER_SPLIT = {"train_biased": 800, "train_unbiased": 800, "val": 200, "test_id": 200, "test_ood": 200}

# Bright, saturated birds; darker, duller places: the two colour families never overlap.
_BIRD_COLOURS = ((0.95, 0.15, 0.10), (0.98, 0.88, 0.12), (0.90, 0.15, 0.85), (0.96, 0.96, 0.96))
_BIRD_SHAPES = (1, 2, 0, 3)  # `shape_mask` kinds: disk, triangle, square, cross
_SHAPE_NAMES = ("square", "disk", "triangle", "cross")
_SHAPE_AREA = (4.0, math.pi, 2.0, 20 / 9)  # area / r² of each shape kind, to hit a target area fraction
_PLACE_COLOURS = ((0.16, 0.45, 0.18), (0.14, 0.32, 0.70), (0.62, 0.48, 0.30), (0.22, 0.22, 0.30))
_PLACE_ANGLES = (math.pi / 2, 0.0, math.pi / 4, 3 * math.pi / 4)  # direction of each place's texture waves
_VERSION = 1

_RULES = {
    "train_biased": "biased",
    "val": "biased",
    "test_id": "biased",
    "train_unbiased": "independent",
    "test_ood": "shifted",
}
_RULE_TEXT = {
    "biased": "place = class with probability bias, else a uniformly drawn other place",
    "independent": "place uniform over all places, independent of class",
    "shifted": "place = (class + 1) mod num_classes",
}


def _draw_places(labels: Tensor, rule: str, num_classes: int, bias: float, gen: torch.Generator) -> Tensor:
    n = len(labels)
    if rule == "shifted":
        return (labels + 1) % num_classes
    if rule == "independent":
        return torch.randint(num_classes, (n,), generator=gen)
    if rule != "biased":
        raise ValueError(f"unknown place rule {rule!r}; allowed: {', '.join(_RULE_TEXT)}")
    other = (labels + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes  # uniform over the rest
    return torch.where(torch.rand(n, generator=gen) < bias, labels, other)


def _render(
    labels: Tensor,
    places: Tensor,
    size: int,
    fg_fraction: tuple[float, float],
    fg_colour_mix: float,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Images [N, 3, S, S] in [0, 1] and masks [N, S, S] (bool) for the given classes and places."""
    n = len(labels)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = coords[:, None], coords[None, :]
    # Background: the place's colour with per-image jitter, place-oriented waves and pixel noise.
    base = torch.tensor(_PLACE_COLOURS)[places] + 0.04 * torch.randn(n, 3, generator=gen)
    angle = torch.tensor(_PLACE_ANGLES)[places] + 0.2 * torch.randn(n, generator=gen)
    freq = 2 * math.pi * (2 + 2 * torch.rand(n, generator=gen))
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    along = torch.cos(angle)[:, None, None] * yy + torch.sin(angle)[:, None, None] * xx
    waves = 0.07 * torch.sin(freq[:, None, None] * along + phase[:, None, None])  # [N, S, S]
    background = base[:, :, None, None] + waves[:, None] + 0.04 * torch.randn(n, 3, size, size, generator=gen)
    # Foreground: the class's colour and shape, covering fg_fraction of the image, fully inside it.
    fraction = fg_fraction[0] + (fg_fraction[1] - fg_fraction[0]) * torch.rand(n, generator=gen)
    kinds = torch.tensor(_BIRD_SHAPES)[labels]
    r = size * torch.sqrt(fraction / torch.tensor(_SHAPE_AREA)[kinds])
    cy = r + (size - 1 - 2 * r) * torch.rand(n, generator=gen)
    cx = r + (size - 1 - 2 * r) * torch.rand(n, generator=gen)
    random_colour = torch.rand(n, 3, generator=gen)
    random_colour = random_colour / random_colour.amax(1, keepdim=True)  # saturated, as the class colours
    colour = (1 - fg_colour_mix) * torch.tensor(_BIRD_COLOURS)[labels] + fg_colour_mix * random_colour
    colour = colour + 0.04 * torch.randn(n, 3, generator=gen)
    foreground = colour[:, :, None, None] + 0.02 * torch.randn(n, 3, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for kind in range(len(_SHAPE_AREA)):
        idx = (kinds == kind).nonzero().flatten()
        if len(idx):
            masks[idx] = shape_mask(kind, size, cy[idx], cx[idx], r[idx])
    images = torch.where(masks[:, None], foreground, background).clamp_(0, 1)
    return images, masks


def make_waterbirds_like_split(
    num_images: int,
    split: str = "train_biased",
    *,
    num_classes: int = 2,
    image_size: int = 32,
    bias: float = 0.95,
    seed: int = 0,
    fg_fraction: tuple[float, float] = (0.10, 0.25),
    fg_colour_mix: float = 0.0,
) -> dict[str, Tensor]:
    """Generates one split in memory, deterministically from (split, seed) and the parameters.

    Args:
        num_images: images in the split (classes are balanced up to rounding).
        split: one of `WATERBIRDS_SPLITS`; decides how places follow classes.
        num_classes: 2..4 (`WATERBIRDS_CLASSES[:num_classes]`, with as many places).
        image_size: image side in pixels (≥ 16).
        bias: P(place = class) in the biased splits.
        seed: random seed; each split draws from its own generator.
        fg_fraction: range of the bird's area as a fraction of the image (uniform).
        fg_colour_mix: 0 gives every bird its class's colour (with a little jitter); m in (0, 1] mixes in
            a random colour with weight m, which makes the foreground cue harder (1: colour carries no
            class information, only the shape does).

    Returns:
        ``images`` [N, 3, S, S] float32 in [0, 1] (exactly what is written as 8-bit PNG, i.e. multiples
        of 1/255), ``targets`` [N] int64, ``places`` [N] int64 (index into `WATERBIRDS_PLACES`),
        ``masks`` [N, S, S] bool (the bird's pixels).
    """
    _check_params(num_classes, image_size, bias, fg_fraction, fg_colour_mix)
    if split not in _RULES:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(WATERBIRDS_SPLITS)}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (WATERBIRDS_SPLITS.index(split) + 1))
    targets = (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=gen)]
    places = _draw_places(targets, _RULES[split], num_classes, bias, gen)
    chunks_img, chunks_mask = [], []
    for start in range(0, num_images, 512):  # bounded memory at large image sizes
        img, mask = _render(
            targets[start : start + 512], places[start : start + 512], image_size, fg_fraction, fg_colour_mix, gen
        )
        chunks_img.append(img.mul_(255).round_().div_(255))
        chunks_mask.append(mask)
    empty = (torch.zeros(0, 3, image_size, image_size), torch.zeros(0, image_size, image_size, dtype=torch.bool))
    images = torch.cat(chunks_img) if chunks_img else empty[0]
    masks = torch.cat(chunks_mask) if chunks_mask else empty[1]
    return {"images": images, "targets": targets, "places": places, "masks": masks}


def _check_params(
    num_classes: int, image_size: int, bias: float, fg_fraction: tuple[float, float], fg_colour_mix: float
) -> None:
    if not 2 <= num_classes <= len(WATERBIRDS_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(WATERBIRDS_CLASSES)}, got {num_classes}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be in [0, 1], got {bias}")
    if not 0.0 < fg_fraction[0] <= fg_fraction[1] <= 0.25:
        raise ValueError(f"fg_fraction must be a range within (0, 0.25] (the bird must fit), got {fg_fraction}")
    if not 0.0 <= fg_colour_mix <= 1.0:
        raise ValueError(f"fg_colour_mix must be in [0, 1], got {fg_colour_mix}")


def _expected_info(
    num_classes: int,
    image_size: int,
    per_split: dict[str, int],
    bias: float,
    seed: int,
    fg_fraction: tuple[float, float],
    fg_colour_mix: float,
) -> dict:
    classes = list(WATERBIRDS_CLASSES[:num_classes])
    return {
        "generator": "e2kd_fast.data.waterbirds_synthetic",
        "version": _VERSION,
        "params": {
            "num_classes": num_classes,
            "image_size": image_size,
            "per_split": dict(per_split),
            "bias": bias,
            "seed": seed,
            "fg_fraction": [float(fg_fraction[0]), float(fg_fraction[1])],
            "fg_colour_mix": float(fg_colour_mix),
        },
        "classes": classes,
        "places": list(WATERBIRDS_PLACES[:num_classes]),
        "foreground": {
            c: {"colour": list(_BIRD_COLOURS[i]), "shape": _SHAPE_NAMES[_BIRD_SHAPES[i]]} for i, c in enumerate(classes)
        },
        "place_rules": {s: _RULE_TEXT[_RULES[s]] for s in per_split},
        "layout": {
            "images": "<split>/<class>/<k:05d>.png",
            "masks": "masks/<split>/<class>/<k:05d>.png",
            "metadata": "metadata.csv",
        },
    }


def _count_files(root: Path, info: dict) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in info["params"]["per_split"]:
        counts[split] = {}
        for c in info["classes"]:
            folder = root / split / c
            counts[split][c] = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
    return counts


def generate_waterbirds_like(
    root: str | os.PathLike,
    *,
    num_classes: int = 2,
    image_size: int = 32,
    per_split: dict[str, int] | None = None,
    bias: float = 0.95,
    seed: int = 0,
    fg_fraction: tuple[float, float] = (0.10, 0.25),
    fg_colour_mix: float = 0.0,
) -> dict[str, Any]:
    """Writes the Waterbirds-like data set to ``root`` (see the module docstring for the layout).

    The data set is built in a temporary sibling folder and renamed into place, so ``root`` is either
    complete or absent, also when several processes generate it at once. Re-running with the same
    parameters into a complete folder does nothing.

    Args:
        root: output folder (must not exist, or be empty, or hold this very data set).
        num_classes: 2..4.
        image_size: image side in pixels (≥ 16).
        per_split: images per split; keys from `WATERBIRDS_SPLITS`, each ≥ num_classes. Default
            `DEFAULT_PER_SPLIT`.
        bias: P(place = class) in ``train_biased``, ``val`` and ``test_id``.
        seed: random seed.
        fg_fraction, fg_colour_mix: see `make_waterbirds_like_split`.

    Returns:
        The contents of ``root/info.json``: the parameters, classes, places, foreground colours and
        shapes, place rules, per-split ``counts`` {split: {class: n}} and ``group_counts``
        {split: {"class/place": n}}.

    Raises:
        ValueError: for bad parameters, or if ``root`` holds something else (other parameters, no
            info.json, or missing images).
    """
    root = Path(root)
    per_split = dict(DEFAULT_PER_SPLIT if per_split is None else per_split)
    _check_params(num_classes, image_size, bias, fg_fraction, fg_colour_mix)
    unknown = sorted(set(per_split) - set(WATERBIRDS_SPLITS))
    if unknown:
        raise ValueError(f"unknown splits {unknown}; allowed: {', '.join(WATERBIRDS_SPLITS)}")
    for split, n in per_split.items():
        if n < num_classes:
            raise ValueError(f"split {split!r} needs at least one image per class ({num_classes}), got {n}")
    per_split = {s: int(per_split[s]) for s in WATERBIRDS_SPLITS if s in per_split}  # canonical order
    expected = _expected_info(num_classes, image_size, per_split, bias, seed, fg_fraction, fg_colour_mix)

    existing = _existing(root, expected)
    if existing is not None:
        return existing

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(ordinary_dir_mode())  # mkdtemp's 0700 would hide the data from the user's group
    try:
        info = _write(tmp, expected)
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            tmp.rename(root)
        except OSError:
            # Another process finished first: accept its copy if it is this data set.
            existing = _existing(root, expected)
            if existing is None:
                raise
            return existing
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _existing(root: Path, expected: dict) -> dict | None:
    """The info of a complete copy at ``root``, None if ``root`` is absent or empty; raises otherwise."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    info_path = root / "info.json"
    if not info_path.is_file():
        raise ValueError(f"{root} exists and is not empty, but has no info.json: not a Waterbirds-like data set")
    info = json.loads(info_path.read_text())
    core = {k: info.get(k) for k in expected}
    if core != expected:
        raise ValueError(
            f"{root} holds a Waterbirds-like data set with other parameters: {info.get('params')} "
            f"(version {info.get('version')}), requested {expected['params']} (version {expected['version']}); "
            "use another folder or delete it"
        )
    found = _count_files(root, info)
    if found != info["counts"]:
        raise ValueError(f"{root} is incomplete or modified: found {found} images, info.json says {info['counts']}")
    return info


def _write(folder: Path, expected: dict) -> dict:
    params = expected["params"]
    classes = expected["classes"]
    info = dict(expected)
    info["counts"], info["group_counts"] = {}, {}
    rows = []
    for split, n in params["per_split"].items():
        data = make_waterbirds_like_split(
            n,
            split,
            num_classes=params["num_classes"],
            image_size=params["image_size"],
            bias=params["bias"],
            seed=params["seed"],
            fg_fraction=tuple(params["fg_fraction"]),
            fg_colour_mix=params["fg_colour_mix"],
        )
        for c in classes:
            (folder / split / c).mkdir(parents=True)
            (folder / "masks" / split / c).mkdir(parents=True)
        pixels = data["images"].mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = (data["masks"].to(torch.uint8) * 255).numpy()
        fractions = data["masks"].float().mean((1, 2)).tolist()
        targets, places = data["targets"].tolist(), data["places"].tolist()
        for k in range(n):
            rel = f"{split}/{classes[targets[k]]}/{k:05d}.png"
            Image.fromarray(pixels[k]).save(folder / rel)
            Image.fromarray(masks[k]).save(folder / "masks" / rel)
            rows.append((split, rel, targets[k], places[k], f"{fractions[k]:.4f}"))
        info["counts"][split] = {c: targets.count(i) for i, c in enumerate(classes)}
        groups: dict[str, int] = {}
        for t, p in sorted(zip(targets, places, strict=True)):
            key = f"{classes[t]}/{expected['places'][p]}"
            groups[key] = groups.get(key, 0) + 1
        info["group_counts"][split] = groups
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("split", "path", "target", "place", "fg_fraction"))
        writer.writerows(rows)
    (folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks the copy complete
    return info


def waterbirds_places(dataset: Any) -> Tensor:
    """Place index of every image of an `ImageFolderDataset` over a generated Waterbirds-like folder.

    With the targets this gives the groups (class, place) for worst-group and out-of-distribution
    accuracy.

    Args:
        dataset: an `ImageFolderDataset` whose ``root`` was written by `generate_waterbirds_like`.

    Returns:
        [N] int64 place indices (into `WATERBIRDS_PLACES`), in dataset order.
    """
    root = Path(dataset.root)
    with open(root / "metadata.csv", newline="") as f:
        place_of = {row["path"]: int(row["place"]) for row in csv.DictReader(f)}
    try:
        return torch.tensor([place_of[p.relative_to(root).as_posix()] for p, _ in dataset.samples], dtype=torch.long)
    except KeyError as exc:
        raise ValueError(f"image {exc.args[0]} is not listed in {root / 'metadata.csv'}") from exc
