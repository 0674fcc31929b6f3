"""Frozen teachers: teacher logits and explanations computed once per training image, and read back.

Layout of a store folder (version 2, sharded; written by ``e2kd-fast precompute``):
    index.json                what was stored: the identity of the data and teacher (teacher name, its
                              checkpoint's SHA-256, explanation kind, number of images, SHA-256 of the
                              ordered file list, image size) and the layout (shard size, map dtype,
                              stored map shape, resolution divisor, number of classes)
    shards/logits_KKKKK.npy   [n, C] float32 teacher logits of images [K·shard_size, K·shard_size + n)
    shards/maps_KKKKK.npy     [n, *map_shape] explanations of the full image for the teacher's top-1
                              (B-cos: [6, h, w]; GradCAM: [1, h, w]); dtype by storage option
    shards/scales_KKKKK.npy   [n] float32 per-sample scales (``int8`` only)
    shards/files_KKKKK.npy    [n, 4] int64 what each image file was when its outputs were computed:
                              size, mtime_ns, 64-bit BLAKE2b of its bytes, readable (1) or not (0)

Storage options for the maps (``map_dtype``; ``map_scale`` divides the resolution, maps are averaged
down when written and upsampled when read):
    fp32   float32, exact
    fp16   float16 (the default)
    bf16   bfloat16, kept as its raw 16 bits (``uint16``: numpy has no bfloat16)
    int8   int8 with one float32 scale per sample (max |value| / 127, symmetric)
`fidelity_report` measures the cosine between stored and exact explanations for each option.

Every shard is written to temporary files and renamed into place, maps last, so a shard whose maps
file exists is complete. A killed precompute therefore resumes at the first missing shard, and ranks
of a multi-GPU precompute each write their own shards (shard K belongs to rank K mod world size).

The teacher sees each whole training image resized to S × S. At training time the random crop and
flip of the image are applied to its stored map at the same relative region (a paired transform, or
the DALI pipeline's shared ROI), whatever the map's resolution. A store that does not match the
dataset or teacher is refused (`StoreMismatchError`).

Changed images. The teacher's outputs hold for the bytes it saw; an image replaced under the same
name since (edited, re-encoded, or repaired after it was unreadable, when its stored outputs are
zeros) must not be trained with them. `FrozenStore.check_image` runs whenever an image is read for
training: a stat, compared with the recorded (size, mtime_ns). Only when these differ are the bytes
hashed and compared with the recorded digest, so an unchanged data set costs one stat per image and
no second read; a copy with new modification times is hashed when read (warned once per process)
until precompute records the new times. Changed content is refused by name (`StoreMismatchError`);
running precompute again recomputes the shards of changed images. An image that was unreadable at
precompute time and is unchanged is skipped with a warning, never trained on its zero outputs. The
digest is computed from the very bytes the teacher's input was decoded from (one read per image).

Stores written before fingerprints existed (no ``files_KKKKK.npy``) and version 1 stores
(``meta.json``, ``logits.npy``, ``maps.npy`` in fp16) are still read, with a warning that changed
images cannot be detected. Version 1 stores cannot be resumed or extended: precompute refuses them
with a message to delete the folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from e2kd_fast.data.folders import ImageFolderDataset, read_image
from e2kd_fast.data.transforms import encoding_transform

STORE_VERSION = 2
MAP_DTYPES = ("fp32", "fp16", "bf16", "int8")
_RAW_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}
_LAYOUT_KEYS = ("version", "num_classes", "shard_size", "map_dtype", "map_shape", "full_map_shape", "map_scale")
# The options `fidelity_report` measures by default: (map_dtype, map_scale).
FIDELITY_OPTIONS: tuple[tuple[str, int], ...] = (
    ("fp32", 1),
    ("fp16", 1),
    ("bf16", 1),
    ("int8", 1),
    ("fp16", 2),
    ("int8", 2),
    ("fp16", 4),
)


# Columns of a shard's files_KKKKK.npy, int64 [n, 4]: one row per image.
FINGERPRINT_FIELDS = ("size", "mtime_ns", "digest", "readable")
_SIZE, _MTIME, _DIGEST, _READABLE = range(len(FINGERPRINT_FIELDS))


class StoreMismatchError(ValueError):
    """The store was made for another dataset, teacher or configuration, is incomplete, or an image changed."""


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


def content_digest(data: bytes) -> int:
    """64-bit BLAKE2b of a file's bytes as a signed int64 (what a store records per image)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def read_fingerprinted(path: str | os.PathLike) -> tuple[bytes, np.ndarray]:
    """A file's bytes and its fingerprint int64 [4] (size, mtime_ns, digest, readable = 1), from one read.

    Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
        data = f.read()
    return data, np.array([len(data), mtime_ns, content_digest(data), 1], np.int64)


def unreadable_fingerprint(path: str | os.PathLike) -> np.ndarray:
    """int64 [4] of an image that could not be decoded (readable = 0); size -1 if its bytes cannot be read."""
    try:
        return read_fingerprinted(path)[1] * np.array([1, 1, 1, 0], np.int64)
    except OSError:
        return np.array([-1, -1, 0, 0], np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding of maps per storage option


def _check_option(map_dtype: str, map_scale: int) -> None:
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"unknown map dtype {map_dtype!r}; allowed: {', '.join(MAP_DTYPES)}")
    if not isinstance(map_scale, int) or map_scale < 1:
        raise ValueError(f"map_scale must be a positive integer (resolution divisor), got {map_scale!r}")


def stored_map_shape(full_map_shape: Sequence[int], map_scale: int) -> tuple[int, ...]:
    """[C, H, W] → [C, ceil(H / map_scale), ceil(W / map_scale)]."""
    *lead, h, w = full_map_shape
    return (*lead, math.ceil(h / map_scale), math.ceil(w / map_scale))


def encode_maps(maps: np.ndarray | torch.Tensor, map_dtype: str, map_scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact maps → what a store holds.

    Args:
        maps: [n, C, H, W] float explanations at full resolution.
        map_dtype: one of `MAP_DTYPES`.
        map_scale: resolution divisor; the maps are area-averaged to [C, ceil(H/s), ceil(W/s)].

    Returns:
        raw [n, C, h, w] in the option's storage dtype, and scales [n] float32 (ones unless int8).
    """
    _check_option(map_dtype, map_scale)
    x = torch.as_tensor(maps).float()
    if map_scale > 1:
        n, c, h, w = x.shape
        x = F.adaptive_avg_pool2d(x.reshape(n, c, h, w), stored_map_shape((h, w), map_scale))
    scales = torch.ones(x.shape[0], dtype=torch.float32)
    if map_dtype == "fp32":
        raw = x.numpy()
    elif map_dtype == "fp16":
        raw = x.half().numpy()
    elif map_dtype == "bf16":
        raw = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    else:  # int8, symmetric, one scale per sample: B-cos maps are signed
        peak = x.flatten(1).abs().amax(1)
        scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        raw = torch.round(x / scales.view(-1, *[1] * (x.dim() - 1))).clamp_(-127, 127).to(torch.int8).numpy()
    return np.ascontiguousarray(raw), scales.numpy()


def decode_maps(raw: np.ndarray, scales: np.ndarray | None, map_dtype: str) -> np.ndarray:
    """Stored maps → float32 at the stored resolution. raw [n, ...] (or one sample [...] with scales [])."""
    if map_dtype == "bf16":
        return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32)
    out = np.array(raw, dtype=np.float32)  # a copy: never a view of the read-only memory map
    if map_dtype == "int8":
        s = np.asarray(scales, dtype=np.float32)
        out = out * s.reshape(s.shape + (1,) * (out.ndim - s.ndim))
    return out


def upsample_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[n, C, h, w] → [n, C, *size] bilinear (no-op when the size matches): reduced maps read back."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def bytes_per_image(num_classes: int, full_map_shape: Sequence[int], map_dtype: str, map_scale: int = 1) -> int:
    """Bytes one image occupies in a store: float32 logits + the map (+ a float32 scale for int8)."""
    _check_option(map_dtype, map_scale)
    elements = int(np.prod(stored_map_shape(full_map_shape, map_scale)))
    return 4 * num_classes + elements * np.dtype(_RAW_DTYPE[map_dtype]).itemsize + (4 if map_dtype == "int8" else 0)


def fidelity_report(
    exact: torch.Tensor,
    options: Sequence[tuple[str, int]] = FIDELITY_OPTIONS,
    num_classes: int = 1000,
) -> list[dict[str, Any]]:
    """Cosine between stored and exact explanations, per storage option.

    Each map is encoded as the option stores it, decoded, upsampled back to full resolution and
    compared with the exact map by the cosine of the flattened maps (what the e²KD loss compares).

    Args:
        exact: [n, C, H, W] float explanations.
        options: (map_dtype, map_scale) pairs.
        num_classes: for the bytes-per-image column.

    Returns:
        One dict per option: ``map_dtype``, ``map_scale``, ``bytes_per_image``, ``cosine_mean``,
        ``cosine_min`` (over the n maps).
    """
    exact = torch.as_tensor(exact).float()
    rows = []
    for map_dtype, map_scale in options:
        raw, scales = encode_maps(exact, map_dtype, map_scale)
        back = upsample_maps(torch.from_numpy(decode_maps(raw, scales, map_dtype)), exact.shape[-2:])
        cos = F.cosine_similarity(back.flatten(1).double(), exact.flatten(1).double(), dim=1, eps=1e-30)
        rows.append(
            {
                "map_dtype": map_dtype,
                "map_scale": map_scale,
                "bytes_per_image": bytes_per_image(num_classes, exact.shape[1:], map_dtype, map_scale),
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
            }
        )
    return rows


def format_fidelity(rows: list[dict[str, Any]], num_images: int | None = None) -> str:
    """`fidelity_report` rows as a markdown table (with the store size for ``num_images`` if given)."""
    head = "| map dtype | resolution | bytes/image | cosine mean | cosine min |"
    sep = "|---|---|---|---|---|"
    if num_images:
        head, sep = head + f" store for {num_images} images |", sep + "---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['map_dtype']} | 1/{r['map_scale']} | {r['bytes_per_image']:,} | "
            f"{r['cosine_mean']:.6f} | {r['cosine_min']:.6f} |"
        )
        if num_images:
            line += f" {r['bytes_per_image'] * num_images / 2**30:.2f} GiB |"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The store


class _View:
    """Read-only array-like over all shards of one field (``logits`` or ``maps``), decoded to float32."""

    def __init__(self, store: FrozenStore, field_name: str) -> None:
        self.store, self.field = store, field_name

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.store
        return (s.num_images, s.num_classes) if self.field == "logits" else (s.num_images, *s.map_shape)

    def __len__(self) -> int:
        return self.store.num_images

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.store.read(int(key))[0 if self.field == "logits" else 1]
        idx = np.arange(self.store.num_images)[key]
        if len(idx) == 0:
            return np.zeros((0, *self.shape[1:]), np.float32)
        return np.stack([self[int(i)] for i in idx])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass
class FrozenStore:
    """A frozen-explanation store folder (see the module docstring).

    Open one with `FrozenStore.open`, make one with `FrozenStore.create`. ``meta`` holds the identity
    (what `store_identity` returns) and the layout. ``logits`` [N, C] and ``maps`` [N, *map_shape] are
    read-only float32 views over the complete shards; `read` returns one image's entries.
    """

    path: Path
    meta: dict[str, Any]
    legacy: bool = False
    _arrays: dict[tuple[str, int], np.ndarray | None] = field(default_factory=dict, repr=False)
    _warned_touched: bool = field(default=False, repr=False)

    # ------------------------------------------------------------------ opening and creating

    @classmethod
    def open(cls, path: str | os.PathLike, expect: dict[str, Any] | None = None, mode: str = "r") -> FrozenStore:
        """Opens an existing store; ``expect`` holds identity values that must match (else StoreMismatchError)."""
        path = Path(path)
        if (path / "index.json").is_file():
            meta, legacy = json.loads((path / "index.json").read_text()), False
        elif (path / "meta.json").is_file():
            meta, legacy = _legacy_meta(path), True
        else:
            raise FileNotFoundError(
                f"no frozen-explanation store at {path} (missing index.json); run e2kd-fast precompute"
            )
        version = meta.get("version")
        if version not in (1, STORE_VERSION):
            raise StoreMismatchError(f"{path} has store version {version!r}; this package reads 1 and {STORE_VERSION}")
        store = cls(path, meta, legacy)
        store.check(expect or {})
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        meta: dict[str, Any],
        num_classes: int,
        map_shape: tuple[int, ...],
        *,
        map_dtype: str = "fp16",
        map_scale: int = 1,
        shard_size: int = 1024,
    ) -> FrozenStore:
        """Creates an empty store for ``meta["num_images"]`` images, or returns the identical one already there.

        Args:
            meta: identity values (`store_identity`); must hold ``num_images``.
            num_classes: length of the stored logits.
            map_shape: the full-resolution explanation shape [C, H, W] (stored at 1/``map_scale``).
            map_dtype, map_scale: the storage option (module docstring).
            shard_size: images per shard.

        Several ranks may call this at once: they write the same index atomically.
        """
        _check_option(map_dtype, map_scale)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        path = Path(path)
        if (path / "meta.json").is_file():
            raise StoreMismatchError(
                f"{path} holds a version-1 store (meta.json); it cannot be extended. Delete the folder and run "
                "e2kd-fast precompute again to write the sharded layout"
            )
        index = {
            **meta,
            "version": STORE_VERSION,
            "num_classes": int(num_classes),
            "shard_size": int(shard_size),
            "map_dtype": map_dtype,
            "map_shape": list(stored_map_shape(map_shape, map_scale)),
            "full_map_shape": list(map_shape),
            "map_scale": int(map_scale),
        }
        if (path / "index.json").is_file():
            store = cls.open(path, expect=meta)
            store.check({k: index[k] for k in _LAYOUT_KEYS})
            return store
        (path / "shards").mkdir(parents=True, exist_ok=True)
        tmp = path / f"index.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, path / "index.json")
        return cls(path, index)

    def check(self, expect: dict[str, Any]) -> None:
        """Raises StoreMismatchError naming the first value of ``expect`` that the store does not have."""
        for key, value in expect.items():
            have = self.meta.get(key)
            if isinstance(have, list) and isinstance(value, tuple):
                value = list(value)
            if have != value:
                raise StoreMismatchError(
                    f"{self.path} does not match this run: {key} is {have!r} in the store, {value!r} here. "
                    "Precompute a new store for this dataset and teacher."
                )

    # ------------------------------------------------------------------ layout

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_images / self.shard_size))

    @property
    def map_dtype(self) -> str:
        return self.meta["map_dtype"]

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Shape of one stored map [C, h, w] (full resolution / map_scale)."""
        return tuple(self.meta["map_shape"])

    @property
    def logits(self) -> _View:
        return _View(self, "logits")

    @property
    def maps(self) -> _View:
        return _View(self, "maps")

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Images [start, stop) of ``shard``."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def _file(self, kind: str, shard: int) -> Path:
        if self.legacy:
            return self.path / f"{kind}.npy"
        return self.path / "shards" / f"{kind}_{shard:05d}.npy"

    def shard_complete(self, shard: int) -> bool:
        if self.legacy:
            return int(self.meta.get("completed", 0)) >= self.num_images
        return self._file("maps", shard).is_file()

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.shard_complete(k)]

    @property
    def completed(self) -> int:
        """Images in complete shards."""
        return sum(
            self.shard_range(k)[1] - self.shard_range(k)[0] for k in range(self.num_shards) if self.shard_complete(k)
        )

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def require_complete(self) -> None:
        if not self.complete:
            raise StoreMismatchError(
                f"{self.path} is incomplete ({self.completed} of {self.num_images} images); "
                "run e2kd-fast precompute again to finish it"
            )

    # ------------------------------------------------------------------ writing

    def write_shard(
        self,
        shard: int,
        logits: np.ndarray | torch.Tensor,
        maps: np.ndarray | torch.Tensor,
        files: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Encodes and writes one whole shard atomically.

        Args:
            logits: [n, C] teacher logits of the shard's images, in order.
            maps: [n, *full_map_shape] exact float explanations of the same images.
            files: [n, 4] int64 fingerprints of the image files (`FINGERPRINT_FIELDS`), or None (then
                changed images of this shard cannot be detected).
        """
        if self.legacy:
            raise StoreMismatchError(f"{self.path} is a version-1 store and cannot be written")
        start, stop = self.shard_range(shard)
        logits = np.asarray(torch.as_tensor(logits).detach().float().cpu(), dtype=np.float32)
        maps = torch.as_tensor(maps).detach().float().cpu()
        if logits.shape != (stop - start, self.num_classes) or tuple(maps.shape) != (
            stop - start,
            *self.meta["full_map_shape"],
        ):
            raise ValueError(
                f"shard {shard} of {self.path} takes logits [{stop - start}, {self.num_classes}] and maps "
                f"[{stop - start}, {', '.join(map(str, self.meta['full_map_shape']))}], got "
                f"{list(logits.shape)} and {list(maps.shape)}"
            )
        raw, scales = encode_maps(maps, self.map_dtype, int(self.meta["map_scale"]))
        parts = [("logits", logits), ("maps", raw)]
        if self.map_dtype == "int8":
            parts.insert(0, ("scales", scales))
        if files is not None:
            files = np.asarray(torch.as_tensor(files), dtype=np.int64)
            if files.shape != (stop - start, len(FINGERPRINT_FIELDS)):
                raise ValueError(
                    f"shard {shard} of {self.path} takes files [{stop - start}, 4], got {list(files.shape)}"
                )
            parts.insert(0, ("files", files))
        else:  # fingerprints of earlier content would refuse (or skip) the new outputs
            self._file("files", shard).unlink(missing_ok=True)
        self._arrays.pop(("files", shard), None)
        tmps = []
        for kind, array in parts:
            tmp = self._file(kind, shard).with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, array)
            tmps.append((tmp, self._file(kind, shard)))
        for tmp, final in tmps:  # maps last: its presence marks the shard complete
            os.replace(tmp, final)

    # ------------------------------------------------------------------ reading

    def _array(self, kind: str, shard: int) -> np.ndarray:
        key = (kind, shard)
        if key not in self._arrays:
            if not self.shard_complete(shard):
                self.require_complete()
            self._arrays[key] = np.load(self._file(kind, shard), mmap_mode="r")
        return self._arrays[key]

    def read_raw(self, index: int) -> tuple[np.ndarray, float, np.ndarray]:
        """One image's stored map (storage dtype, [C, h, w]), its scale, and its float32 logits [C]."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} is outside the store's {self.num_images} images")
        shard, offset = (0, index) if self.legacy else divmod(index, self.shard_size)
        scale = float(self._array("scales", shard)[offset]) if self.map_dtype == "int8" else 1.0
        return self._array("maps", shard)[offset], scale, np.asarray(self._array("logits", shard)[offset], np.float32)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's float32 logits [C] and float32 map [C, h, w] at the stored resolution."""
        raw, scale, logits = self.read_raw(index)
        return logits, decode_maps(raw, np.float32(scale), self.map_dtype)

    # ------------------------------------------------------------------ image fingerprints

    def fingerprints(self, shard: int) -> np.ndarray | None:
        """int64 [n, 4] (`FINGERPRINT_FIELDS`) of the shard's image files, or None where not recorded."""
        key = ("files", shard)
        if key not in self._arrays:
            path = self._file("files", shard)
            self._arrays[key] = None if self.legacy or not path.is_file() else np.load(path, mmap_mode="r")
        return self._arrays[key]

    @property
    def fingerprinted(self) -> bool:
        """Whether every shard records its image files (stores written before fingerprints do not)."""
        return not self.legacy and all(self._file("files", k).is_file() for k in range(self.num_shards))

    def _fingerprint(self, index: int) -> np.ndarray | None:
        shard, offset = divmod(index, self.shard_size)
        files = None if self.legacy else self.fingerprints(shard)
        return None if files is None else np.asarray(files[offset])

    def _compare(self, index: int, path: str | os.PathLike) -> tuple[bool | None, np.ndarray | None]:
        """(changed, fingerprint now if the file was touched) of image ``index``'s file.

        A stat first: the recorded (size, mtime_ns) mean unchanged, with no read. Otherwise the bytes
        are hashed: the recorded digest means unchanged (a copy, a touch) and the new fingerprint is
        returned. changed is None where the store records no fingerprint. A file that cannot be read
        now counts as unchanged: the reader skips it, so nothing stale is trained on.
        """
        record = self._fingerprint(index)
        if record is None:
            return None, None
        try:
            stat = os.stat(path)
            if (stat.st_size, stat.st_mtime_ns) == (record[_SIZE], record[_MTIME]):
                return False, None
            _, now = read_fingerprinted(path)
        except OSError:
            return False, None
        if now[_DIGEST] != record[_DIGEST]:
            return True, None
        return False, now

    def check_image(self, index: int, path: str | os.PathLike) -> str | None:
        """None when image ``index`` may be trained with its stored outputs, else why it is skipped.

        Costs one stat when the file is as recorded (see `_compare`).

        Raises:
            StoreMismatchError: the file changed since its outputs were computed (named, with the fix).
        """
        changed, touched = self._compare(index, path)
        if changed is None:
            return None
        readable = bool(self._fingerprint(index)[_READABLE])
        if changed:
            then = "it was unreadable then, so its stored outputs are zeros" if not readable else "they are stale"
            raise StoreMismatchError(
                f"{path} changed since {self.path} was computed from it (image {index}; {then}). Run "
                "e2kd-fast precompute again to recompute its shard, or restore the file"
            )
        if touched is not None and not self._warned_touched:  # once per process: hashing is the slow path
            self._warned_touched = True
            warnings.warn(
                f"{path} (and maybe more images) has a new modification time but the content {self.path} was "
                "computed from; such images are hashed whenever they are read. Run e2kd-fast precompute "
                "again to record the new times",
                stacklevel=2,
            )
        if not readable:
            return f"it was unreadable when {self.path} was computed (its stored outputs are zeros)"
        return None

    def refresh_shard(self, shard: int, paths: Sequence[str | os.PathLike]) -> list[int]:
        """Checks a complete shard's image files; returns the indices of the changed images.

        When none changed, the new (size, mtime_ns) of touched files are recorded, so later reads need
        no hash. ``paths``: the files of the shard's images, in order. [] where nothing is recorded.
        """
        files = self.fingerprints(shard)
        if files is None:
            return []
        start, _ = self.shard_range(shard)
        compared = [self._compare(start + i, p) for i, p in enumerate(paths)]
        changed = [start + i for i, (c, _) in enumerate(compared) if c]
        touched = [(i, now) for i, (_, now) in enumerate(compared) if now is not None]
        if touched and not changed:
            updated = np.array(files)
            for i, now in touched:
                updated[i, _SIZE], updated[i, _MTIME] = now[_SIZE], now[_MTIME]
            tmp = self._file("files", shard).with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, updated)
            os.replace(tmp, self._file("files", shard))
            self._arrays.pop(("files", shard), None)
        return changed

    def invalidate_shard(self, shard: int) -> None:
        """Marks a complete shard missing (its maps file goes first), so precompute computes it again."""
        self._file("maps", shard).unlink(missing_ok=True)
        for kind in ("maps", "logits", "scales", "files"):
            self._arrays.pop((kind, shard), None)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the memory maps themselves
        return {"path": self.path, "meta": self.meta, "legacy": self.legacy, "_arrays": {}, "_warned_touched": False}


def _legacy_meta(path: Path) -> dict[str, Any]:
    """A version-1 store's meta.json in the version-2 vocabulary (one shard, fp16)."""
    meta = json.loads((path / "meta.json").read_text())
    maps = np.load(path / "maps.npy", mmap_mode="r")
    logits = np.load(path / "logits.npy", mmap_mode="r")
    return {
        **meta,
        "version": meta.get("version", 1),
        "num_classes": int(logits.shape[1]),
        "shard_size": max(1, int(meta["num_images"])),
        "map_dtype": "fp16",
        "map_shape": list(maps.shape[1:]),
        "full_map_shape": list(maps.shape[1:]),
        "map_scale": 1,
    }


class FrozenTeacherDataset(Dataset):
    """Training images with their stored teacher outputs, cropped and flipped together.

    Args:
        base: an `ImageFolderDataset` without transform (items carry the image as a float tensor).
        store: the opened, complete `FrozenStore` for ``base``.
        paired_transform: e.g. ``paired_train_transform(size, scale, encoding)``.

    Items: ``image`` (encoded), ``target``, ``index``, ``teacher_logits`` [C] and ``teacher_map``
    [*map_shape[:-2], size, size] (a reduced-resolution map is upsampled by the crop's resampling);
    None for an unreadable image, or one that was unreadable when the store was computed (warned).
    An image file changed since the store was computed raises `StoreMismatchError` naming it.
    """

    def __init__(self, base: Dataset, store: FrozenStore, paired_transform) -> None:
        store.require_complete()
        if len(base) != store.num_images:
            raise StoreMismatchError(f"{store.path} holds {store.num_images} images, the dataset {len(base)}")
        if not store.fingerprinted:
            warnings.warn(
                f"{store.path} records no fingerprints of its image files (written by an older version): it is "
                "read, but an image changed or repaired since it was computed cannot be detected and would be "
                "trained with the old outputs. Precompute into a new folder to record them",
                stacklevel=2,
            )
        self.base, self.store, self.transform = base, store, paired_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        samples = getattr(self.base, "samples", None)
        if samples is not None:
            path = samples[index][0]
            why = self.store.check_image(index, path)  # a stat; raises if the file changed
            if why is not None:
                warnings.warn(f"skipping image file {path}: {why}", stacklevel=2)
                return None
        item = self.base[index]
        if item is None:
            return None
        logits, stored_map = self.store.read(index)
        image, teacher_map = self.transform(item["image"], torch.from_numpy(stored_map))
        return {
            "image": image,
            "target": item["target"],
            "index": index,
            "teacher_logits": torch.from_numpy(logits.copy()),
            "teacher_map": teacher_map,
        }


def store_identity(cfg, dataset) -> dict[str, Any]:
    """The meta values that tie a store to its dataset, teacher and map resolution."""
    return {
        "teacher": cfg.teacher.name,
        # Only when set, so stores written before teachers took kwargs keep their identity.
        **({"teacher_kwargs": dict(cfg.teacher.kwargs)} if cfg.teacher.kwargs else {}),
        "teacher_checkpoint_sha256": file_sha256(cfg.teacher.checkpoint),
        "explanation": cfg.distill.explanation,
        "num_images": len(dataset),
        "file_list_sha256": file_list_hash(dataset.samples, getattr(dataset, "root", None)),
        "image_size": cfg.data.image_size,
    }


class FullImageDataset(Dataset):
    """The whole image resized to S × S (no crop) and encoded: what a frozen teacher explains.

    Items: ``image`` [6 or 3, S, S], ``target``, ``index``, ``fingerprint`` int64 [4] (the file as
    decoded: `FINGERPRINT_FIELDS`, from the same read); None for an unreadable image (warned).
    """

    def __init__(self, base: ImageFolderDataset, size: int, encoding: str) -> None:
        self.base, self.size, self.encode = base, size, encoding_transform(encoding)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, target = self.base.samples[index]
        try:
            data, fingerprint = read_fingerprinted(path)  # hashed and decoded from one read
            pixels = TF.pil_to_tensor(read_image(data, name=path)).float().div_(255)
        except Exception as exc:  # PIL raises several types depending on the damage
            warnings.warn(f"skipping unreadable image file {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        image = F.interpolate(pixels[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return {
            "image": self.encode(image.clamp(0, 1)),
            "target": target,
            "index": index,
            "fingerprint": torch.from_numpy(fingerprint),
        }


def full_image_dataset(cfg, teacher_family: str) -> FullImageDataset:
    """The training split as the frozen teacher sees it: every image whole, resized to ``data.image_size``."""
    if cfg.data.root is None:
        raise ValueError("data.root is not set")
    base = ImageFolderDataset(cfg.data.root, cfg.data.train_split, transform=None)
    return FullImageDataset(base, cfg.data.image_size, "bcos" if teacher_family == "bcos" else "standard")


__all__ = [
    "FIDELITY_OPTIONS",
    "FINGERPRINT_FIELDS",
    "MAP_DTYPES",
    "STORE_VERSION",
    "FrozenStore",
    "FrozenTeacherDataset",
    "FullImageDataset",
    "StoreMismatchError",
    "bytes_per_image",
    "content_digest",
    "decode_maps",
    "encode_maps",
    "fidelity_report",
    "file_list_hash",
    "file_sha256",
    "format_fidelity",
    "full_image_dataset",
    "read_fingerprinted",
    "store_identity",
    "stored_map_shape",
    "unreadable_fingerprint",
    "upsample_maps",
]
