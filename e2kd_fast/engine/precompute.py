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
    unreadable_fingerprint,
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


def _log_fidelity(log, shard: int, maps: torch.Tensor, files: torch.Tensor, store: FrozenStore) -> bool:
    """Logs `fidelity_report` on the shard's readable images; False when it has none (try the next shard).

    An unreadable image is stored as a zero map that training never uses: counting it would report a
    cosine of 0 that no option causes, so it is left out and counted.
    """
    readable = torch.as_tensor(files)[:, 3] == 1  # the fingerprint's "readable" flag
    unreadable = int((~readable).sum())
    left_out = f"; {unreadable} unreadable image(s) left out" if unreadable else ""
    if not readable.any():
        log(f"fidelity: shard {shard} has no readable image{left_out}; measuring on the next shard")
        return False
    log(f"fidelity of the storage options on shard {shard} ({int(readable.sum())} images{left_out}):")
    log(format_fidelity(fidelity_report(maps[readable], num_classes=store.num_classes), store.num_images))
    return True


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
            0 computes nothing (and creates no store); negative values are refused.
        report_fidelity: log `fidelity_report` for every option, measured on the readable images of the
            first shard this rank computes (unreadable ones are left out and counted).

    Logs what it did: the shards written by this rank and what the store now holds.

    Returns:
        The store's path.
    """
    if cfg.teacher.store is None or cfg.teacher.name is None:
        raise ValueError("precompute needs teacher.name and teacher.store in the config")
    if max_shards is not None and max_shards < 0:
        raise ValueError(f"max_shards (--max-shards) must be 0 or more, got {max_shards}")
    path = Path(cfg.teacher.store)
    exists = (path / "index.json").is_file() or (path / "meta.json").is_file()
    if max_shards == 0 and not exists:  # creating the store needs a computed shard, which would be thrown away
        log(f"{path}: nothing computed and no store created (max_shards is 0)")
        return path
    rank, world_size = _rank_and_world(rank, world_size)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    teacher = build_teacher(cfg).to(device)
    dataset = full_image_dataset(cfg, teacher_family=getattr(teacher, "e2kd_family", "bcos"))
    identity = store_identity(cfg, dataset.base)
    explain = dynamic_weights if cfg.distill.explanation == "bcos" else gradcam
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size

    def compute(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [n, C], exact maps [n, *map_shape] and file fingerprints int64 [n, 4] of images [start, stop).

        An unreadable image gets zero outputs and a fingerprint marked unreadable: training skips it,
        and refuses it once the file has been repaired (its outputs would be the zeros).
        """
        loader = make_loader(
            dataset, torch.arange(start, stop), batch_size=batch_size, num_workers=cfg.data.num_workers
        )
        got: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for batch in loader:
            if batch["image"].shape[0] == 0:
                continue
            maps, logits = explain(teacher, batch["image"].to(device), None, create_graph=False, return_logits=True)
            rows = zip(
                batch["index"].tolist(),
                logits.detach().float().cpu(),
                maps.detach().float().cpu(),
                batch["fingerprint"],
                strict=True,
            )
            got.update((i, (lg, mp, fp)) for i, lg, mp, fp in rows)
        if not got:
            raise RuntimeError(f"no image of {start}..{stop - 1} in {dataset.base!r} could be read")
        lg0, mp0, _ = next(iter(got.values()))
        rows = [
            got.get(i)
            or (
                torch.zeros_like(lg0),  # an unreadable image is never trained on
                torch.zeros_like(mp0),
                torch.from_numpy(unreadable_fingerprint(dataset.base.samples[i][0])),
            )
            for i in range(start, stop)
        ]
        return tuple(torch.stack([r[k] for r in rows]) for k in range(3))

    shard_size = chunk or shard_size
    if exists:
        store = FrozenStore.open(path, expect=identity)
        if not store.legacy:  # the storage option is fixed at creation; the shard size is the store's
            store.check({"map_dtype": map_dtype, "map_scale": map_scale})
        if store.legacy:
            if store.complete:
                log(f"{path}: a complete version-1 store of {store.num_images} images; nothing to compute")
                return path
            raise StoreMismatchError(
                f"{path} is an incomplete version-1 store; delete it and run e2kd-fast precompute again"
            )
        first = None
        # Images replaced under the same name since their shard was computed: recompute the shard.
        for k in range(store.num_shards):
            if k % world_size != rank or not store.shard_complete(k):
                continue
            start, stop = store.shard_range(k)
            changed = store.refresh_shard(k, [p for p, _ in dataset.base.samples[start:stop]])
            if changed:
                log(
                    f"shard {k}: {len(changed)} image file(s) changed since it was computed, e.g. "
                    f"{dataset.base.samples[changed[0]][0]}; computing it again"
                )
                store.invalidate_shard(k)
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
        logits, maps, files = first[1] if reuse else compute(start, stop)
        store.write_shard(k, logits, maps, files)
        if report_fidelity and not reported:
            reported = _log_fidelity(log, k, maps, files, store)
        bar.update(1)
    bar.close()
    images = sum(stop - start for start, stop in map(store.shard_range, mine))
    missing = store.missing_shards()
    holds = "complete" if not missing else f"{len(missing)} shard(s) missing: run e2kd-fast precompute again"
    log(
        f"{path}: rank {rank} wrote {len(mine)} shard(s) ({images} images); the store now holds "
        f"{store.completed} of {store.num_images} images ({holds})"
    )
    return path


__all__ = ["precompute"]
