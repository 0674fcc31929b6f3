"""The training loop: e²KD / KD / supervised training of one student on one device.

What a run writes into ``train.out_dir``:
    config.yaml          the resolved configuration
    metrics.jsonl        one JSON record per log line ("train") and per evaluation ("eval")
    tb/                  the same scalars for TensorBoard
    checkpoints/last.pt  the resume point: written atomically every ``checkpoint_every_steps`` and
                         at the end of every epoch
    checkpoints/epoch_XXXX.pt  per-epoch checkpoints; only the best ``keep_best`` by val top-1 stay
    summary.json         final metrics, counts of skipped images, wall time

Exact resume: data order, augmentation and all other randomness are functions of (seed, epoch,
step) (`e2kd_fast.data.sampling`), and the learning rate is a function of the step; resuming from
``last.pt`` reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from e2kd_fast.config import Config, config_to_dict, save_config
from e2kd_fast.data.dali import maybe_dali_loader
from e2kd_fast.data.loaders import make_loader
from e2kd_fast.data.sampling import mix_seed
from e2kd_fast.distill import TeacherOutputs
from e2kd_fast.distill.multilabel import multilabel_bce
from e2kd_fast.engine.builders import INIT_OBJECTIVE, build_student, build_teacher, resolve_device, seeded_init
from e2kd_fast.engine.distributed import make_strategy
from e2kd_fast.engine.evaluate import evaluate
from e2kd_fast.engine.logging import MetricsLogger, NullMetricsLogger
from e2kd_fast.engine.optim import build_optimizer, set_learning_rate, warmup_cosine_factor
from e2kd_fast.engine.process_group import setup_distributed
from e2kd_fast.engine.step import make_train_step
from e2kd_fast.engine.strategy import StateDictView
from e2kd_fast.models import load_checkpoint, read_checkpoint, save_checkpoint
from e2kd_fast.reference.losses import uniform_off_label_bce

# The loss terms logged per step (means over the images the step used on all ranks), when the objective
# returns them.
_LOGGED = ("loss", "kd", "exp", "feat", "gt", "agreement")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last checkpoint is left intact."""


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    skipped_images: int = 0  # unreadable training images left out so far, on all ranks
    best: list[tuple[float, str]] = field(default_factory=list)  # (val top-1, checkpoint path), best first


class Trainer:
    """Trains ``cfg.student`` on ``train_set`` and evaluates on ``val_set``.

    Args:
        cfg: the run's configuration.
        train_set, val_set: map-style datasets whose items are dicts with ``image`` [C, H, W] (model
            input: 6 channels for B-cos, normalised RGB otherwise), ``target`` and ``index``, or None
            for an unreadable image; with a frozen teacher, train items also carry
            ``teacher_logits`` [C] and ``teacher_map``.
        train_indices: the subset of ``train_set`` to train on (few-shot, held-out split); default all.
        val_indices: likewise for ``val_set``.
        student, teacher: prebuilt models (default: built from ``cfg``).
        show_progress: show a progress bar with img/s and ETA.
    """

    def __init__(
        self,
        cfg: Config,
        train_set: Dataset,
        val_set: Dataset | None = None,
        *,
        train_indices: Tensor | None = None,
        val_indices: Tensor | None = None,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        # One process per device under torchrun / deepspeed: the process group first, then this rank's device.
        self.dist_env, self.device = setup_distributed(cfg.engine, resolve_device(cfg.train.device))
        self.train_set, self.val_set = train_set, val_set
        self.train_indices = torch.arange(len(train_set)) if train_indices is None else train_indices
        self.val_indices = (
            None if val_set is None else (torch.arange(len(val_set)) if val_indices is None else val_indices)
        )
        self.student = (student or build_student(cfg)).to(self.device)
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval().requires_grad_(False)
        self.is_bcos = getattr(self.student, "e2kd_family", "bcos") == "bcos"
        if cfg.train.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(
            self.student.parameters(), cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum
        )
        self.autocast = cfg.train.precision == "bf16" and self.device.type == "cuda"
        self.micro_batches = cfg.train.grad_accum
        # Images of a full micro-batch on one rank (data.batch_size is the global batch).
        self.micro_batch_images = cfg.data.batch_size // self.dist_env.world_size
        self.steps_per_epoch = len(self.train_indices) // (cfg.data.batch_size * self.micro_batches)
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{len(self.train_indices)} training images are fewer than one optimiser step needs "
                f"(data.batch_size={cfg.data.batch_size} × train.grad_accum={cfg.train.grad_accum})"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.run_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.show_progress = show_progress and self.dist_env.is_main  # rank 0 reports for all
        self.state = TrainState()
        self._clock = (time.perf_counter(), 0)  # (time, step) that throughput and ETA are measured from
        self._last_micro = True  # whether the micro-batch in flight ends the optimiser step
        self.mixing = _batch_mixing(cfg, self._num_classes())
        # The forward-to-loss part of the step; compiled whole when train.compile is set. A baseline's
        # connectors are initialised here, from train.seed as the models are.
        with seeded_init(cfg.train.seed, INIT_OBJECTIVE):
            self.step_fn = make_train_step(
                self.student, self.teacher, cfg, log=self._log, steps_per_epoch=self.steps_per_epoch
            )
        if self.step_fn.extra_parameters():  # feature baselines: connectors train with the student
            self.optimizer.add_param_group({"params": self.step_fn.extra_parameters()})
        # single / DDP / DeepSpeed (engine.strategy); the objective runs inside the wrapped module's forward.
        self.strategy = make_strategy(
            cfg,
            self.dist_env,
            self.student,
            self.optimizer,
            self._forward_to_loss,
            self.device,
            agc=cfg.optim.agc and self.is_bcos,
            extra=self.step_fn.objective,
        )

    def _log(self, line: str) -> None:
        if self.show_progress:
            tqdm.write(f"[train] {line}")

    # ------------------------------------------------------------------ public

    def fit(self, resume: str | Path | None = None) -> dict:
        """Trains to ``train.epochs``; ``resume`` = a checkpoint path or ``"auto"`` (``last.pt`` if present)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.strategy.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        if resume == "auto":
            resume = self.ckpt_dir / "last.pt" if (self.ckpt_dir / "last.pt").is_file() else None
        if resume is not None:
            self._load_state(Path(resume))
        logger = MetricsLogger(self.run_dir) if self.strategy.is_main else NullMetricsLogger()
        started = time.perf_counter()
        steps_at_start = self.state.step
        eval_metrics: dict = {}
        try:
            while self.state.epoch < cfg.train.epochs:
                self._train_epoch(logger, started, steps_at_start)
                epoch_done = self.state.epoch + 1
                if self.val_set is not None and epoch_done % cfg.train.eval_every_epochs == 0:
                    # Rank 0 evaluates the whole validation set; the others wait and receive its metrics.
                    eval_metrics = self.strategy.broadcast(self.evaluate() if self.strategy.is_main else None)
                    logger.log("eval", self.state.step, epoch=epoch_done, **eval_metrics)
                self.state.epoch, self.state.step_in_epoch = epoch_done, 0
                self._save_epoch(eval_metrics)
        finally:
            logger.close()
        summary = {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "skipped_train_images": self.state.skipped_images,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "final_eval": eval_metrics,
            "best": [{"top1": m, "checkpoint": p} for m, p in self.state.best],
        }
        if self.strategy.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def evaluate(self) -> dict:
        """Top-1/top-5, agreement and explanation similarity on the validation set."""
        loader = self._loader(self.val_set, self.val_indices, shuffle=False, epoch=0, start=0, train=False)
        explanation = self.cfg.distill.explanation if self.teacher is not None else None
        return evaluate(
            self.student,
            loader,
            teacher=self.teacher,
            explanation=explanation,
            device=self.device,
            prepare=self._prepare,
        )

    # ------------------------------------------------------------------ training

    def _train_epoch(self, logger: MetricsLogger, started: float, steps_at_start: int) -> None:
        cfg, state = self.cfg, self.state
        batch_size = cfg.data.batch_size
        start = state.step_in_epoch * self.micro_batches * batch_size
        loader = self._loader(
            self.train_set, self.train_indices, shuffle=True, epoch=state.epoch, start=start, train=True
        )
        batches = iter(loader)
        self.student.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state.step_in_epoch,
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        while state.step_in_epoch < self.steps_per_epoch:
            torch.manual_seed(mix_seed(cfg.train.seed, 7, state.step))  # dropout, drop-path, mixup
            lr = self._set_lr()
            totals: dict[str, float] = {}  # Σ value · weight / micro_batches over this rank's micro-batches
            images = skipped = 0  # on this rank, in this step
            for micro in range(self.micro_batches):
                self._last_micro = micro == self.micro_batches - 1  # DDP all-reduces on the last one only
                batch = next(batches)
                skipped += int(batch.get("skipped", 0))
                n = int(batch["image"].shape[0])
                images += n
                if n == 0:  # no readable image here: this rank still joins every collective of the step
                    self._backward_empty()
                    continue
                weight = n / self.micro_batch_images  # 1.0 unless images were skipped; see _finish_step
                out = self._objective(batch)
                keys = [k for k in _LOGGED if k in out]  # "loss" first
                values = torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()  # one sync
                if not math.isfinite(values[0]):
                    raise TrainingError(
                        f"non-finite loss ({values[0]}) at step {state.step} (epoch {state.epoch + 1}); the last "
                        f"checkpoint ({self.ckpt_dir / 'last.pt'}) is intact. Lower optim.lr or check the data, "
                        "then resume from it."
                    )
                loss = out["loss"] if weight == 1.0 else out["loss"] * weight
                self.strategy.backward(loss, self.micro_batches)  # one device: (loss / micro_batches).backward()
                for key, value in zip(keys, values, strict=True):
                    totals[key] = totals.get(key, 0.0) + value * weight / self.micro_batches
            totals, used = self._finish_step(totals, images, skipped)  # the optimiser step, and the logged means
            state.step += 1
            state.step_in_epoch += 1
            bar.update(1)
            if state.step == steps_at_start + 1:  # measure from here: the first step includes compiling
                self._clock = (time.perf_counter(), state.step)
            elapsed = time.perf_counter() - self._clock[0]
            done = state.step - self._clock[1]
            rate = done * cfg.data.batch_size * self.micro_batches / elapsed if done else float("nan")
            eta = (self.total_steps - state.step) * elapsed / done if done else float("nan")
            bar.set_postfix(loss=f"{totals.get('loss', float('nan')):.4f}", img_s=f"{rate:.0f}", eta=_hms(eta))
            rate = None if math.isnan(rate) else round(rate, 1)
            if state.step % cfg.train.log_every_steps == 0 or state.step_in_epoch == self.steps_per_epoch:
                logger.log("train", state.step, epoch=state.epoch + 1, lr=lr, img_s=rate, images=used, **totals)
            if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0:
                self._save(self.ckpt_dir / "last.pt")
        bar.close()

    def _backward_empty(self) -> None:
        """A micro-batch without readable images on this rank: `ObjectiveModule.empty_loss` through the
        wrapped module, so that the rank runs the same forward and backward collectives as the others
        (DDP's buffer broadcast and gradient all-reduce, DeepSpeed's reductions and micro-step count)
        and adds an exact zero to the gradient."""
        empty = torch.zeros(0, device=self.device)
        out = self.strategy.forward(empty, None, self.state.step, None, last_micro=self._last_micro)
        self.strategy.backward(out["loss"], self.micro_batches)

    def _finish_step(self, totals: dict[str, float], images: int, skipped: int) -> tuple[dict[str, float], int]:
        """Weights the step by the images used on all ranks and applies it; returns (logged means, images used).

        Before its backward, each micro-batch's mean loss was multiplied by ``n / micro_batch_images``
        (its images over those of a full micro-batch on one rank). After the mean over ranks (DDP,
        ZeRO) and the division by ``micro_batches``, the gradient is therefore the sum of the per-image
        gradients over ``data.batch_size · micro_batches``. One all-reduce (the one that gives the
        logged means) brings ``N``, the images used on all ranks, and the number skipped; the gradient
        and the logged values are then multiplied by ``data.batch_size · micro_batches / N``: means over
        the images used, whichever rank lost images. With no image skipped every factor is exactly 1.0
        and nothing is multiplied, so such a step is bit-for-bit what it was without this weighting.
        A step without any image on any rank is not applied (`Strategy.skip_step`) and logs no loss.
        """
        k = len(_LOGGED)
        present = [1.0 if key in totals else 0.0 for key in _LOGGED]
        # Same length and order on every rank (a rank without images has no keys of its own).
        sums = self.strategy.reduce_sum([*(totals.get(key, 0.0) for key in _LOGGED), *present, images, skipped])
        used = int(sums[2 * k])
        self.state.skipped_images += int(sums[2 * k + 1])
        if used == 0:
            self.strategy.skip_step()
            return {}, 0
        factor = self.cfg.data.batch_size * self.micro_batches / used
        if factor != 1.0:
            self.strategy.scale_gradients(factor)
        self._optimizer_step()
        world = self.strategy.world_size
        logged = zip(_LOGGED, sums[:k], sums[k : 2 * k], strict=True)
        return {key: total / world * factor for key, total, seen in logged if seen}, used

    def _objective(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        images = self._prepare(batch["image"].to(self.device, non_blocking=True))
        labels = batch["target"].to(self.device)
        frozen = None
        if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
            frozen = TeacherOutputs(
                batch["teacher_logits"].to(self.device).float(),
                batch["teacher_map"].to(self.device).float() if "teacher_map" in batch else None,
            )
        if self.mixing is not None:
            images, labels = self.mixing(images, labels)
        # Through the strategy's wrapped module, whose forward is `_forward_to_loss` (DDP / DeepSpeed hooks).
        return self.strategy.forward(images, labels, self.state.step, frozen, last_micro=self._last_micro)

    def _forward_to_loss(
        self, images: Tensor, labels: Tensor, step: int, frozen: TeacherOutputs | None
    ) -> dict[str, Tensor]:
        """Batch → loss dict: the forward of the module the strategy wraps (explanations included)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.cfg.distill.method == "none":
                logits = self.student(images)
                if self.is_bcos:
                    loss = uniform_off_label_bce(logits, labels)
                elif self.cfg.distill.multilabel:  # multi-hot targets (VOC): per-class BCE, not softmax CE
                    loss = multilabel_bce(logits, labels)
                else:
                    loss = F.cross_entropy(logits, labels)
                return {"loss": loss, "gt": loss.detach()}
            return self.step_fn(images, labels, step, frozen)

    def _optimizer_step(self) -> None:
        """Clipping (AGC, global norm), the optimiser, cleared gradients: the strategy's step."""
        self.strategy.step()

    def _set_lr(self) -> float:
        optim, state = self.cfg.optim, self.state
        if optim.schedule == "constant":
            return set_learning_rate(self.optimizer, optim.lr, 1.0)
        if optim.schedule_unit == "epoch":
            t, total, warmup = state.epoch, self.cfg.train.epochs, optim.warmup_epochs
        else:
            t, total, warmup = state.step, self.total_steps, optim.warmup_steps
        return set_learning_rate(
            self.optimizer, optim.lr, warmup_cosine_factor(t, total, warmup, optim.warmup_start_factor)
        )

    def _prepare(self, images: Tensor) -> Tensor:
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _loader(self, dataset, indices, *, shuffle: bool, epoch: int, start: int, train: bool) -> DataLoader:
        data = self.cfg.data
        world = self.dist_env.world_size if train else 1  # training data is sharded; rank 0 evaluates alone
        common = dict(
            batch_size=data.batch_size // world if train else (data.eval_batch_size or data.batch_size),
            shuffle=shuffle,
            epoch=epoch,
            start=start,
            seed=self.cfg.train.seed if train else 0,
            drop_last=train,
            rank=self.dist_env.rank if train else 0,
            world_size=world,
        )
        if data.loader != "torchvision":  # DALI (data.loader dali|auto); None: falls back to torchvision
            dali = maybe_dali_loader(self.cfg, dataset, indices, train=train, device=self.device, **common)
            if dali is not None:
                return dali
        return make_loader(
            dataset, indices, num_workers=data.num_workers, pin_memory=self.device.type == "cuda", **common
        )

    def _num_classes(self) -> int:
        return int(getattr(self.student, "num_classes", 0) or self.cfg.student.num_classes or 1000)

    # ------------------------------------------------------------------ checkpoints

    def _save(self, *paths: Path) -> None:
        """Writes the same checkpoint to each of ``paths`` (the state is gathered once)."""
        s = self.state
        # Whole weights and optimiser state on every strategy (DeepSpeed gathers its partitions: collective).
        model_state, optimizer_state = self.strategy.model_state(), self.strategy.optimizer_state()
        if self.strategy.is_main:
            extra = {} if self.step_fn.objective is None else {"distill_objective": self.step_fn.objective.state_dict()}
            for path in paths:
                save_checkpoint(
                    StateDictView(self.student, model_state),
                    path,
                    optimizer=optimizer_state,
                    step=s.step,
                    epoch=s.epoch,
                    step_in_epoch=s.step_in_epoch,
                    skipped_images=s.skipped_images,
                    best=[[m, p] for m, p in s.best],
                    config=config_to_dict(self.cfg),
                    **extra,
                )
        self.strategy.barrier()  # no rank goes on (or reads the files) before they are complete

    def _save_epoch(self, eval_metrics: dict) -> None:
        """Writes last.pt and epoch_XXXX.pt, keeping the best ``keep_best`` epoch files by val top-1."""
        epoch_path = self.ckpt_dir / f"epoch_{self.state.epoch:04d}.pt"
        score = float(eval_metrics.get("top1", -math.inf)) if eval_metrics else -math.inf
        ranked = sorted([*self.state.best, (score, str(epoch_path))], key=lambda b: -b[0])
        keep, drop = ranked[: self.cfg.train.keep_best], ranked[self.cfg.train.keep_best :]
        self.state.best = keep
        keep_epoch = any(p == str(epoch_path) for _, p in keep)
        self._save(*([epoch_path] if keep_epoch else []), self.ckpt_dir / "last.pt")
        for _, path in drop:
            if self.strategy.is_main:
                Path(path).unlink(missing_ok=True)

    def _load_state(self, path: Path) -> None:
        payload = read_checkpoint(path)
        saved_student = payload.get("config", {}).get("student", {}).get("name")
        if saved_student != self.cfg.student.name:
            raise TrainingError(
                f"{path} was written for student {saved_student!r}, this run trains {self.cfg.student.name!r}"
            )
        load_checkpoint(self.student, payload)
        if self.step_fn.objective is not None:
            if "distill_objective" not in payload:
                raise TrainingError(
                    f"{path} holds no distill_objective state for the {self.cfg.distill.method!r} baseline"
                )
            self.step_fn.objective.load_state_dict(payload["distill_objective"])
        self.strategy.load_optimizer_state(payload["optimizer"], payload.get("model"))
        self.state = TrainState(
            step=int(payload["step"]),
            epoch=int(payload["epoch"]),
            step_in_epoch=int(payload["step_in_epoch"]),
            skipped_images=int(payload.get("skipped_images", 0)),
            best=[(float(m), str(p)) for m, p in payload.get("best", [])],
        )


def _batch_mixing(cfg: Config, num_classes: int) -> Callable | None:
    """Mixup / CutMix on the batch (live teachers see the same mixed batch), or None."""
    if cfg.data.mixup_alpha <= 0 and cfg.data.cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2

    choices = []
    if cfg.data.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.data.mixup_alpha, num_classes=num_classes))
    if cfg.data.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.data.cutmix_alpha, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def _hms(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
