"""NVIDIA DALI input pipelines: decode, crop, flip and encode on the GPU (or with CPU operators).

One pipeline definition serves both machines: on CUDA the JPEGs are decoded by the ``mixed`` (nvJPEG,
hardware where present) decoder and every later operator runs on the GPU; without CUDA the pipeline
is built with ``device_id=None`` and CPU operators only, which is how the tests run it (DALI's
``Pipeline``: ``device_id=None`` uses neither the GPU nor the CUDA runtime; ``device_id=0`` or ``-1``
still initialises CUDA and fails on a machine without it).

Where the samples come from. DALI's own ``fn.readers.file`` shards a file list into contiguous,
fixed ranges [⌊N·i/S⌋, ⌊N·(i+1)/S⌋) whose sizes differ by one when S does not divide N; it shuffles
with a buffer of ``initial_fill`` samples (not a full permutation, which matters for class-sorted
ImageNet folders); and it fills the last batch of a shard either with the next samples of the list
(``pad_last_batch=False``) or with copies of the shard's last sample (``pad_last_batch=True``). The
PyTorch iterator trims that filling only with ``reader_name`` + ``LastBatchPolicy.PARTIAL``, and then
the ranks see different numbers of batches (measured with DALI 2.4.0: 10 files, 3 shards → 3, 3 and
4 samples; 1, 1 and 2 batches of 3 incl. one empty batch on two ranks). We therefore do not use the
reader: a Python ``external_source`` feeds the pipeline from our own epoch plan (`epoch_plan`), the
same permutation and per-sample seeds as the torchvision path (`e2kd_fast.data.sampling`):

- the epoch order is a permutation of all images drawn from (seed, epoch); rank r of W takes the
  positions p ≡ r (mod W), so the ranks' samples are disjoint and their union is the epoch;
- training drops the incomplete global batch at the end (every rank then runs the same number of
  equal batches, as DDP needs); evaluation keeps every image (rank batch counts may differ by one);
- crop windows and flips are drawn in Python from each sample's seed (the same draw as
  `PairedRandomResizedCropFlip`), so a run resumed mid-epoch sees exactly the same crops, and the
  pipeline itself has no random operator (its output does not depend on the thread count).

The crop is applied as a relative region of interest of ``fn.resize`` (crop and resize in one
resampling, like `resized_crop_relative`), and the same region, flip and resampling are applied to the
frozen teacher map read from the store, at whatever resolution it was stored: image and map stay
aligned pixel for pixel.

Unreadable files. The source reads each file's header (PIL, no decode) to get its size and pixel
format; a file whose header cannot be read, or whose format the PIL path refuses (`check_image_mode`),
is replaced by a placeholder and counted in the batch's ``skipped``. A file that fails only in the
decoder (truncated data) stops the DALI pipeline with an error; the loader then checks that batch's
files with a full decode (`read_image`), marks the bad ones, rebuilds the pipeline at that batch and
goes on. Either way the batch shrinks by the skipped images, as `collate_skipping` does, and a
warning names each skipped file and why (the first `NAMED_SKIPS`; then one warning gives the count);
``DaliLoader.skipped_files`` lists them all.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from e2kd_fast.data.bundle import input_encoding
from e2kd_fast.data.folders import ImageFolderDataset, check_image_mode, read_image
from e2kd_fast.data.frozen_store import FrozenTeacherDataset
from e2kd_fast.data.loaders import resolve_num_workers
from e2kd_fast.data.sampling import mix_seed
from e2kd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PairedRandomResizedCropFlip, center_crop_box

LOADERS = ("dali", "torchvision", "auto")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NOTICES: set[str] = set()
NAMED_SKIPS = 20  # unreadable files a loader names one by one; beyond that, one warning gives the count


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports (checked when asked, never at import time of this module)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def notice(line: str) -> None:
    """Prints a one-line notice once per process."""
    if line not in _NOTICES:
        _NOTICES.add(line)
        print(f"[e2kd-fast data] {line}", file=sys.stderr)


def resolve_loader(kind: str, *, folder: bool = True) -> str:
    """``data.loader`` → ``"dali"`` or ``"torchvision"``.

    ``auto`` is DALI when it imports and the data is an image folder, else torchvision (CPU operators
    serve a machine without CUDA). ``dali`` without DALI installed, or for data that is not an image
    folder, falls back to torchvision with a one-line notice.
    """
    if kind not in LOADERS:
        raise ValueError(f"data.loader must be one of {', '.join(LOADERS)}, got {kind!r}")
    if kind == "torchvision":
        return kind
    if not dali_available():
        notice(f"data.loader={kind}: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); using torchvision")
        return "torchvision"
    if not folder:
        if kind == "dali":
            notice("data.loader=dali reads image folders only; this dataset is not one, using torchvision")
        return "torchvision"
    return "dali"


# ---------------------------------------------------------------------------------------------------------------------
# The epoch plan


def epoch_plan(
    indices: Tensor | Sequence[int],
    *,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[list[tuple[int, int]]]:
    """The batches of (dataset index, sample seed) that one rank loads in one epoch.

    The order and seeds are those of `EpochSampler` for (seed, epoch). Rank ``rank`` takes the epoch
    positions p ≡ rank (mod world_size) from global position ``start`` on (``start``: images of the
    epoch all ranks together have consumed; a multiple of the global batch when resuming). With
    ``drop_last`` the epoch is first cut to a multiple of batch_size × world_size.

    Args:
        indices: [N] dataset indices to draw from.
        batch_size: per-rank batch.

    Returns:
        Batches (lists of pairs) of this rank, the last one possibly shorter (never without drop_last).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    indices = torch.as_tensor(indices, dtype=torch.long)
    n = len(indices)
    # Same draws, in the same order, as EpochSampler.__iter__.
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    stop = n // (batch_size * world_size) * (batch_size * world_size) if drop_last else n
    positions = torch.arange(start + (rank - start) % world_size, stop, world_size)
    pairs = list(zip(indices[order[positions]].tolist(), seeds[positions].tolist(), strict=True))
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# The Python source


@dataclass(frozen=True)
class Geometry:
    """Crop settings of a pipeline.

    Attributes:
        train: RandomResizedCrop(size, scale) + flip (per-sample seeds) if True, else
            Resize(shorter side → resize) + CenterCrop(size).
    """

    size: int
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    resize: int = 256

    def roi(self, height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Relative ROI start [2] (y, x), end [2] and the flip for an image of ``height`` × ``width``."""
        if self.train:  # the torchvision path's draw: its paired crop under the sample's seed
            gen = torch.Generator().manual_seed(seed)
            (top, left, h, w), flip = PairedRandomResizedCropFlip(self.size, self.scale, generator=gen).get_params(
                height, width
            )
        else:
            top, left, h, w = center_crop_box(height, width, self.size, self.resize)
            flip = False
        return np.array([top, left], np.float32), np.array([top + h, left + w], np.float32), flip


def _placeholder_jpeg() -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8)


class _Source:
    """Feeds one rank's epoch plan to ``fn.external_source`` (batch mode), from batch ``first`` on.

    Per sample: encoded bytes, meta int64 [3] = (target, dataset index, valid), ROI start and end
    float32 [2], mirror int32 [], and with a store the raw map [C, h, w] and the teacher logits float32
    [K] (and for int8 maps the scale float32 []).
    """

    def __init__(self, loader: DaliLoader, first: int) -> None:
        self.loader, self.first, self.next_batch = loader, first, first
        self.placeholder = _placeholder_jpeg()

    def __iter__(self) -> _Source:
        self.next_batch = self.first
        return self

    def __next__(self) -> tuple[list[np.ndarray], ...]:
        ld = self.loader
        if self.next_batch >= len(ld.batches):
            raise StopIteration
        batch = ld.batches[self.next_batch]
        self.next_batch += 1
        cols: list[list[np.ndarray]] = [[] for _ in range(5 + _store_columns(ld.store))]
        for index, seed in batch:
            path, target = ld.samples[index]
            if path in ld.bad_files:
                data = "unreadable"
            else:  # a frozen store first: a file changed since precompute raises, one unreadable then is skipped
                data = (ld.store.check_image(index, path) if ld.store is not None else None) or _read_checked(path)
            if isinstance(data, str):
                ld.mark_bad(path, data)
                enc, size, valid = self.placeholder, (8, 8), 0
            else:
                enc, size, valid = data
            start, end, flip = ld.geometry.roi(size[0], size[1], seed)
            row = [enc, np.array([target, index, valid], np.int64), start, end, np.array(int(flip), np.int32)]
            if ld.store is not None:
                raw, scale, logits = ld.store.read_raw(index)
                row += [np.ascontiguousarray(raw), logits] + ([np.array(scale, np.float32)] * (len(cols) == 8))
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        return tuple(cols)


def _store_columns(store) -> int:
    """Source columns a store adds: raw map and logits, plus the scale for int8 maps."""
    return 0 if store is None else (3 if store.map_dtype == "int8" else 2)


def _read_checked(path: Path) -> tuple[np.ndarray, tuple[int, int], int] | str:
    """(bytes, (height, width), 1) of an image file whose header parses, else why it cannot be used.

    The pixel format is checked as `read_image` checks it (`check_image_mode`), so both loaders skip
    the same files; DALI's decoder itself reads every accepted format to `read_image`'s values.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
            check_image_mode(im.mode, path, im.format)
    except Exception as exc:  # PIL raises several types depending on the damage
        return f"{type(exc).__name__}: {exc}"
    if width < 1 or height < 1:
        return f"the header gives an empty image ({width} × {height})"
    return np.frombuffer(data, np.uint8), (height, width), 1


def _decode_error(path: Path) -> str | None:
    """Why `read_image` cannot decode the whole file (truncated data included), or None if it can."""
    try:
        read_image(path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline and the PyTorch-facing loader


def _build_pipeline(ld: DaliLoader, source: _Source):
    from nvidia.dali import fn, pipeline_def, types

    gpu = ld.device_id is not None
    store = ld.store
    size = [ld.geometry.size, ld.geometry.size]  # (H, W): resize takes sizes in the layout's order
    if ld.encoding == "standard":
        mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
    else:  # bcos and none: [0, 1]
        mean, std = [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]

    @pipeline_def(
        batch_size=ld.batch_size,
        num_threads=ld.num_threads,
        device_id=ld.device_id,  # None: no CUDA at all, CPU operators only
        seed=0,  # no random operator is used; all draws come from the plan's per-sample seeds
        prefetch_queue_depth=ld.prefetch,
        exec_dynamic=True,
    )
    def pipe():
        layouts = ["", "", "", "", ""] + ["CHW", "", ""][: _store_columns(store)]
        outs = fn.external_source(source=source, num_outputs=len(layouts), batch=True, layout=layouts)
        encoded, meta, roi_start, roi_end, mirror = outs[:5]
        image = fn.decoders.image(
            encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
        )
        roi = {"roi_start": roi_start, "roi_end": roi_end, "roi_relative": True}
        image = fn.resize(image, size=size, antialias=True, dtype=types.FLOAT, **roi)
        image = fn.crop_mirror_normalize(
            image, mirror=mirror, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW"
        )
        if ld.encoding == "bcos":
            image = fn.cat(image, 1.0 - image, axis=0)  # [x, 1 − x]: 6 channels
        if ld.dtype == torch.float16:
            image = fn.cast(image, dtype=types.FLOAT16)
        if store is None:
            return image, meta
        raw, logits = outs[5:7]
        if gpu:
            raw = raw.gpu()
        if store.map_dtype == "bf16":  # raw bfloat16 bits → float32: shift into the high half
            bits = fn.cast(raw, dtype=types.UINT32) * types.Constant(65536, dtype=types.UINT32)
            teacher_map = fn.reinterpret(bits, dtype=types.FLOAT)
        else:
            teacher_map = fn.cast(raw, dtype=types.FLOAT)
            if store.map_dtype == "int8":
                teacher_map = teacher_map * (outs[7].gpu() if gpu else outs[7])
        teacher_map = fn.resize(teacher_map, size=size, antialias=True, dtype=types.FLOAT, **roi)
        teacher_map = fn.flip(teacher_map, horizontal=mirror)
        return image, meta, teacher_map, logits

    pipeline = pipe()
    pipeline.build()
    return pipeline


class DaliLoader:
    """Batches of one rank's epoch from a DALI pipeline, as dicts like the torchvision loader's.

    Items: ``image`` [B, 6 or 3, S, S] (``dtype``; CUDA tensors on a GPU pipeline), ``target`` int64
    [B], ``index`` int64 [B], ``skipped`` int (unreadable images left out of this batch); with a store
    also ``teacher_logits`` float32 [B, K] and ``teacher_map`` float32 [B, C, S, S], cropped and
    flipped with the image. Iterating twice replays the same epoch.

    Args:
        samples: (path, class id) of every image of the dataset (``ImageFolderDataset.samples``).
        indices: the dataset indices to load (a split or subset).
        batch_size: per-rank batch.
        geometry: crop settings (`Geometry`).
        encoding: ``"bcos"`` ([x, 1 − x]), ``"standard"`` (ImageNet mean/std) or ``"none"`` ([0, 1] RGB).
        seed, epoch, shuffle, start, rank, world_size, drop_last: see `epoch_plan`.
        store: an opened, complete `FrozenStore` for ``samples`` (frozen teacher), or None.
        device_id: CUDA device (``mixed`` decoder, GPU operators), or None for CPU operators only.
        num_threads: DALI worker threads.
        dtype: ``torch.float32``, ``float16`` (cast in the pipeline) or ``bfloat16`` (cast after it:
            DALI has no bfloat16 type).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | os.PathLike, int]],
        indices: Tensor | Sequence[int],
        *,
        batch_size: int,
        geometry: Geometry,
        encoding: str = "bcos",
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = False,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        store=None,
        device_id: int | None = None,
        num_threads: int = 2,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 2,
    ) -> None:
        if encoding not in ("bcos", "standard", "none"):
            raise ValueError(f"unknown encoding {encoding!r}; allowed: bcos, standard, none")
        if dtype not in OUTPUT_DTYPES.values():
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        if store is not None:
            store.require_complete()
            if store.num_images != len(samples):
                raise ValueError(f"{store.path} holds {store.num_images} images, the dataset {len(samples)}")
        self.samples = [(Path(p), int(t)) for p, t in samples]
        self.batch_size, self.geometry, self.encoding = batch_size, geometry, encoding
        self.store, self.device_id, self.dtype = store, device_id, dtype
        self.num_threads, self.prefetch = max(1, num_threads), prefetch
        self.batches = epoch_plan(
            indices,
            batch_size=batch_size,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            start=start,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        self.bad_files: set[Path] = set()
        self.skipped_files: list[Path] = []  # every unreadable file met, in order

    def mark_bad(self, path: Path, reason: str = "unreadable") -> None:
        """Records a file to skip; the first `NAMED_SKIPS` of this loader are named in a warning."""
        if path not in self.bad_files:
            self.bad_files.add(path)
            self.skipped_files.append(path)
            if len(self.skipped_files) <= NAMED_SKIPS:
                warnings.warn(f"skipping unreadable image file {path}: {reason}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.batches)

    def _iterator(self, first: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        names = ["image", "meta"] + (["teacher_map", "teacher_logits"] if self.store is not None else [])
        pipeline = _build_pipeline(self, _Source(self, first))
        return DALIGenericIterator(pipeline, names, auto_reset=False, prepare_first_batch=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = 0
        while position < len(self.batches):
            iterator = self._iterator(position)
            try:
                for out in iterator:
                    yield self._to_batch(out[0])
                    position += 1
            except RuntimeError as err:
                if position >= len(self.batches):
                    raise
                # The decoder failed on a file whose header was fine: find it, skip it, restart here. The
                # error may surface while an earlier batch is collected (prefetch), so look ahead too.
                window = self.batches[position : position + self.prefetch + 2]
                paths = [self.samples[i][0] for batch in window for i, _ in batch]
                bad = {p: why for p in paths if p not in self.bad_files and (why := _decode_error(p)) is not None}
                if not bad:
                    raise RuntimeError(
                        f"DALI failed on one of {len(paths)} files that PIL decodes "
                        f"({', '.join(map(str, paths[:4]))}{', ...' if len(paths) > 4 else ''}): {err}"
                    ) from err
                for path, why in bad.items():
                    self.mark_bad(path, why)
            finally:
                del iterator
        if len(self.skipped_files) > NAMED_SKIPS:
            warnings.warn(
                f"{len(self.skipped_files)} unreadable image files were skipped in all; the first {NAMED_SKIPS} "
                f"are named above, the rest start with {self.skipped_files[NAMED_SKIPS]}",
                stacklevel=2,
            )

    def _to_batch(self, out: dict[str, Tensor]) -> dict[str, Any]:
        meta = out["meta"].to("cpu")
        valid = meta[:, 2].bool()
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        image = out["image"]
        if self.dtype == torch.bfloat16:
            image = image.to(torch.bfloat16)
        batch = {"image": image, "target": meta[:, 0].clone(), "index": meta[:, 1].clone()}
        if self.store is not None:
            batch["teacher_logits"] = out["teacher_logits"]
            batch["teacher_map"] = out["teacher_map"]
        if keep is not None:
            for key, value in batch.items():
                batch[key] = value[keep.to(value.device)]
        batch["skipped"] = int((~valid).sum())
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Engine entry point


def maybe_dali_loader(
    cfg,
    dataset,
    indices: Tensor,
    *,
    batch_size: int,
    train: bool,
    shuffle: bool,
    epoch: int,
    start: int,
    seed: int,
    drop_last: bool,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> DaliLoader | None:
    """A `DaliLoader` for ``dataset[indices]`` when ``cfg.data.loader`` resolves to DALI, else None.

    Takes the file list from an `ImageFolderDataset` (or the base of a `FrozenTeacherDataset`, whose
    store is then read inside the pipeline) and the crop/encoding settings from ``cfg``, so it yields
    what the torchvision loader of the same dataset yields. ``batch_size`` is this rank's batch and
    ``start`` the global position in the epoch (as `make_loader`).
    """
    kind = getattr(cfg.data, "loader", "torchvision")
    if kind == "torchvision":
        return None
    store, base = None, dataset
    if isinstance(dataset, FrozenTeacherDataset):
        store, base = dataset.store, dataset.base
    folder = isinstance(base, ImageFolderDataset) and base.masks_root is None
    if resolve_loader(kind, folder=folder) != "dali":
        return None
    data = cfg.data
    if train and data.rand_augment_ops > 0:
        # Torchvision's RandAugment has no DALI twin that draws the same operations (DALI's auto_aug differs).
        notice(
            f"data.loader={kind} with data.rand_augment_ops={data.rand_augment_ops}: DALI does not apply "
            "torchvision's RandAugment; the training loader uses torchvision (evaluation keeps DALI)"
        )
        return None
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    return DaliLoader(
        base.samples,
        indices,
        batch_size=batch_size,
        geometry=Geometry(data.image_size, train, (data.crop_scale_min, 1.0), data.eval_resize),
        encoding=input_encoding(cfg.student.name),
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        start=start,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        store=store if train else None,
        device_id=device_id,
        num_threads=max(1, resolve_num_workers(data.num_workers)),
    )


__all__ = [
    "LOADERS",
    "NAMED_SKIPS",
    "DaliLoader",
    "Geometry",
    "dali_available",
    "epoch_plan",
    "maybe_dali_loader",
    "notice",
    "resolve_loader",
]
