"""Precompute: a frozen teacher's logits and explanations of every training image, written to its store.

The store's layout, identity checks and reading live in `e2kd_fast.data.frozen_store`; this job builds
the teacher, runs it over the training split and writes the missing shards of this rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from e2kd_fast.data.frozen_store import (
    FrozenStore,
    StoreMismatchError,
    fidelity_report,
    format_fidelity,
    full_image_dataset,
    store_identity,
)
from e2kd_fast.data.loaders import make_loader
from e2kd_fast.engine.builders import build_teacher, resolve_device
from e2kd_fast.explain import dynamic_weights, gradcam


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        pass
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
    return rank, world_size


def precompute(
    cfg,
    chunk: int | None = None,
    show_progress: bool = True,
    *,
    shard_size: int = 1024,
    map_dtype: str = "fp16",
    map_scale: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    max_shards: int | None = None,
    report_fidelity: bool = False,
    log=print,
) -> Path:
    """Computes (or finishes) the frozen store ``cfg.teacher.store`` for the config's training split.

    Each rank computes the missing shards K with K mod world_size == rank and writes them itself; a
    killed run resumes at the first missing shard. Rank and world size default to torch.distributed's
    (or torchrun's RANK / WORLD_SIZE); on CUDA, rank r uses ``cuda:LOCAL_RANK``.

    Args:
        cfg: the run's config (teacher.name, teacher.store, data.*).
        chunk: old name of ``shard_size`` (takes precedence when given).
        shard_size: images per shard (fixed when the store is created).
        map_dtype, map_scale: storage option (`MAP_DTYPES`; resolution divisor).
        max_shards: stop after writing this many shards (a time-limited job; the next call continues).
        report_fidelity: log `fidelity_report` for every option, measured on the first shard this rank
            computes.

    Returns:
        The store's path.
    """
    if cfg.teacher.store is None or cfg.teacher.name is None:
        raise ValueError("precompute needs teacher.name and teacher.store in the config")
    rank, world_size = _rank_and_world(rank, world_size)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    teacher = build_teacher(cfg).to(device)
    dataset = full_image_dataset(cfg, teacher_family=getattr(teacher, "e2kd_family", "bcos"))
    identity = store_identity(cfg, dataset.base)
    explain = dynamic_weights if cfg.distill.explanation == "bcos" else gradcam
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size

    def compute(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, C] and exact maps [n, *map_shape] of images [start, stop) (unreadable images: zeros)."""
        loader = make_loader(
            dataset, torch.arange(start, stop), batch_size=batch_size, num_workers=cfg.data.num_workers
        )
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for batch in loader:
            if batch["image"].shape[0] == 0:
                continue
            maps, logits = explain(teacher, batch["image"].to(device), None, create_graph=False, return_logits=True)
            rows = zip(batch["index"].tolist(), logits.detach().float().cpu(), maps.detach().float().cpu(), strict=True)
            got.update((i, (lg, mp)) for i, lg, mp in rows)
        if not got:
            raise RuntimeError(f"no image of {start}..{stop - 1} in {dataset.base!r} could be read")
        lg0, mp0 = next(iter(got.values()))
        zero = (torch.zeros_like(lg0), torch.zeros_like(mp0))  # an unreadable image is never trained on
        rows = [got.get(i, zero) for i in range(start, stop)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    path = Path(cfg.teacher.store)
    shard_size = chunk or shard_size
    if (path / "index.json").is_file() or (path / "meta.json").is_file():
        store = FrozenStore.open(path, expect=identity)
        if not store.legacy:  # the storage option is fixed at creation; the shard size is the store's
            store.check({"map_dtype": map_dtype, "map_scale": map_scale})
        if store.legacy:
            if store.complete:
                return path
            raise StoreMismatchError(
                f"{path} is an incomplete version-1 store; delete it and run e2kd-fast precompute again"
            )
        first = None
    else:
        # The first images tell the map shape; rank 0 computes (and keeps) its whole first shard.
        first = (0, compute(0, min(shard_size, len(dataset)) if rank == 0 else 1))
        num_classes = first[1][0].shape[1]
        store = FrozenStore.create(
            path,
            identity,
            num_classes,
            tuple(first[1][1].shape[1:]),
            map_dtype=map_dtype,
            map_scale=map_scale,
            shard_size=shard_size,
        )
    mine = [k for k in store.missing_shards() if k % world_size == rank]
    if max_shards is not None:
        mine = mine[:max_shards]
    bar = tqdm(total=len(mine), desc=f"precompute rank {rank}", unit="shard", disable=not show_progress)
    reported = False
    for k in mine:
        start, stop = store.shard_range(k)
        reuse = first is not None and k == 0 and first[1][0].shape[0] == stop - start
        logits, maps = first[1] if reuse else compute(start, stop)
        store.write_shard(k, logits, maps)
        if report_fidelity and not reported:
            log(f"fidelity of the storage options on shard {k} ({stop - start} images):")
            log(format_fidelity(fidelity_report(maps, num_classes=store.num_classes), store.num_images))
            reported = True
        bar.update(1)
    bar.close()
    return path


__all__ = ["precompute"]
