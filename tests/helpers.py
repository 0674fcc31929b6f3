"""Test helpers shared across files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from e2kd_fast.config import load_config


def randomize_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Gives every norm non-trivial affine weights and running statistics (in place)."""
    with torch.no_grad():
        for m in model.modules():
            weight = getattr(m, "weight", None)
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) or "Norm" in type(m).__name__:
                if isinstance(weight, torch.Tensor):
                    weight.uniform_(0.5, 1.5, generator=generator)
                running_var = getattr(m, "running_var", None)
                if isinstance(running_var, torch.Tensor):
                    running_var.uniform_(0.25, 4.0, generator=generator)
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def official_input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W by the official `bcos` recipe: backward of the target logits in its explanation mode."""
    x = x.detach().clone().requires_grad_(True)
    with model.explanation_mode():
        model(x).gather(1, target[:, None]).sum().backward(inputs=[x])
    return x.grad


def write_image_folder(root, classes: int = 4, per_split: dict | None = None, size=(40, 48), seed: int = 0):
    """Writes small random JPEGs as ``root/<split>/class_<k>/<i>.jpg`` (an ImageNet-style folder)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (per_split or {"train": 3, "val": 1}).items():
        for k in range(classes):
            folder = Path(root) / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return Path(root)


def config_pairs() -> list[tuple[str, str, str]]:
    """(student, teacher, explanation) of every distillation config in configs/ (base files excluded)."""
    pairs = set()
    for path in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):
        if "xdistill" in path.parts or "base" in path.parts:
            continue
        cfg = load_config(path)
        if cfg.teacher.name is not None and cfg.distill.method in ("e2kd", "kd"):
            pairs.add((cfg.student.name, cfg.teacher.name, cfg.distill.explanation))
    return sorted(pairs)
