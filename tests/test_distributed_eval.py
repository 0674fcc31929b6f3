"""Evaluation split over 2 gloo processes (DDP, ZeRO-2; CPU) gives the metrics of one process on the same weights.

Each rank evaluates its round-robin share of the validation set and the shares are put together
(`e2kd_fast.engine.evaluate.evaluate` with ``gather``); the processes are spawned once, as in
`tests/test_distributed.py`, whose launch helpers are reused.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from e2kd_fast.config import config_from_dict
from e2kd_fast.engine import Trainer
from e2kd_fast.engine.evaluate import evaluate
from e2kd_fast.engine.process_group import find_free_port
from e2kd_fast.metrics.scores import EvalExtras
from tests.helpers import set_rank_environment
from tests.test_distributed import KERNELS, WORLD, _spawn_with_deadline
from tests.test_trainer import ShapesSet, _tiny_bcos

VAL_IMAGES = 9  # odd: rank 0 gets 5 positions, rank 1 gets 4
UNREADABLE_VAL = (4,)  # on rank 0 (position 4): 4 readable images on each rank
EVAL_BATCH = 2  # per rank: 3 batches on rank 0, 2 on rank 1
# Counts are exact; the float metrics are float64 sums of float32 per-batch values, whose rounding
# depends on which images share a batch. Measured: the KD term (~2e-4 here, a KL whose float32 value
# is relatively coarse) 3.5e-7 relative, the explanation term 1e-8, cosine, loss and gt term equal.
FLOAT_RTOL = 2e-6
EXACT = ("images", "skipped", "top1", "top5", "agreement")
FLOATS = ("explanation_cosine", "loss", "kd", "exp", "gt")
# The strategies whose split evaluation is run: the student is whole on every rank under both.
ENGINES = {"ddp": {"strategy": "ddp"}, "zero2": {"strategy": "deepspeed", "zero_stage": 2}}


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("E2KD_BACKEND", KERNELS)


class RecordingSet(Dataset):
    """`ShapesSet` that writes down every index it was asked for (the loader runs in-process)."""

    def __init__(self) -> None:
        self.base = ShapesSet(VAL_IMAGES, seed=9, unreadable=UNREADABLE_VAL)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.base[i]


def _trainer(out_dir: Path, engine: dict, val_set: Dataset) -> Trainer:
    cfg = config_from_dict(
        {
            "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
            "distill": {"method": "e2kd", "lam": 1.0},
            "optim": {"lr": 1e-2, "schedule": "constant"},
            "data": {"batch_size": 8, "eval_batch_size": EVAL_BATCH, "num_workers": 0},
            "train": {"epochs": 1, "out_dir": str(out_dir), "device": "cpu", "compile": False},
            "engine": engine,
        }
    )
    # The student has BatchNorm: after training, each rank's running statistics are its own.
    student, teacher = _tiny_bcos(2), _tiny_bcos(1)
    return Trainer(cfg, ShapesSet(8, seed=0), val_set, student=student, teacher=teacher, show_progress=False)


class RoundedLinear(torch.nn.Module):
    """Logits rounded to halves: many exactly tied scores, whose order decides the AP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(12, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.linear(images.flatten(1)) * 2).round() / 2


def _scored_batches(rank: int | None, world: int, kind: str) -> list[dict]:
    """11 images in batches of 3: all of them (rank None) or rank ``rank``'s round-robin share.

    ``kind`` ``"voc"``: multi-hot targets with ``ignore``; ``"waterbirds"``: labels, groups and places.
    """
    gen = torch.Generator().manual_seed(5)
    n = 11
    images = torch.randn(n, 3, 2, 2, generator=gen)
    multi_hot = (torch.rand(n, 4, generator=gen) < 0.4).float()
    ignore = torch.rand(n, 4, generator=gen) < 0.1
    labels = torch.randint(0, 2, (n,), generator=gen)
    places = torch.randint(0, 2, (n,), generator=gen)
    positions = torch.arange(n) if rank is None else torch.arange(rank, n, world)
    batches = []
    for chunk in positions.split(3):
        if kind == "voc":
            batches.append({"image": images[chunk], "target": multi_hot[chunk], "ignore": ignore[chunk]})
        else:
            batch = {"image": images[chunk], "target": labels[chunk], "place": places[chunk]}
            batches.append({**batch, "group": 2 * labels[chunk] + places[chunk]})
    return batches


def _worker(rank: int, port: int, root: str) -> None:
    set_rank_environment(rank, WORLD, port, KERNELS)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    root = Path(root)
    result = {}
    for name, engine in ENGINES.items():
        val_set = RecordingSet()
        trainer = _trainer(root / name, engine, val_set)
        trainer.fit()  # one training step, then the split evaluation of the epoch's end
        first_pass = sorted(val_set.seen)
        state = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
        torch.save(state, root / f"{name}_student{rank}.pt")
        own_buffers = [b.clone() for b in trainer.student.buffers()]
        again = trainer.evaluate()
        restored = all(torch.equal(a, b) for a, b in zip(own_buffers, trainer.student.buffers(), strict=True))
        result[name] = {
            "strategy": trainer.strategy.name,
            "fit_eval": trainer.state.last_eval,
            "again": again,
            "seen": first_pass,
            "buffers_restored": restored,
            "buffers_differ_from_rank0": _differs_from_rank0(own_buffers),
        }
    for kind in ("voc", "waterbirds"):
        model = RoundedLinear()
        split = evaluate(model, _scored_batches(rank, WORLD, kind), explanation=None, gather=_all_gather_object)
        whole = evaluate(model, _scored_batches(None, WORLD, kind), explanation=None)
        result[kind] = {"split": split, "whole": whole}
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _all_gather_object(obj) -> list:
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, obj)
    return gathered


def _differs_from_rank0(buffers: list[torch.Tensor]) -> bool:
    """Whether this rank's buffers differ from rank 0's (so that using rank 0's is really tested)."""
    rank0 = [b.clone() for b in buffers]
    for b in rank0:
        dist.broadcast(b, src=0)
    return any(not torch.equal(a, b) for a, b in zip(buffers, rank0, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("E2KD_BACKEND", KERNELS)
        failure = _spawn_with_deadline(_worker, (find_free_port(), str(root)), seconds=120)
    assert failure is None, failure
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _assert_same_metrics(split: dict, whole: dict) -> None:
    assert split.keys() == whole.keys()
    for key, value in whole.items():
        if key in FLOATS:
            assert split[key] == pytest.approx(value, rel=FLOAT_RTOL, abs=1e-9), key
        else:
            assert split[key] == value, key


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_ranks_evaluate_disjoint_shares_to_the_metrics_of_one_process(runs, name, tmp_path):
    root, ranks = runs
    ranks = [r[name] for r in ranks]
    assert ranks[0]["strategy"] == ENGINES[name]["strategy"]
    # Each rank read its round-robin share; together every image once (the unreadable one included).
    assert ranks[0]["seen"] == [0, 2, 4, 6, 8] and ranks[1]["seen"] == [1, 3, 5, 7]
    # After training, rank 1's BatchNorm statistics are its own; evaluation ran rank 0's and gave them back.
    assert ranks[1]["buffers_differ_from_rank0"]
    assert all(r["buffers_restored"] for r in ranks)
    # One process on rank 0's weights and statistics (what the checkpoint holds).
    single = _trainer(tmp_path / "single", {"strategy": "single"}, RecordingSet())
    single.student.load_state_dict(torch.load(root / f"{name}_student0.pt"))
    expected = single.evaluate()
    assert expected["images"] == VAL_IMAGES - len(UNREADABLE_VAL) and expected["skipped"] == len(UNREADABLE_VAL)
    assert set(EXACT + FLOATS) <= expected.keys()
    for r in ranks:
        assert r["fit_eval"] == ranks[0]["fit_eval"]  # the very same numbers on every rank
        _assert_same_metrics(r["fit_eval"], expected)
        _assert_same_metrics(r["again"], expected)


@pytest.mark.parametrize("kind", ["voc", "waterbirds"])
def test_map_and_group_accuracies_are_computed_over_all_images_of_the_shares(runs, kind):
    _, ranks = runs
    whole = ranks[0][kind]["whole"]
    assert ("map" in whole) == (kind == "voc") and ("worst_group_acc" in whole) == (kind == "waterbirds")
    for r in ranks:
        # Exactly equal, mAP included: the tied scores are ranked in the single-process order.
        assert r[kind]["split"] == whole


def test_combining_shards_restores_the_evaluation_order():
    rows = torch.arange(7.0)[:, None]  # positions 0..6, shards of 3 ranks: 0,3,6 / 1,4 / 2,5
    shards = []
    for rank in range(3):
        extras = EvalExtras()
        for chunk in torch.arange(rank, 7, 3).split(2):
            extras.update({"target": torch.ones(len(chunk), 1)}, rows[chunk])
        shards.append(extras)
    (combined,) = EvalExtras.combine(shards)._scores
    assert combined[:, 0].tolist() == list(range(7))
    # A rank without images (fewer images than ranks) adds nothing.
    (combined,) = EvalExtras.combine([shards[0], EvalExtras()])._scores
    assert combined[:, 0].tolist() == [0, 3, 6]
    assert EvalExtras.combine([EvalExtras(), EvalExtras()]).compute() == {}
