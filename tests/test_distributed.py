"""Distribution back ends: 2-process DDP / ZeRO-1 / ZeRO-2 on CPU (gloo) match one process; sharding is exact.

The multi-process runs are spawned once (`torch.multiprocessing.spawn`, launch variables set by hand
as torchrun would) and train several configurations one after the other, so that the import cost
is paid once. Every comparison is against a single process training the same global batch. The
process group has a one-minute timeout and the spawn a deadline, so that ranks out of step fail the
tests instead of hanging the suite.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from e2kd_fast.config import config_from_dict
from e2kd_fast.data.sampling import EpochSampler, ShardedEpochSampler
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.engine.distributed import make_strategy
from e2kd_fast.engine.process_group import DistEnv, dist_env, find_free_port, setup_distributed
from e2kd_fast.engine.zero import deepspeed_config
from e2kd_fast.models import read_checkpoint
from tests.helpers import set_rank_environment
from tests.test_trainer import ShapesSet
from tests.test_trainer import _tiny_bcos_without_norms as _tiny_bcos  # batch statistics are per rank

WORLD = 2
KERNELS = "reference"  # the layer kernels are not under test here; both sides of a comparison use the same


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", KERNELS)


# Each run: (name, engine section, train overrides, optim overrides). 2 epochs of 2 optimiser steps.
RUNS = [
    ("ddp", {"strategy": "ddp"}, {}, {}),
    ("zero1", {"strategy": "deepspeed", "zero_stage": 1}, {}, {}),
    ("zero2_accum", {"strategy": "deepspeed", "zero_stage": 2}, {"grad_accum": 2}, {"grad_clip_norm": 0.05}),
]


def _config(
    out_dir: Path, engine: dict, train: dict | None = None, optim: dict | None = None, data: dict | None = None
):
    return config_from_dict(
        {
            "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "distill": {"method": "e2kd", "lam": 1.0},
            # AGC is on (the B-cos default): under ZeRO it runs on the gradient partitions.
            "optim": {"lr": 1e-2, "schedule": "constant", **(optim or {})},
            "data": {"batch_size": 8, "num_workers": 0, **(data or {})},
            "train": {
                "epochs": 2,
                "out_dir": str(out_dir),
                "log_every_steps": 1,
                "device": "cpu",
                "compile": False,
                **(train or {}),
            },
            "engine": engine,
        }
    )


def _n_train(train: dict) -> int:
    return 2 * 8 * train.get("grad_accum", 1) + 3  # 2 steps per epoch, and a tail that no step uses


def _fit(
    out_dir: Path,
    engine: dict,
    train: dict,
    optim: dict,
    resume=None,
    val: bool = False,
    unreadable=(),
    data: dict | None = None,
) -> Trainer:
    cfg = _config(out_dir, engine, train, optim, data)
    trainer = Trainer(
        cfg,
        ShapesSet(_n_train(train), seed=0, unreadable=tuple(unreadable)),
        ShapesSet(6, seed=9) if val else None,
        student=_tiny_bcos(2),
        teacher=_tiny_bcos(1),
        show_progress=False,
    )
    trainer.fit(resume=resume)
    return trainer


KEEP_TAIL = {"drop_last": False}  # the paper configs' setting

# Runs where ranks go without images: global batch 8 in 2 micro-batches of 4 per rank; rank r reads
# the epoch's positions r, r + 2, ... (ShardedEpochSampler).
UNREADABLE_TRAIN = {"grad_accum": 2}
# Run last in the spawned workers, after RUNS.
UNREADABLE_RUNS = [
    ("ddp_unreadable", {"strategy": "ddp"}),
    ("zero2_unreadable", {"strategy": "deepspeed", "zero_stage": 2}),
]


def _epoch_order(epoch: int) -> list[int]:
    sampler = EpochSampler(torch.arange(_n_train(UNREADABLE_TRAIN)), seed=0)  # train.seed's default
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


def _unreadable_indices() -> tuple[int, ...]:
    """Images that make ranks go without: step 1's first micro-batch on rank 1 (positions 1, 3, 5, 7),
    one image of rank 0 in its second, rank 0's whole last micro-batch of step 2 (positions 24 to 30),
    and all 16 images of step 3 (the first of epoch 2), which then has no image on any rank."""
    first, second = _epoch_order(0), _epoch_order(1)
    return tuple(sorted({first[p] for p in (1, 3, 5, 7, 8, 24, 26, 28, 30)} | set(second[:16])))


def _spawn_with_deadline(fn, args: tuple, seconds: float) -> str | None:
    """`mp.spawn` that cannot hang the suite: None when every worker finished, else what went wrong."""
    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                return f"the {WORLD} training processes did not finish within {seconds:.0f} s"
    except Exception as err:  # a worker raised or died (gloo aborts the process on a collective mismatch)
        return f"{type(err).__name__}: {err}"
    return None


def _worker(rank: int, port: int, root: str, single_root: str) -> None:
    set_rank_environment(rank, WORLD, port, KERNELS)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # Ranks whose collectives fall out of step fail in a minute rather than after the default 30.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    root, single_root = Path(root), Path(single_root)
    for name, engine, train, optim in RUNS:
        trainer = _fit(root / name, engine, train, optim, val=name == "ddp")
        state = {k: v.detach().float().clone() for k, v in trainer.student.state_dict().items()}
        torch.save(state, root / f"{name}_rank{rank}.pt")
    # The epoch's last, partial step kept (data.drop_last false): 3 images, 2 on rank 0 and 1 on rank 1.
    trainer = _fit(root / "ddp_tail", {"strategy": "ddp"}, {}, {}, data=KEEP_TAIL)
    torch.save(
        {k: v.detach().float().clone() for k, v in trainer.student.state_dict().items()},
        root / f"ddp_tail_rank{rank}.pt",
    )
    # A ZeRO-2 run resumed from the single-process checkpoint after epoch 1.
    _fit(root / "zero2_from_single", RUNS[2][1], {}, {}, resume=single_root / "checkpoints" / "epoch_0001.pt")
    try:  # recorded, not raised: ranks out of step must fail their own test, not the runs above
        for name, engine in UNREADABLE_RUNS:
            trainer = _fit(root / name, engine, UNREADABLE_TRAIN, {}, unreadable=_unreadable_indices())
            state = {k: v.detach().float().clone() for k, v in trainer.student.state_dict().items()}
            torch.save(state, root / f"{name}_rank{rank}.pt")
    except Exception as err:
        (root / f"unreadable_error_rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    # Last: a rank that stops alone leaves the others waiting in a collective until the timeout.
    for name, engine in NAN_RUNS:
        try:
            _fit_nan_on_rank_one(root / name, engine, gradient_only=name.endswith("gradient"))
        except Exception as err:
            (root / f"{name}_rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    # Very last: rank 1 dies in step 1; rank 0 must fail at its next collective, not wait for ever.
    try:
        _fit_rank_one_dies(root / "lost_rank")
    except Exception as err:
        (root / f"lost_rank_rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        os._exit(0)  # the group lost a member: destroying it could wait on the dead peer
    dist.destroy_process_group()


def _fit_rank_one_dies(out_dir: Path) -> None:
    """A DDP run whose rank 1 exits without a word in step 1, after last.pt of step 1 was written."""
    cfg = _config(out_dir, {"strategy": "ddp"}, {"checkpoint_every_steps": 1})
    trainer = Trainer(
        cfg, ShapesSet(_n_train({}), seed=0), None, student=_tiny_bcos(2), teacher=_tiny_bcos(1), show_progress=False
    )
    original = trainer._objective

    def objective(batch):
        if dist.get_rank() == 1 and trainer.state.step == 1:
            os._exit(0)  # as a killed process: no exception, no message, no collective
        return original(batch)

    trainer._objective = objective
    trainer.fit()


# Runs with a NaN on rank 1 alone in the second step: in the loss (DDP), or in the gradient of a
# finite loss (ZeRO-2, where the check runs on each rank's gradient partition).
NAN_RUNS = [("ddp_nan_loss", {"strategy": "ddp"}), ("zero2_nan_gradient", {"strategy": "deepspeed", "zero_stage": 2})]


def _fit_nan_on_rank_one(out_dir: Path, engine: dict, gradient_only: bool) -> None:
    """A run whose loss (or only its gradient) is NaN on rank 1 alone in step 1; last.pt after every step."""
    cfg = _config(out_dir, engine, {"checkpoint_every_steps": 1})
    trainer = Trainer(
        cfg, ShapesSet(_n_train({}), seed=0), None, student=_tiny_bcos(2), teacher=_tiny_bcos(1), show_progress=False
    )
    original = trainer._objective

    def objective(batch):
        out = original(batch)
        if dist.get_rank() == 1 and trainer.state.step == 1:
            if gradient_only:  # + sqrt(0 · w): a zero whose gradient is inf · 0 = NaN
                weight = next(trainer.student.parameters())
                out = {**out, "loss": out["loss"] + (weight.sum() * 0.0).sqrt()}
            else:
                out = {**out, "loss": out["loss"] * float("nan")}
        return out

    trainer._objective = objective
    trainer.fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("E2KD_BACKEND", KERNELS)
        single = _fit(root / "single", {"strategy": "single"}, {}, {})  # the resume source of zero2_from_single
        failure = _spawn_with_deadline(_worker, (find_free_port(), str(root), str(root / "single")), seconds=400)
    if failure is not None:  # the tests whose runs finished before still check them
        (root / "spawn_error.txt").write_text(failure)
    return root, single


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def _assert_close(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


def test_the_partial_last_step_is_the_mean_over_its_images_on_two_ranks_as_on_one(runs, tmp_path):
    root, _ = runs
    reference = _fit(tmp_path / "single", {"strategy": "single"}, {}, {}, data=KEEP_TAIL)
    expected = {k: v.detach() for k, v in reference.student.state_dict().items()}
    _assert_close(_weights(root / "ddp_tail" / "checkpoints" / "last.pt"), expected)
    for rank in range(WORLD):
        _assert_close(torch.load(root / f"ddp_tail_rank{rank}.pt"), expected)
    assert read_checkpoint(root / "ddp_tail" / "checkpoints" / "last.pt")["step"] == 6  # 2 + the tail, per epoch


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_two_processes_match_one_process_on_the_same_global_batch(runs, name, tmp_path):
    root, _ = runs
    _, engine, train, optim = next(r for r in RUNS if r[0] == name)
    reference = _fit(tmp_path / "single", {"strategy": "single"}, train, optim)
    expected = {k: v.detach() for k, v in reference.student.state_dict().items()}
    # The checkpoint rank 0 wrote (gathered from ZeRO's partitions) and both ranks' live weights.
    _assert_close(_weights(root / name / "checkpoints" / "last.pt"), expected)
    for rank in range(WORLD):
        _assert_close(torch.load(root / f"{name}_rank{rank}.pt"), expected)
    # The weights moved: the comparison is not between two untrained students.
    first = next(iter(expected))
    assert (expected[first] - _tiny_bcos(2).state_dict()[first]).abs().max() > 1e-3
    ckpt = read_checkpoint(root / name / "checkpoints" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (4, 2)
    assert len(ckpt["optimizer"]["state"]) == len(expected)  # whole per-parameter Adam state, not a partition


@pytest.mark.parametrize(("name", "what"), [("ddp_nan_loss", "loss (nan)"), ("zero2_nan_gradient", "gradient")])
def test_a_non_finite_value_on_one_rank_stops_every_rank_at_that_step(runs, name, what):
    root, _ = runs
    for rank in range(WORLD):
        message = (root / f"{name}_rank{rank}.txt").read_text()
        assert message.startswith(f"TrainingError: non-finite {what} at step 1 "), message
        assert "last.pt, step 1) is intact" in message
    last = read_checkpoint(root / name / "checkpoints" / "last.pt")
    assert last["step"] == 1 and all(v.isfinite().all() for v in last["model"].values() if v.is_floating_point())


def test_a_lost_rank_stops_the_others_and_leaves_a_checkpoint_to_resume_from(runs, tmp_path):
    root, _ = runs
    message = (root / "lost_rank_rank0.txt").read_text()  # rank 0 failed rather than hanging
    assert message, "rank 0 reported no error"
    assert not (root / "lost_rank_rank1.txt").exists()  # rank 1 died without one
    last = root / "lost_rank" / "checkpoints" / "last.pt"
    assert read_checkpoint(last)["step"] == 1
    resumed = _fit(tmp_path / "resumed", {"strategy": "single"}, {}, {}, resume=last)
    assert resumed.state.step == 4


def test_rank_zero_alone_writes_the_train_and_eval_records(runs):
    root, _ = runs
    from e2kd_fast.engine import read_metrics

    train = read_metrics(root / "ddp", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one writer: no line doubled
    assert len(read_metrics(root / "ddp", "eval")) == 2


def test_deepspeed_resumes_from_a_single_process_checkpoint(runs):
    root, single = runs
    expected = {k: v.detach() for k, v in single.student.state_dict().items()}
    _assert_close(_weights(root / "zero2_from_single" / "checkpoints" / "last.pt"), expected)


def test_single_process_resumes_from_a_deepspeed_checkpoint(runs, tmp_path):
    root, _ = runs
    source = tmp_path / "from_zero1" / "checkpoints"
    source.mkdir(parents=True)
    shutil.copy(root / "zero1" / "checkpoints" / "epoch_0001.pt", source / "last.pt")
    resumed = _fit(tmp_path / "from_zero1", {"strategy": "single"}, {}, {}, resume="auto")
    # Weights and Adam moments came over: the last 2 steps land where the ZeRO-1 run landed.
    _assert_close(resumed.student.state_dict(), _weights(root / "zero1" / "checkpoints" / "last.pt"))


# ------------------------------------------------------------------------------------- ranks without images


def test_a_rank_without_readable_images_joins_every_collective_and_the_step_is_weighted_by_images_used(runs, tmp_path):
    root, _ = runs
    errors = {p.name: p.read_text() for p in [*root.glob("unreadable_error_rank*.txt"), *root.glob("spawn_error.txt")]}
    assert not errors, errors
    unreadable = _unreadable_indices()
    single = _fit(tmp_path / "single", {"strategy": "single"}, UNREADABLE_TRAIN, {}, unreadable=unreadable)
    expected = {k: v.detach() for k, v in single.student.state_dict().items()}
    # Images each step used, of the 16 it drew: step 3 had none on any rank and is not applied.
    counts = [sum(i not in unreadable for i in _epoch_order(e)[a : a + 16]) for e in (0, 1) for a in (0, 16)]
    assert counts[2] == 0 and min(counts[:2] + counts[3:]) > 0
    for run_dir in [tmp_path / "single"] + [root / name for name, _ in UNREADABLE_RUNS]:
        records = read_metrics(run_dir, "train")
        assert [r["images"] for r in records] == counts, run_dir.name
        assert ["loss" in r for r in records] == [True, True, False, True], run_dir.name
    single_losses = [r.get("loss") for r in read_metrics(tmp_path / "single", "train")]
    ckpt = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert ckpt["skipped_images"] == 2 * 32 - sum(counts)
    for name, _ in UNREADABLE_RUNS:
        losses = [r.get("loss") for r in read_metrics(root / name, "train")]
        for a, b in zip(losses, single_losses, strict=True):
            assert (a is None and b is None) or abs(a - b) < 1e-6, (name, losses, single_losses)
        # The same weights as one process training the same global batches: each step's gradient is the
        # mean over the images it used, wherever they were.
        _assert_close(_weights(root / name / "checkpoints" / "last.pt"), expected)
        for rank in range(WORLD):
            _assert_close(torch.load(root / f"{name}_rank{rank}.pt"), expected)
        assert read_checkpoint(root / name / "checkpoints" / "last.pt")["skipped_images"] == ckpt["skipped_images"]


def test_a_step_is_the_mean_over_the_images_it_used(tmp_path):
    """One process: 2 micro-batches of 8 that keep 5 and 8 images train as one micro-batch of those 13."""
    data = ShapesSet(_n_train(UNREADABLE_TRAIN), seed=0, unreadable=tuple(_epoch_order(0)[p] for p in (1, 2, 4)))
    trainers = {}
    for name, batch, accum in (("split", 8, 2), ("whole", 16, 1)):  # the same 16 epoch positions per step
        cfg = _config(
            tmp_path / name, {"strategy": "single"}, {"grad_accum": accum, "epochs": 1}, data={"batch_size": batch}
        )
        trainers[name] = Trainer(cfg, data, student=_tiny_bcos(2), teacher=_tiny_bcos(1), show_progress=False)
        trainers[name].fit()
    split, whole = (read_metrics(tmp_path / name, "train") for name in ("split", "whole"))
    for a, b in zip(split, whole, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    _assert_close(trainers["split"].student.state_dict(), trainers["whole"].student.state_dict())
    assert [r["images"] for r in split] == [r["images"] for r in whole] == [13, 16]


# ------------------------------------------------------------------------------------------------ no processes


@pytest.mark.parametrize(("n", "world", "batch"), [(23, 2, 4), (50, 3, 6), (16, 4, 8), (7, 2, 2)])
def test_shards_cover_each_epoch_exactly_once(n, world, batch):
    indices = torch.arange(100, 100 + n)
    full = list(EpochSampler(indices, seed=5))
    used = n // batch * batch  # what the trainer consumes: whole global batches (drop_last), like one process
    shards = []
    for rank in range(world):
        sampler = ShardedEpochSampler(indices, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(0)
        items = list(sampler)
        assert len(items) == len(sampler)
        shards.append(items[: used // world])
    # Global batch j is exactly the union of every rank's local batch j: same images, no doubles.
    local = batch // world
    for j in range(used // batch):
        union = sorted(item for shard in shards for item in shard[j * local : (j + 1) * local])
        assert union == sorted(full[j * batch : (j + 1) * batch])
    assert sorted(i for shard in shards for i in shard) == sorted(full[:used])
    # Resuming at a global position continues every shard where it was.
    for rank in range(world):
        sampler = ShardedEpochSampler(indices, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(0, start=batch)
        assert list(sampler)[: used // world - local] == shards[rank][local:]


def test_sharding_rejects_a_start_between_ranks():
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardedEpochSampler(torch.arange(10), 0, world_size=2).set_epoch(0, start=3)


def test_zero_stage_3_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"zero_stage 3 is not supported: ZeRO-3 partitions the parameters.*"):
        _config(Path("x"), {"strategy": "deepspeed", "zero_stage": 3})
    with pytest.raises(ValueError, match=r"engine.deepspeed_config.gradient_accumulation_steps is set by"):
        _config(Path("x"), {"strategy": "deepspeed", "deepspeed_config": {"gradient_accumulation_steps": 4}})


def test_launch_variables_and_batch_split_are_checked(monkeypatch):
    assert dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    assert dist_env({}) == DistEnv(0, 1, 0)
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        dist_env({"WORLD_SIZE": "two"})
    cfg = _config(Path("x"), {"strategy": "single"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="engine.strategy is 'single' but the launcher started 2 processes"):
        setup_distributed(cfg.engine, torch.device("cpu"))
    student = _tiny_bcos(0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    cfg6 = config_from_dict({**_config_dict(cfg), "data": {"batch_size": 6}})
    with pytest.raises(ValueError, match=r"data.batch_size \(6\) is the global batch .* 4 processes"):
        make_strategy(cfg6, DistEnv(0, 4, 0), student, optimizer, lambda *a: {}, torch.device("cpu"), agc=False)


def _config_dict(cfg) -> dict:
    from e2kd_fast.config import config_to_dict

    return config_to_dict(cfg)


def test_deepspeed_config_from_the_run_settings():
    config = deepspeed_config(
        global_batch=256, world_size=8, grad_accum=4, zero_stage=2, extra={"zero_optimization": {"a": 1}}
    )
    assert config["train_batch_size"] == 1024
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 2, "a": 1}
    assert config["bf16"] == {"enabled": False}  # bf16 is the trainer's autocast, weights stay fp32
