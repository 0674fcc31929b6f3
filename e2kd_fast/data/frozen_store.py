"""Frozen teachers: teacher logits and explanations computed once per training image, and read back.

Layout of a store folder:
    meta.json     what was stored: teacher, its checkpoint's SHA-256, the dataset's file-list hash,
                  the number of images, map shape and dtype, and how many are complete
    logits.npy    [N, C] float32 teacher logits (the frozen KD targets, one per image)
    maps.npy      [N, *map_shape] float16 explanations of the full image for the teacher's top-1
                  (B-cos: [6, S, S]; GradCAM: [1, S, S]), S = data.image_size

The teacher sees each whole training image resized to S × S. At training time the random crop and
flip of the image are applied to its stored map at the same relative region (a paired transform),
so image and map stay aligned. Precomputation is resumable: it continues after the last completed
chunk, and a store that does not match the dataset or teacher is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

STORE_VERSION = 1


class StoreMismatchError(ValueError):
    """The store was made for another dataset, teacher or configuration."""


def file_list_hash(samples: list[tuple[Path, int]], root: Path | None = None) -> str:
    """SHA-256 of the ordered (relative path, class) list: identifies a dataset's content and order."""
    h = hashlib.sha256()
    for path, target in samples:
        rel = Path(path).relative_to(root) if root is not None else Path(path)
        h.update(f"{rel.as_posix()}\t{target}\n".encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FrozenStore:
    """A store folder opened for reading (``mode="r"``) or for writing."""

    path: Path
    meta: dict[str, Any]
    logits: np.ndarray
    maps: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike, expect: dict[str, Any] | None = None, mode: str = "r") -> FrozenStore:
        """Opens an existing store; ``expect`` holds meta values that must match (else StoreMismatchError)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no frozen-explanation store at {path} (missing meta.json); run e2kd-fast precompute"
            )
        meta = json.loads(meta_path.read_text())
        for key, value in (expect or {}).items():
            if meta.get(key) != value:
                raise StoreMismatchError(
                    f"{path} does not match this run: {key} is {meta.get(key)!r} in the store, {value!r} here. "
                    "Precompute a new store for this dataset and teacher."
                )
        logits = np.load(path / "logits.npy", mmap_mode=mode if mode == "r" else "r+")
        maps = np.load(path / "maps.npy", mmap_mode=mode if mode == "r" else "r+")
        return cls(path, meta, logits, maps)

    @classmethod
    def create(cls, path: str | os.PathLike, meta: dict[str, Any], num_classes: int, map_shape: tuple[int, ...]):
        """Creates an empty store of ``meta["num_images"]`` entries (existing files are replaced)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        n = meta["num_images"]
        logits = np.lib.format.open_memmap(path / "logits.npy", mode="w+", dtype=np.float32, shape=(n, num_classes))
        maps = np.lib.format.open_memmap(path / "maps.npy", mode="w+", dtype=np.float16, shape=(n, *map_shape))
        meta = {**meta, "version": STORE_VERSION, "map_shape": list(map_shape), "completed": 0}
        store = cls(path, meta, logits, maps)
        store.write_meta()
        return store

    @property
    def complete(self) -> bool:
        return self.meta["completed"] >= self.meta["num_images"]

    def write_meta(self) -> None:
        """Atomically rewrites meta.json (after the arrays are flushed, so 'completed' never lies)."""
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        os.replace(tmp, self.path / "meta.json")

    def flush(self, completed: int) -> None:
        self.logits.flush()
        self.maps.flush()
        self.meta["completed"] = completed
        self.write_meta()


class FrozenTeacherDataset(Dataset):
    """Training images with their stored teacher outputs, cropped and flipped together.

    Args:
        base: an `ImageFolderDataset` without transform (items carry the image as a float tensor).
        store: the opened, complete `FrozenStore` for ``base``.
        paired_transform: e.g. ``paired_train_transform(size, scale, encoding)``.

    Items: ``image`` (encoded), ``target``, ``index``, ``teacher_logits`` [C] and ``teacher_map``
    [*map_shape[:-2], size, size]; None for an unreadable image.
    """

    def __init__(self, base: Dataset, store: FrozenStore, paired_transform) -> None:
        if not store.complete:
            raise StoreMismatchError(
                f"{store.path} is incomplete ({store.meta['completed']} of {store.meta['num_images']} images); "
                "run e2kd-fast precompute again to finish it"
            )
        if len(base) != store.meta["num_images"]:
            raise StoreMismatchError(f"{store.path} holds {store.meta['num_images']} images, the dataset {len(base)}")
        self.base, self.store, self.transform = base, store, paired_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.base[index]
        if item is None:
            return None
        stored_map = torch.from_numpy(np.array(self.store.maps[index], dtype=np.float32))
        image, teacher_map = self.transform(item["image"], stored_map)
        return {
            "image": image,
            "target": item["target"],
            "index": index,
            "teacher_logits": torch.from_numpy(np.array(self.store.logits[index], dtype=np.float32)),
            "teacher_map": teacher_map,
        }


def store_identity(cfg, dataset) -> dict[str, Any]:
    """The meta values that tie a store to its dataset, teacher and map resolution."""
    return {
        "teacher": cfg.teacher.name,
        "teacher_checkpoint_sha256": file_sha256(cfg.teacher.checkpoint),
        "explanation": cfg.distill.explanation,
        "num_images": len(dataset),
        "file_list_sha256": file_list_hash(dataset.samples, getattr(dataset, "root", None)),
        "image_size": cfg.data.image_size,
    }


def precompute(cfg, chunk: int = 256, show_progress: bool = True) -> Path:
    """Computes (or finishes) the frozen store ``cfg.teacher.store`` for the config's training split.

    Returns:
        The store's path.
    """
    from tqdm import tqdm

    from e2kd_fast.data.build import full_image_dataset
    from e2kd_fast.engine.trainer import build_teacher, make_loader, resolve_device
    from e2kd_fast.explain import dynamic_weights, gradcam

    if cfg.teacher.store is None or cfg.teacher.name is None:
        raise ValueError("precompute needs teacher.name and teacher.store in the config")
    device = resolve_device(cfg.train.device)
    teacher = build_teacher(cfg).to(device)
    dataset = full_image_dataset(cfg, teacher_family=getattr(teacher, "e2kd_family", "bcos"))
    identity = store_identity(cfg, dataset.base)
    path = Path(cfg.teacher.store)
    if (path / "meta.json").is_file():
        store = FrozenStore.open(path, expect=identity, mode="r+")
    else:
        sample = dataset[0]
        channels = 6 if cfg.distill.explanation == "bcos" else 1
        size = sample["image"].shape[-2:] if sample is not None else (cfg.data.image_size, cfg.data.image_size)
        store = FrozenStore.create(path, identity, _num_classes(teacher, cfg), (channels, *size))
    explain = dynamic_weights if cfg.distill.explanation == "bcos" else gradcam
    start = store.meta["completed"]
    bar = tqdm(total=len(dataset), initial=start, desc="precompute", unit="img", disable=not show_progress)
    while start < len(dataset):
        stop = min(start + chunk, len(dataset))
        loader = make_loader(
            dataset,
            torch.arange(start, stop),
            batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
        )
        for batch in loader:
            if batch["image"].shape[0] == 0:
                continue
            maps, logits = explain(teacher, batch["image"].to(device), None, create_graph=False, return_logits=True)
            idx = batch["index"].numpy()
            store.logits[idx] = logits.detach().float().cpu().numpy()
            store.maps[idx] = maps.detach().cpu().numpy().astype(np.float16)
        store.flush(stop)
        bar.update(stop - start)
        start = stop
    bar.close()
    return path


def _num_classes(teacher, cfg) -> int:
    n = getattr(teacher, "num_classes", None) or getattr(getattr(teacher, "fc", None), "out_features", None)
    return int(n or cfg.teacher.num_classes or 1000)
