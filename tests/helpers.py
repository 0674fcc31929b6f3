"""Test helpers shared across files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from e2kd_fast.config import load_config


def set_rank_environment(rank: int, world_size: int, port: int, backend: str | None = None) -> None:
    """The variables a launcher gives rank ``rank`` of a one-node group on localhost, and with
    ``backend`` the ``E2KD_BACKEND`` of its ops; ``DS_ACCELERATOR=cpu`` so that DeepSpeed, if used,
    runs on the CPU."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    if backend is not None:
        os.environ["E2KD_BACKEND"] = backend


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


def png_bytes(pixels, bit_depth: int = 8, color_type: int = 2, palette=None) -> bytes:
    """A PNG file written by hand (Pillow cannot write 16-bit colour): filter 0, one IDAT chunk.

    Args:
        pixels: [H, W, C] integer samples, C = 1 (gray, 0; palette index, 3), 2 (gray+alpha, 4),
            3 (RGB, 2) or 4 (RGBA, 6) by ``color_type``.
        bit_depth: 8 or 16 (samples stored big-endian).
        palette: [K, 3] uint8 colours for ``color_type`` 3.
    """
    import struct
    import zlib

    import numpy as np

    pixels = np.asarray(pixels)
    h, w = pixels.shape[:2]
    rows = pixels.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pixel_format_cases(size=(6, 5), seed: int = 0) -> dict:
    """name → (PNG bytes, expected 8-bit RGB [H, W, 3] by hand) for 8- and 16-bit gray, gray+alpha,
    palette, RGB and RGBA images. 16-bit samples are v · 257 of 8-bit ones, so the hand conversion is
    exact whether a decoder rounds v · 255 / 65535 or keeps the high byte; ``gray16_odd`` has arbitrary
    16-bit values and expects round(v · 255 / 65535).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, size, dtype=np.uint8)
    alpha = rng.integers(0, 256, size, dtype=np.uint8)
    rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, size, dtype=np.uint8)
    odd = rng.integers(0, 65536, size, dtype=np.uint16)
    as_rgb = np.repeat(gray[..., None], 3, -1)
    wide = np.uint16(257)
    return {
        "gray8": (png_bytes(gray[..., None], 8, 0), as_rgb),
        "gray16": (png_bytes(gray[..., None] * wide, 16, 0), as_rgb),
        "gray16_odd": (
            png_bytes(odd[..., None], 16, 0),
            np.repeat(((odd.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, -1),
        ),
        "gray_alpha8": (png_bytes(np.stack([gray, alpha], -1), 8, 4), as_rgb),
        "gray_alpha16": (png_bytes(np.stack([gray, alpha], -1) * wide, 16, 4), as_rgb),
        "palette8": (png_bytes(index[..., None], 8, 3, palette), palette[index]),
        "rgb16": (png_bytes(rgb * wide, 16, 2), rgb),
        "rgba8": (png_bytes(np.concatenate([rgb, alpha[..., None]], -1), 8, 6), rgb),
        "rgba16": (png_bytes(np.concatenate([rgb, alpha[..., None]], -1) * wide, 16, 6), rgb),
    }


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
