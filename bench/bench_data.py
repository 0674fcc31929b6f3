"""The `data` suite: images/s of the training input pipelines on a folder of real JPEGs.

Providers, all producing the same thing (a random-resized crop to ``size``², a random flip, float
[0, 1], the B-cos 6-channel encoding) in batches:

- ``torchvision`` (the reference): `e2kd_fast.data.ImageFolderDataset` + `train_transform` through a
  `DataLoader` with ``--workers`` worker processes, as the trainer uses it;
- ``dali-cpu``: DALI with CPU operators only (``device_id=None``: no GPU needed), with
  ``--workers`` threads;
- ``dali-gpu``: DALI with the ``mixed`` (nvJPEG) decoder, only where CUDA is available;
- ``engine-torchvision``, ``engine-dali-cpu``, ``engine-dali-gpu``: the engine's own loaders
  (`make_loader` and `e2kd_fast.data.dali.DaliLoader`: epoch plan, per-sample crops, B-cos encoding
  inside the pipeline); with ``--store fp16|bf16|int8|fp32`` they also read a frozen-explanation store
  of [6, size, size] maps (``--store-scale`` divides its resolution) and crop/flip each map with its image.

The folder is generated once (``root/train/<class>/*.JPEG``, sizes drawn around 300–500 px, smooth
colour fields with noise so the JPEGs have realistic entropy) and cached. Each round runs one epoch of
every provider in alternating order; the first epoch of each is an untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common

SUITE = "data"
REFERENCE = "torchvision"
PROVIDERS = ("torchvision", "dali-cpu", "dali-gpu", "engine-torchvision", "engine-dali-cpu", "engine-dali-gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ", ".join(PROVIDERS)
    )
    parser.add_argument("--images", type=int, default=256, help="JPEGs in the generated folder")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--size", type=int, default=224, help="output crop side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers and DALI threads (default: cores)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per provider")
    parser.add_argument(
        "--store", default=None, choices=("fp32", "fp16", "bf16", "int8"), help="engine-*: also read a frozen store"
    )
    parser.add_argument("--store-scale", type=int, default=1, help="resolution divisor of the stored maps")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="where the JPEG folder is generated (default: .cache/bench/)"
    )


def generate_jpeg_folder(root: Path, images: int, classes: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """Writes ``root/train/class_<k>/img_<i>.JPEG`` once; a marker file makes later calls reuse it."""
    from PIL import Image

    spec = {"images": images, "classes": classes, "min_side": min_side, "max_side": max_side, "seed": seed}
    marker = root / "bench_folder.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    for i in range(images):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        # A low-resolution colour field, upsampled, plus noise: compresses like a photo, not a flat fill.
        base = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 12, size=(h, w, 3)).astype(np.int16)
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.JPEG", quality=90)
    marker.write_text(json.dumps(spec))
    return root


def _torchvision_epochs(root: Path, args: argparse.Namespace, workers: int) -> Iterator[int]:
    """Yields the number of images of each epoch, forever (the loader's workers persist)."""
    from torch.utils.data import DataLoader

    from e2kd_fast.data import ImageFolderDataset, collate_skipping, train_transform

    dataset = ImageFolderDataset(root, "train", transform=train_transform(args.size))
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_skipping,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    while True:
        n = 0
        for batch in loader:
            n += batch["image"].shape[0]
        yield n


def _dali_epochs(root: Path, args: argparse.Namespace, workers: int, gpu: bool) -> Iterator[int]:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=(args.size, args.size), random_area=(0.08, 1.0))
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[0.0, 0.0, 0.0],
            std=[255.0, 255.0, 255.0],
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return images, labels

    # device_id=None keeps DALI off CUDA entirely (a CPU pipeline must not even initialise it).
    pipeline = pipe(
        batch_size=args.batch, num_threads=max(1, workers), device_id=0 if gpu else None, seed=0, prefetch_queue_depth=2
    )
    pipeline.build()
    iterator = DALIGenericIterator(
        pipeline, ["data", "label"], reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
    )
    while True:
        n = 0
        for batch in iterator:
            images = batch[0]["data"]
            x6 = torch.cat([images, 1 - images], 1)  # the B-cos encoding, as the torchvision transform does
            n += x6.shape[0]
        if gpu:
            torch.cuda.synchronize()
        yield n


def _make_store(root: Path, args: argparse.Namespace):
    """A frozen store of random [6, size, size] maps for the folder (cached per option: `create` reopens it)."""
    from e2kd_fast.data import ImageFolderDataset
    from e2kd_fast.data.frozen_store import FrozenStore

    dataset = ImageFolderDataset(root, "train")
    store = FrozenStore.create(
        root / f"store-{args.store}-{args.store_scale}-{args.size}",
        {"num_images": len(dataset)},
        1000,
        (6, args.size, args.size),
        map_dtype=args.store,
        map_scale=args.store_scale,
        shard_size=128,
    )
    gen = torch.Generator().manual_seed(0)
    for k in store.missing_shards():
        lo, hi = store.shard_range(k)
        store.write_shard(k, torch.randn(hi - lo, 1000, generator=gen), torch.randn(hi - lo, 6, args.size, args.size))
    return dataset, store


def _engine_epochs(root: Path, args: argparse.Namespace, workers: int, provider: str) -> Iterator[int]:
    """The engine's loaders, one new loader per epoch as the trainer makes them; yields images per epoch."""
    from e2kd_fast.data import ImageFolderDataset, paired_train_transform, train_transform
    from e2kd_fast.data.dali import DaliLoader, Geometry
    from e2kd_fast.data.frozen_store import FrozenTeacherDataset
    from e2kd_fast.data.loaders import make_loader

    store = None
    if args.store:
        base, store = _make_store(root, args)
    else:
        base = ImageFolderDataset(root, "train", transform=train_transform(args.size))
    indices = torch.arange(len(base))
    epoch = 0
    while True:
        if provider == "engine-torchvision":
            dataset = base
            if store is not None:
                dataset = FrozenTeacherDataset(base, store, paired_train_transform(args.size))
            loader = make_loader(
                dataset, indices, batch_size=args.batch, num_workers=workers, shuffle=True, epoch=epoch
            )
        else:
            gpu = provider == "engine-dali-gpu"
            loader = DaliLoader(
                base.samples,
                indices,
                batch_size=args.batch,
                geometry=Geometry(args.size, train=True),
                shuffle=True,
                epoch=epoch,
                store=store,
                device_id=torch.cuda.current_device() if gpu else None,
                num_threads=max(1, workers),
            )
        n = 0
        for batch in loader:
            n += batch["image"].shape[0]
        if provider == "engine-dali-gpu":
            torch.cuda.synchronize()
        epoch += 1
        yield n


def _unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run here, or None."""
    if "dali" in provider:
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:
            return f"DALI is not importable ({type(exc).__name__}: {exc})"
    if provider.endswith("dali-gpu") and not torch.cuda.is_available():
        return "no CUDA device: the mixed (nvJPEG) decoder needs a GPU"
    return None


def run(
    args: argparse.Namespace, device: torch.device, env: dict[str, Any], run_id: str, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    workers = args.workers if args.workers is not None else common.cpu_cores()
    root = args.data_root or common.SCRATCH_DIR / f"jpegs-{args.images}-{args.min_side}-{args.max_side}"
    t0 = time.perf_counter()
    generate_jpeg_folder(root, args.images, args.classes, args.min_side, args.max_side)
    jpeg_bytes = sum(p.stat().st_size for p in (root / "train").rglob("*.JPEG"))
    log(
        f"[data] {args.images} JPEGs ({jpeg_bytes / args.images / 1024:.0f} KiB avg) in {root} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    config = {
        "images": args.images,
        "min_side": args.min_side,
        "max_side": args.max_side,
        "size": args.size,
        "batch": args.batch,
        "workers": workers,
        "store": None if not args.store else f"{args.store} 1/{args.store_scale}",
    }

    def record(provider: str, status: str, note: str | None = None, **fields: Any) -> dict[str, Any]:
        return common.make_record(
            run_id=run_id,
            env=env,
            suite=SUITE,
            config=config,
            variant=provider,
            reference=REFERENCE,
            status=status,
            note=note,
            avg_jpeg_kib=jpeg_bytes / args.images / 1024,
            **fields,
        )

    records, epochs = [], {}
    for p in providers:
        reason = _unavailable(p)
        if reason:
            log(f"  {p}: skipped: {reason}")
            records.append(record(p, "unsupported", reason))
            continue
        if p.startswith("engine-"):
            epochs[p] = _engine_epochs(root, args, workers, p)
        elif p == "torchvision":
            epochs[p] = _torchvision_epochs(root, args, workers)
        else:
            epochs[p] = _dali_epochs(root, args, workers, gpu=p == "dali-gpu")
        next(epochs[p])  # warm-up: worker start-up, pipeline build, first decode
    samples: dict[str, list[float]] = {p: [] for p in epochs}
    counts: dict[str, int] = {}
    order = list(epochs)
    for r in range(args.rounds):
        for p in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            counts[p] = next(epochs[p])
            # Time per image, so a provider's ratio is comparable whatever its epoch length.
            samples[p].append((time.perf_counter() - t) * 1e3 / counts[p])
    for p in order:
        stats = common.summarize(samples[p])
        records.append(
            record(
                p,
                "ok",
                time_ms=stats,
                time_unit="ms per image",
                throughput={"value": 1e3 / stats["median"], "unit": "img/s"},
                epoch_images=counts[p],
            )
        )
        log(f"  {p:12s} {1e3 / stats['median']:8.1f} img/s")
    epochs.clear()  # stops the DataLoader workers
    records.sort(key=lambda r: providers.index(r["variant"]))
    common.add_ratios(records)
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        if r["suite"] != SUITE:
            continue
        cfg, t = r["config"], r.get("time_ms") or {}
        ratio = r.get("ratio")
        spread = f"{common.fmt_num(1e3 / t['p80'])}–{common.fmt_num(1e3 / t['p20'])}" if t else "–"
        rows.append(
            [
                r["variant"],
                f"{cfg['images']} JPEGs {cfg['min_side']}–{cfg['max_side']} px → {cfg['size']}², "
                f"batch {cfg['batch']}, {cfg['workers']} workers"
                + (f", store {cfg['store']}" if cfg.get("store") else ""),
                common.fmt_num(r["throughput"]["value"]) if r.get("throughput") else "–",
                spread,
                common.fmt_num(1 / ratio) + "×" if ratio else "–",
                r["note"] or "",
            ]
        )
    return common.markdown_table(
        ["pipeline", "setting", "img/s (median)", "img/s (p20–p80)", "vs torchvision", "note"], rows
    )
