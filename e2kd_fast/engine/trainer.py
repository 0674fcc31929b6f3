"""The training loop: e²KD / KD / supervised training of one student on one device.

What a run writes into ``train.out_dir``:
    config.yaml          the resolved configuration of the run's start (a resume keeps it)
    train.log            the readable log (also on the console): start-up summary, one line per epoch,
                         compiles, evaluations, checkpoints, skipped images; a resume appends to it
    metrics.jsonl        one JSON record per log line ("train"), per evaluation ("eval") and per resume
                         ("resume": the config changes it accepted)
    tb/                  the same scalars for TensorBoard
    checkpoints/last.pt  the resume point: written atomically every ``checkpoint_every_steps``, every
                         ``checkpoint_every_minutes``, at the end of every epoch and on SIGTERM / SIGINT
    checkpoints/epoch_XXXX.pt  per-epoch checkpoints; only the best ``keep_best`` by val top-1 stay
                         (with ``train.ema_decay``, every checkpoint also holds the averaged weights,
                         ``model_ema``, beside the raw ones it resumes from)
    summary.json         status (finished, interrupted, failed and why), final metrics, counts of
                         skipped images, wall time

Exact resume: data order, augmentation and all other randomness are functions of (seed, epoch,
step) (`e2kd_fast.data.sampling`), the initial weights are functions of the seed, and the learning
rate is a function of the step; resuming from ``last.pt`` reproduces the losses of an uninterrupted
run. A resume whose config changes any of that is refused (`e2kd_fast.engine.resume`). The EMA of the
weights (`e2kd_fast.engine.ema`) is saved and restored with them, so it resumes exactly too.

With ``train.ema_decay`` set, evaluations (and so the ranking of the kept-best checkpoints) measure the
averaged weights; the training accuracy (``epoch_top1``) stays that of the raw student being trained.

Nothing non-finite is saved and nothing outside the run folder is deleted; docs/reliability.md lists
what survives a kill, a signal, a full disk and a changed config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from e2kd_fast.config import Config, config_from_dict, config_to_dict, load_config, save_config
from e2kd_fast.data.dali import maybe_dali_loader
from e2kd_fast.data.loaders import make_loader, resolve_num_workers
from e2kd_fast.data.sampling import mix_seed
from e2kd_fast.distill import TeacherOutputs
from e2kd_fast.distill.ground_truth import ground_truth_loss
from e2kd_fast.engine.builders import (
    INIT_OBJECTIVE,
    apply_batch_norm_groups,
    build_student,
    build_teacher,
    compile_cache_dir,
    cuda_math_settings,
    resolve_compile,
    resolve_device,
    seeded_init,
    student_spec,
)
from e2kd_fast.engine.cpu_heap import pin_cpu_heap
from e2kd_fast.engine.distributed import make_strategy
from e2kd_fast.engine.ema import EmaWeights
from e2kd_fast.engine.evaluate import ValidationLoss, evaluate, topk_hits
from e2kd_fast.engine.logging import LOGGER_NAME, MetricsLogger, NullMetricsLogger, run_log
from e2kd_fast.engine.optim import build_optimizer, set_learning_rate, warmup_cosine_factor
from e2kd_fast.engine.process_group import setup_distributed
from e2kd_fast.engine.progress import ThroughputWindow, format_duration
from e2kd_fast.engine.resume import config_changes, describe
from e2kd_fast.engine.run_folder import RunFolderError, check_fresh_start, clear_run_files, with_run_dir
from e2kd_fast.engine.signals import StopSignals
from e2kd_fast.engine.step import CompileWatch, make_train_step
from e2kd_fast.engine.strategy import NonFiniteGradientError, StateDictView
from e2kd_fast.models import CheckpointWriteError, load_checkpoint, read_checkpoint, save_checkpoint
from e2kd_fast.models.checkpoint import EMA_KEY

# The loss terms logged per step (means over the images the step used on all ranks), when the objective
# returns them.
_LOGGED = ("loss", "kd", "exp", "feat", "gt", "agreement")

# The run's readable log (`e2kd_fast.engine.logging.run_log` sends it to train.log and the console).
_LOG = logging.getLogger(f"{LOGGER_NAME}.train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last checkpoint is left intact."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step, once ``last.pt`` held that step.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        exit_code: the shell's status for that signal (128 + its number: 143, 130).
        checkpoint: the checkpoint to resume from.
    """

    def __init__(self, message: str, signal_name: str, exit_code: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.signal_name, self.exit_code, self.checkpoint = signal_name, exit_code, checkpoint


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    skipped_images: int = 0  # unreadable training images left out so far, on all ranks
    overflow_steps: int = 0  # fp16 steps whose gradient overflowed: not applied, the loss scale halved
    # (val top-1, checkpoint path relative to the run folder), best first: a copied run folder is self-contained
    best: list[tuple[float, str]] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)  # the latest evaluation's metrics (summary.json's final_eval)
    # This epoch's training accuracy so far, on all ranks: [images, top-1 hits, top-5 hits]
    train_hits: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    wall_seconds: float = 0.0  # training time up to this state, over all sessions of the run


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
        show_progress: show a progress bar with the loss, img/s and the run's ETA. The log lines
            (`e2kd_fast.engine.logging.run_log`) go to ``train.log`` and the console either way.
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
        cfg = with_run_dir(cfg)  # train.out_dir None: a new dated folder under runs/
        self.cfg = cfg
        # One process per device under torchrun / deepspeed: the process group first, then this rank's device.
        self.dist_env, self.device = setup_distributed(cfg.engine, resolve_device(cfg.train.device))
        self.train_set, self.val_set = train_set, val_set
        self.train_indices = torch.arange(len(train_set)) if train_indices is None else train_indices
        self.val_indices = (
            None if val_set is None else (torch.arange(len(val_set)) if val_indices is None else val_indices)
        )
        self.student = (student or build_student(cfg)).to(self.device)
        self._batch_norm_groups = apply_batch_norm_groups(self.student, cfg, self.dist_env.world_size)
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval().requires_grad_(False)
        self.is_bcos = getattr(self.student, "e2kd_family", "bcos") == "bcos"
        if cfg.train.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(
            self.student.parameters(), cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum
        )
        # bf16 autocast on CUDA; fp16 autocast (with the strategy's loss scale) on any device.
        self.autocast = {"bf16": torch.bfloat16 if self.device.type == "cuda" else None, "fp16": torch.float16}.get(
            cfg.train.precision
        )
        self.micro_batches = cfg.train.grad_accum
        # Images of a full micro-batch on one rank (data.batch_size is the global batch).
        self.micro_batch_images = cfg.data.batch_size // self.dist_env.world_size
        # data.drop_last: the epoch's last, partial step is left out (floor) or kept (ceil, as the official loader).
        images, step_images = len(self.train_indices), cfg.data.batch_size * self.micro_batches
        self.steps_per_epoch = images // step_images if cfg.data.drop_last else -(-images // step_images)
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
        # Throughput of recent training steps (compiling steps, evaluations and checkpoints left out) and
        # the durations of the latest evaluation and epoch-end checkpoint: the run's ETA (engine.progress).
        self._throughput = ThroughputWindow()
        self._eval_seconds = self._epoch_save_seconds = 0.0
        self._epoch_loss = [0.0, 0.0, 0]  # this epoch (since the start or resume): Σ loss·images, images, steps
        self._compile_watch: CompileWatch | None = None  # graphs compiled during a step (fit sets it)
        self._last_micro = True  # whether the micro-batch in flight ends the optimiser step
        self._last_saved: tuple[Path, int] | None = None  # (checkpoint, step) this run can go on from
        self._saved_at = time.monotonic()  # when last.pt was last written (checkpoint_every_minutes)
        self._started, self._wall_base = time.perf_counter(), 0.0  # this process's start; time of the runs it resumes
        self._stop = StopSignals()  # SIGTERM / SIGINT while fit runs
        self._resume_record: dict | None = None  # what a resume accepted, for metrics.jsonl
        self.mixing = _batch_mixing(cfg, self._num_classes())
        # train.compile (auto: on CUDA only) and why, for the start-up summary.
        self.compile, self._compile_note = resolve_compile(cfg.train.compile, self.device)
        if self.compile:  # before anything compiles: later runs load the step instead of compiling it
            self._compile_note += f"; compile cache {compile_cache_dir()}"
        # The forward-to-loss part of the step; compiled (a live teacher's graph, the student's) when
        # train.compile says so, for full micro-batches only (others run eagerly: no recompile). A
        # baseline's connectors are initialised here, from train.seed as the models are.
        with seeded_init(cfg.train.seed, INIT_OBJECTIVE):
            self.step_fn = make_train_step(
                self.student,
                self.teacher,
                cfg,
                log=self._log,
                steps_per_epoch=self.steps_per_epoch,
                compile=self.compile,
                batch_size=self.micro_batch_images,
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
        # After the strategy: DDP and DeepSpeed have made every rank's weights rank 0's by now.
        self.ema = None if cfg.train.ema_decay is None else EmaWeights(self.student, cfg.train.ema_decay)

    def _log(self, line: str) -> None:
        """One line of the run's log (rank 0 only): ``train.log`` and the console while `fit` runs."""
        if self.dist_env.is_main:
            _LOG.info(line)

    # ------------------------------------------------------------------ public

    def fit(self, resume: str | Path | None = None, *, resume_force: bool = False, overwrite: bool = False) -> dict:
        """Trains to ``train.epochs``; returns the summary, also written to ``summary.json``.

        Args:
            resume: a checkpoint path, or ``"auto"``: the run's ``last.pt`` if there is one, else a
                fresh start. The run's ``config.yaml`` stays as the run's start wrote it.
            resume_force: resume although the config changed in settings that change the result
                (`e2kd_fast.engine.resume`); the changes are recorded in ``metrics.jsonl``.
            overwrite: a run that does not resume deletes the files of an earlier run in ``train.out_dir``
                first (`e2kd_fast.engine.run_folder`); without it such a start is refused. ``"auto"``
                with no ``last.pt`` to go on from starts over the same way.

        Raises:
            RunFolderError: a new run into a folder holding another run's files, without ``overwrite``.
            TrainingError: the run cannot go on: a refused resume (naming each changed key), a
                non-finite loss, gradient or state, a file that cannot be written (naming it and the
                cause). The message says which step and which checkpoint is left intact;
                ``summary.json`` records the failure.
            TrainingInterrupted: SIGTERM or SIGINT, once the current step is done and in ``last.pt``.
        """
        cfg = self.cfg
        self._started, self._saved_at, self._stop = time.perf_counter(), time.monotonic(), StopSignals()
        logger: MetricsLogger | NullMetricsLogger = NullMetricsLogger()
        training = False  # from here on a failure is recorded in summary.json
        context = ExitStack()  # train.log and the console; TF32 and cudnn.benchmark on CUDA
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume == "auto":
                resume = self.ckpt_dir / "last.pt" if (self.ckpt_dir / "last.pt").is_file() else None
                # Nothing to go on from: a run killed before its first checkpoint starts over; checkpoints
                # without a last.pt (another run's epoch files) are kept, and the start is refused below.
                overwrite = overwrite or (resume is None and not any(self.ckpt_dir.glob("*.pt")))
            # Before train.log is opened: an earlier run's log is one of the files that decide.
            cleared = self._start_afresh(overwrite) if resume is None else []
            context.enter_context(run_log(self.run_dir, enabled=self.strategy.is_main))
            if cleared:
                self._log(f"starting over in {self.run_dir}: removed {', '.join(p.name for p in cleared)}")
            device_note = context.enter_context(
                cuda_math_settings(self.device, tf32=cfg.train.tf32, cudnn_benchmark=cfg.train.cudnn_benchmark)
            )
            if self.device.type == "cpu":
                device_note = pin_cpu_heap()
            if self.strategy.is_main:
                self._remove_stale_temporaries()
            if resume is not None:
                self._load_state(Path(resume), force=resume_force)
            self._log_start(resume, device_note)
            config_yaml = self.run_dir / "config.yaml"
            if self.strategy.is_main and (resume is None or not config_yaml.is_file()):
                save_config(cfg, config_yaml)
            if self._batch_norm_groups:
                self._log(self._batch_norm_groups)
            if self.strategy.is_main:
                # A resume re-runs what followed its checkpoint: those records go, TensorBoard's too.
                logger = MetricsLogger(self.run_dir, purge_step=None if resume is None else self.state.step + 1)
            if resume is not None:
                logger.keep_only(self._recorded_before_resume)
                logger.log("resume", self.state.step, **(self._resume_record or {}))
            self._wall_base = self.state.wall_seconds
            self._epoch_loss = [0.0, 0.0, 0]
            self._compile_watch = CompileWatch() if self.compile else None
            training = True
            with self._stop:
                while self.state.epoch < cfg.train.epochs:
                    resumed_mid_epoch = self.state.step_in_epoch > 0
                    self._train_epoch(logger)
                    epoch_done = self.state.epoch + 1
                    evaluated = self.val_set is not None and epoch_done % cfg.train.eval_every_epochs == 0
                    if evaluated:
                        started = time.perf_counter()
                        metrics = self.evaluate()  # every rank its share; the same metrics on every rank
                        self.state.last_eval = _plain_values(metrics)  # saved in checkpoints: plain values only
                        logger.log("eval", self.state.step, epoch=epoch_done, **self.state.last_eval)
                        self._eval_seconds = time.perf_counter() - started
                        self._log(self._eval_line(epoch_done, self.state.last_eval))
                    self.state.epoch, self.state.step_in_epoch = epoch_done, 0
                    started = time.perf_counter()
                    self._save_epoch(self.state.last_eval)
                    self._epoch_save_seconds = time.perf_counter() - started
                    shown = self.state.last_eval if evaluated else {}
                    self._log(self._epoch_line(epoch_done, shown, resumed_mid_epoch))
                    self._epoch_loss = [0.0, 0.0, 0]
                    if self.state.epoch < cfg.train.epochs and self.strategy.any_rank(self._stop.requested)[0]:
                        raise self._interrupted()  # last.pt holds the finished epoch
            wall = self._wall_base + time.perf_counter() - self._started
            self._log(f"finished: {self.state.step} steps, {self.state.epoch} epochs in {format_duration(wall)}")
        except TrainingError as err:
            if training:
                self._record_failure(err, "interrupted" if isinstance(err, TrainingInterrupted) else "failed")
            self._log(f"{'stopped' if isinstance(err, TrainingInterrupted) else 'failed'}: {err}")
            raise
        except OSError as err:  # metrics.jsonl, config.yaml, train.log: name the file and the cause
            error = TrainingError(self._io_failure(err))
            if training:
                self._record_failure(error, "failed")
            self._log(f"failed: {error}")
            raise error from err
        finally:
            logger.close()
            context.close()
        summary = self._summary("finished")
        if self.strategy.is_main:
            try:
                self._write_summary(summary)
            except OSError as err:
                raise TrainingError(self._io_failure(err)) from err
        return summary

    def _start_afresh(self, overwrite: bool) -> list[Path]:
        """A new run in ``run_dir``: refused if an earlier run's files are there, unless ``overwrite`` deletes
        them; returns the files deleted."""
        if not overwrite:
            # Rank 0 looks and all ranks follow: another rank looking later would see rank 0's new files.
            refusal = None
            if self.strategy.is_main:
                try:
                    check_fresh_start(self.run_dir)
                except RunFolderError as err:
                    refusal = err
            (refused,) = self.strategy.any_rank(refusal is not None)
            if refused:
                raise refusal or RunFolderError(f"{self.run_dir} already holds a run (found by rank 0)")
            return []
        cleared = clear_run_files(self.run_dir) if self.strategy.is_main else []
        self.strategy.barrier()  # no rank writes into the folder before it is cleared
        return cleared

    def evaluate(self) -> dict:
        """Top-1/top-5, agreement, explanation similarity and the validation loss (`ValidationLoss`: the
        training objective, with the teacher model run live on the validation images) on the validation set.

        In a multi-process run every rank must call it: each evaluates its round-robin share of the
        validation images with the bare student (whole on every rank under DDP and ZeRO-1/2, so its
        forward is no collective and the shares may differ by a batch), then one all-gather puts the
        shares together and every rank returns the same metrics. Every rank runs rank 0's BatchNorm
        running statistics, those the checkpoint holds (`Strategy.main_rank_buffers`).

        With ``train.ema_decay`` these are the averaged weights' metrics: the student holds them during
        the evaluation (rank 0's averaged statistics on every rank) and its own weights again
        afterwards, bit for bit.
        """
        loader = self._loader(self.val_set, self.val_indices, shuffle=False, epoch=0, start=0, train=False)
        explanation = self.cfg.distill.explanation if self.teacher is not None else None
        with ExitStack() as weights:
            if self.ema is not None:
                weights.enter_context(self.ema.applied_to(self.student))
            # After the average is in place: every rank takes rank 0's (averaged) statistics.
            weights.enter_context(self.strategy.main_rank_buffers())
            return evaluate(
                self.student,
                loader,
                teacher=self.teacher,
                explanation=explanation,
                device=self.device,
                prepare=self._prepare,
                loss=ValidationLoss.from_config(self.cfg, self.is_bcos),
                gather=self.strategy.all_gather_object if self.strategy.world_size > 1 else None,
            )

    # ------------------------------------------------------------------ training

    def _train_epoch(self, logger: MetricsLogger) -> None:
        cfg, state = self.cfg, self.state
        batch_size = cfg.data.batch_size
        start = state.step_in_epoch * self.micro_batches * batch_size
        loader = self._loader(
            self.train_set, self.train_indices, shuffle=True, epoch=state.epoch, start=start, train=True
        )
        batches = iter(loader)
        self.student.train()
        if state.step_in_epoch == 0:  # a resume mid-epoch keeps the counts of the epoch's earlier steps
            state.train_hits = [0.0, 0.0, 0.0]
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state.step_in_epoch,
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
            mininterval=1.0,
            # No rate or remaining time of tqdm's own: they would count compiles and evaluations.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        while state.step_in_epoch < self.steps_per_epoch:
            step_started = time.perf_counter()  # the step's time: its batches, forward, backward and update
            torch.manual_seed(mix_seed(cfg.train.seed, 7, state.step))  # dropout, drop-path, mixup
            lr = self._set_lr()
            totals: dict[str, float] = {}  # Σ value · weight / micro_batches over this rank's micro-batches
            images = skipped = 0  # on this rank, in this step
            hits = [0.0, 0.0]  # the student's top-1 / top-5 hits on this rank's training images of this step
            for micro in range(self.micro_batches):
                self._last_micro = micro == self.micro_batches - 1  # DDP all-reduces on the last one only
                # None: with data.drop_last false, this rank's share of the epoch's last step ran out.
                batch = next(batches, None)
                skipped += 0 if batch is None else int(batch.get("skipped", 0))
                n = 0 if batch is None else int(batch["image"].shape[0])
                images += n
                if n == 0:  # no (readable) image here: this rank still joins every collective of the step
                    self._backward_empty()
                    continue
                weight = n / self.micro_batch_images  # 1.0 unless images were skipped; see _finish_step
                out = self._objective(batch)
                keys = [k for k in _LOGGED if k in out]  # "loss" first
                logged = [out[k].detach().float().reshape(()) for k in keys]
                values = torch.stack([*logged, *_train_hits(out)]).tolist()  # one sync
                values, hits = values[: len(keys)], [h + v for h, v in zip(hits, values[len(keys) :], strict=True)]
                # A non-finite loss stops the run in _finish_step, before the update, on every rank at once.
                loss = out["loss"] if weight == 1.0 else out["loss"] * weight
                self.strategy.backward(loss, self.micro_batches)  # one device: (loss / micro_batches).backward()
                for key, value in zip(keys, values, strict=True):
                    totals[key] = totals.get(key, 0.0) + value * weight / self.micro_batches
            # the optimiser step, the logged means, and the hits summed over ranks in the same all-reduce
            skipped_before = state.skipped_images
            totals, used, step_hits = self._finish_step(totals, images, skipped, hits)
            state.train_hits = [a + b for a, b in zip(state.train_hits, [used, *step_hits], strict=True)]
            state.step += 1
            state.step_in_epoch += 1
            self._measure_step(time.perf_counter() - step_started, used)
            if state.skipped_images > skipped_before:
                self._log(
                    f"step {state.step}: {state.skipped_images - skipped_before} unreadable image(s) left out "
                    f"({state.skipped_images} in the run so far)"
                )
            if "loss" in totals:
                self._epoch_loss = [
                    self._epoch_loss[0] + totals["loss"] * used,
                    self._epoch_loss[1] + used,
                    self._epoch_loss[2] + 1,
                ]
            rate = self._throughput.images_per_second
            bar.update(1)
            bar.set_postfix_str(
                f"loss {totals.get('loss', float('nan')):.4f}, {_rate(rate)} img/s, "
                f"ETA {format_duration(self._eta(epoch_ends_left=cfg.train.epochs - state.epoch))}",
                refresh=False,
            )
            epoch_end = state.step_in_epoch == self.steps_per_epoch
            if state.step % cfg.train.log_every_steps == 0 or epoch_end:
                accuracy = self._epoch_accuracy() if epoch_end else {}
                scaler = self.strategy.scaler  # fp16: the loss scale and the steps skipped so far
                scale = (
                    {} if scaler is None else {"loss_scale": scaler.get_scale(), "overflow_steps": state.overflow_steps}
                )
                logger.log(
                    "train",
                    state.step,
                    epoch=state.epoch + 1,
                    lr=lr,
                    img_s=None if rate is None else round(rate, 1),
                    images=used,
                    **totals,
                    **accuracy,
                    **scale,
                )
            self._checkpoint_if_due()
        bar.close()

    def _measure_step(self, seconds: float, images: int) -> None:
        """Adds a finished step to the throughput window, unless it compiled a graph (then it is logged)."""
        compiled = self._compile_watch.new() if self._compile_watch is not None else []
        if not compiled:
            self._throughput.add(seconds, images)
            return
        self._log(
            f"step {self.state.step} compiled {len(compiled)} graph(s) and took {seconds:.1f} s "
            "(left out of img/s and the ETA)"
        )

    def _eta(self, epoch_ends_left: int) -> float | None:
        """Seconds until the run ends: the remaining steps at the windowed time per step, plus the remaining
        evaluations and epoch-end checkpoints at the durations of the last ones (`engine.progress`)."""
        train, done = self.cfg.train, self.cfg.train.epochs - epoch_ends_left  # epochs finished
        evals_left = 0
        if self.val_set is not None:
            evals_left = train.epochs // train.eval_every_epochs - done // train.eval_every_epochs
        other = evals_left * self._eval_seconds + epoch_ends_left * self._epoch_save_seconds
        return self._throughput.eta(self.total_steps - self.state.step, other)

    def _log_start(self, resume: str | Path | None, device_note: str | None) -> None:
        if resume is None:  # a resume said where it starts when it loaded its checkpoint
            self._log(f"starting a new run in {self.run_dir}")
        for line in self.start_summary(device_note):
            self._log(line)

    def start_summary(self, device_note: str | None = None) -> list[str]:
        """The start-up summary's lines: what is trained on what, how long, where and how."""
        cfg = self.cfg
        lines = []
        classes = getattr(self.train_set, "classes", None)  # class names of an image folder
        classes = list(classes) if isinstance(classes, list | tuple) else None
        val = "no validation set" if self.val_indices is None else f"{len(self.val_indices)} validation images"
        names = f" ({', '.join(map(str, classes[:8]))}{', ...' if len(classes) > 8 else ''})" if classes else ""
        lines.append(f"data: {self._num_classes()} classes{names}, {len(self.train_indices)} training images, {val}")
        teacher = "none"
        if cfg.teacher.mode == "frozen" and cfg.distill.method != "none":
            teacher = f"{cfg.teacher.name}, frozen (outputs read from {cfg.teacher.store})"
        elif self.teacher is not None:
            name = cfg.teacher.name or type(self.teacher).__name__
            teacher = f"{name} ({_parameters(self.teacher)} parameters, live)"
        lines.append(
            f"models: student {cfg.student.name} ({_parameters(self.student)} parameters), teacher {teacher}; "
            f"method {cfg.distill.method}"
        )
        step_images = cfg.data.batch_size * self.micro_batches
        tail = len(self.train_indices) % step_images
        lines.append(
            f"schedule: {cfg.train.epochs} epochs × {self.steps_per_epoch} steps = {self.total_steps} optimiser "
            f"steps of {step_images} images (data.batch_size {cfg.data.batch_size} × train.grad_accum "
            f"{self.micro_batches})"
            + (f"; each epoch's last step has {tail}" if tail and not cfg.data.drop_last else "")
            + (f"; data.drop_last leaves {tail} images of each epoch out" if tail and cfg.data.drop_last else "")
        )
        processes = self.dist_env.world_size
        lines.append(
            f"device: {self.device} ({processes} process{'es' if processes > 1 else ''}, {cfg.engine.strategy}), "
            f"precision {cfg.train.precision}"
            + (" (autocast on CUDA only: fp32 here)" if cfg.train.precision == "bf16" and self.autocast is None else "")
            + f", channels_last {'on' if cfg.train.channels_last else 'off'}"
            + (f"; {device_note}" if device_note else "")
            + f"; loader {cfg.data.loader} with {resolve_num_workers(cfg.data.num_workers)} workers"
        )
        lines.append(self._compile_note)
        if self.ema is not None:
            lines.append(
                f"ema: decay {self.ema.decay} per optimiser step (about the last {1 / (1 - self.ema.decay):,.0f} "
                f"steps), {len(self.ema)} tensors averaged in float32; evaluations, the kept-best ranking and "
                "exports use the averaged weights"
            )
        lines.append(f"out_dir: {self.run_dir.resolve()}")
        return lines

    def _eval_line(self, epoch: int, metrics: dict) -> str:
        images = metrics.get("images")
        skipped = int(metrics.get("skipped", 0) or 0)
        return (
            f"evaluated after epoch {epoch}: {images if images is not None else '?'} validation images"
            + (f" ({skipped} unreadable left out)" if skipped else "")
            + f" in {self._eval_seconds:.1f} s"
        )

    def _epoch_line(self, epoch: int, metrics: dict, resumed_mid_epoch: bool) -> str:
        """One line per epoch: where the run is, the epoch's loss, throughput, time, and its evaluation."""
        total, images, steps = self._epoch_loss
        loss = "loss ?" if not images else f"loss {total / images:.4f}"
        if resumed_mid_epoch and images:
            loss += f" (its last {steps} steps, since the resume)"
        wall = self._wall_base + time.perf_counter() - self._started
        line = (
            f"epoch {epoch}/{self.cfg.train.epochs} step {self.state.step}/{self.total_steps}: {loss}, "
            f"{_rate(self._throughput.images_per_second)} img/s, elapsed {format_duration(wall)}, "
            f"ETA {format_duration(self._eta(epoch_ends_left=self.cfg.train.epochs - epoch))}"
        )
        accuracy = self._epoch_accuracy()
        if accuracy:
            line += f", train top1 {accuracy['epoch_top1']:.4f}"
        shown = [
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k not in ("images", "skipped") and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if shown:
            line += "; eval " + ", ".join(shown)
        return line

    def _checkpoint_if_due(self) -> None:
        """After a step: ``last.pt`` every ``checkpoint_every_steps`` or ``checkpoint_every_minutes``, and on
        SIGTERM / SIGINT, after which the run stops (`TrainingInterrupted`).

        The ranks agree first (`Strategy.any_rank`): a signal or the clock may reach one rank a step
        before another, and saving is collective.
        """
        train, step = self.cfg.train, self.state.step
        minutes = train.checkpoint_every_minutes
        clock = minutes is not None and time.monotonic() - self._saved_at >= 60.0 * minutes
        stop, clock = self.strategy.any_rank(self._stop.requested, clock)
        every = train.checkpoint_every_steps
        if stop or clock or (every and step % every == 0):
            self._save(self.ckpt_dir / "last.pt")
        if stop:
            raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        """The stop after a signal, once ``last.pt`` holds the current step."""
        last, stop = self.ckpt_dir / "last.pt", self._stop
        name = stop.name or "a signal on another rank"
        return TrainingInterrupted(
            f"stopped by {name} after step {self.state.step} of {self.total_steps}; {last} holds that step: "
            "resume with --resume auto (Trainer.fit(resume='auto'))",
            stop.name or "SIGTERM",
            stop.exit_code if stop.requested else 143,
            last,
        )

    def _backward_empty(self) -> None:
        """A micro-batch without readable images on this rank: `ObjectiveModule.empty_loss` through the
        wrapped module, so that the rank runs the same forward and backward collectives as the others
        (DDP's buffer broadcast and gradient all-reduce, DeepSpeed's reductions and micro-step count)
        and adds an exact zero to the gradient."""
        empty = torch.zeros(0, device=self.device)
        out = self.strategy.forward(empty, None, self.state.step, None, last_micro=self._last_micro)
        self.strategy.backward(out["loss"], self.micro_batches)

    def _epoch_accuracy(self) -> dict[str, float]:
        """``epoch_top1`` / ``epoch_top5``: the student's accuracy on the epoch's training images (all ranks),
        from the logits of the training steps themselves (train mode, augmented images)."""
        images, top1, top5 = self.state.train_hits
        return {} if images == 0 else {"epoch_top1": top1 / images, "epoch_top5": top5 / images}

    def _finish_step(
        self, totals: dict[str, float], images: int, skipped: int, hits: list[float] | None = None
    ) -> tuple[dict[str, float], int, list[float]]:
        """Weights the step by the images used on all ranks and applies it; returns (logged means, images
        used, top-1 / top-5 hits on all ranks).

        Before its backward, each micro-batch's mean loss was multiplied by ``n / micro_batch_images``
        (its images over those of a full micro-batch on one rank). After the mean over ranks (DDP,
        ZeRO) and the division by ``micro_batches``, the gradient is therefore the sum of the per-image
        gradients over ``data.batch_size · micro_batches``. One all-reduce (the one that gives the
        logged means) brings ``N``, the images used on all ranks, and the number skipped; the gradient
        and the logged values are then multiplied by ``data.batch_size · micro_batches / N``: means over
        the images used, whichever rank lost images. The epoch's last step with ``data.drop_last`` false
        is weighted the same way: a mean over the images it has. With no image skipped every factor is exactly 1.0
        and nothing is multiplied, so such a step is bit-for-bit what it was without this weighting.
        A step without any image on any rank is not applied (`Strategy.skip_step`) and logs no loss.
        The training hits (``hits``: top-1, top-5 on this rank) travel in the same all-reduce.
        """
        k = len(_LOGGED)
        present = [1.0 if key in totals else 0.0 for key in _LOGGED]
        hits = hits or [0.0, 0.0]
        # Same length and order on every rank (a rank without images has no keys of its own).
        sums = self.strategy.reduce_sum([*(totals.get(key, 0.0) for key in _LOGGED), *present, images, skipped, *hits])
        step_hits = sums[2 * k + 2 :]
        if not math.isfinite(sums[0]):  # "loss": one rank's non-finite loss reaches every rank in this sum
            s = self.state
            raise TrainingError(
                f"non-finite loss ({sums[0]}) at step {s.step} (epoch {s.epoch + 1}): nothing of this step was "
                f"applied or saved; {self._checkpoint_note()}. Lower optim.lr or check the data."
            )
        used = int(sums[2 * k])
        self.state.skipped_images += int(sums[2 * k + 1])
        if used == 0:
            self.strategy.skip_step()
            return {}, 0, step_hits
        factor = self.cfg.data.batch_size * self.micro_batches / used
        if factor != 1.0:
            self.strategy.scale_gradients(factor)
        self._optimizer_step()
        world = self.strategy.world_size
        logged = zip(_LOGGED, sums[:k], sums[k : 2 * k], strict=True)
        return {key: total / world * factor for key, total, seen in logged if seen}, used, step_hits

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
        out = self.strategy.forward(images, labels, self.state.step, frozen, last_micro=self._last_micro)
        # The labels the training accuracy is measured against; mixed (mixup / CutMix): their largest share,
        # as the official trainer (and torchvision's reference scripts) do.
        # Multi-hot labels (VOC) stay as they are: a top-k class counts when its share is positive.
        mixed = self.mixing is not None and labels.dim() == 2 and not self.cfg.distill.multilabel
        return {**out, "accuracy_target": labels.argmax(1) if mixed else labels}

    def _forward_to_loss(
        self, images: Tensor, labels: Tensor, step: int, frozen: TeacherOutputs | None
    ) -> dict[str, Tensor]:
        """Batch → loss dict: the forward of the module the strategy wraps (explanations included)."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.cfg.distill.method == "none":
                logits = self.student(images)
                # B-cos: uniform off-label BCE; multi-hot targets (VOC): per-class BCE; else cross-entropy
                loss = ground_truth_loss(logits, labels, bcos=self.is_bcos, multilabel=self.cfg.distill.multilabel)
                return {"loss": loss, "gt": loss.detach(), "student_logits": logits.detach()}
            return self.step_fn(images, labels, step, frozen)

    def _optimizer_step(self) -> None:
        """Clipping (AGC, global norm), the optimiser, cleared gradients: the strategy's step; then the
        EMA of the weights, when the update was applied (not on a skipped fp16 overflow step).

        The strategy first checks the whole gradient for inf and NaN (one fused check, one sync) and
        applies nothing when it finds one: a finite loss can still have a non-finite gradient.
        """
        try:
            if not self.strategy.step():
                self.state.overflow_steps += 1
            elif self.ema is not None:
                self.ema.update(self.student)
        except NonFiniteGradientError:
            s = self.state
            raise TrainingError(
                f"non-finite gradient at step {s.step} (epoch {s.epoch + 1}) although the loss was finite: the "
                f"update was not applied and nothing was saved; {self._checkpoint_note()}. Lower optim.lr or "
                "check the data."
            ) from None

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
        world = self.dist_env.world_size  # training and evaluation are both sharded round-robin over ranks
        common = dict(
            # data.batch_size is the global batch; the evaluation batch is each rank's own.
            batch_size=data.batch_size // world if train else (data.eval_batch_size or data.batch_size),
            shuffle=shuffle,
            epoch=epoch,
            start=start,
            seed=self.cfg.train.seed if train else 0,
            drop_last=train and data.drop_last,
            rank=self.dist_env.rank,
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
        """Writes the same checkpoint to each of ``paths`` (the state is gathered once).

        Raises:
            TrainingError: the state holds inf or NaN (nothing is written: a checkpoint must be a point
                the run can go on from), or a file could not be written (named, with the cause).
        """
        s, started = self.state, time.perf_counter()
        s.wall_seconds = self._wall_base + started - self._started
        # Whole weights and optimiser state on every strategy (DeepSpeed gathers its partitions: collective).
        model_state, optimizer_state = self.strategy.model_state(), self.strategy.optimizer_state()
        extra = {} if self.step_fn.objective is None else {"distill_objective": self.step_fn.objective.state_dict()}
        if self.ema is not None:  # beside the raw weights, which the run resumes from
            extra[EMA_KEY] = self.ema.state_dict()
        # Every rank checks its copy and the ranks agree, so that all of them stop together.
        (non_finite,) = self.strategy.any_rank(not _all_finite([model_state, optimizer_state, extra]))
        if non_finite:
            raise TrainingError(
                f"non-finite weights or optimiser state at step {s.step}: not saved; {self._checkpoint_note()}. "
                "Lower optim.lr or check the data."
            )
        if self.strategy.is_main:
            for path in paths:
                try:
                    save_checkpoint(
                        StateDictView(self.student, model_state),
                        path,
                        optimizer=optimizer_state,
                        step=s.step,
                        epoch=s.epoch,
                        step_in_epoch=s.step_in_epoch,
                        skipped_images=s.skipped_images,
                        overflow_steps=s.overflow_steps,
                        grad_scaler=self.strategy.scaler_state(),
                        best=[[m, p] for m, p in s.best],
                        last_eval=s.last_eval,
                        train_hits=list(s.train_hits),
                        wall_seconds=s.wall_seconds,
                        config=config_to_dict(self.cfg),
                        model_spec=student_spec(self.cfg, self.train_set, self.val_set).to_dict(),
                        **extra,
                    )
                except CheckpointWriteError as err:
                    raise TrainingError(f"{err} (at step {s.step}); {self._checkpoint_note()}") from None
        self.strategy.barrier()  # no rank goes on (or reads the files) before they are complete
        names = ", ".join(_relative_to(path, self.run_dir) for path in paths)
        self._log(f"saved {names} at step {s.step} in {time.perf_counter() - started:.1f} s")
        last = self.ckpt_dir / "last.pt"
        if last in paths:
            self._last_saved, self._saved_at = (last, s.step), time.monotonic()

    def _checkpoint_note(self) -> str:
        """Which checkpoint a failed run can go on from; only one that exists and holds finite values."""
        if self._last_saved is None:
            return "no checkpoint of this run was written yet, so a new run starts from the beginning"
        path, step = self._last_saved
        return f"the last checkpoint ({path}, step {step}) is intact; resume from it"

    def _save_epoch(self, eval_metrics: dict) -> None:
        """Writes last.pt and epoch_XXXX.pt, keeping the best ``keep_best`` epoch files by val top-1."""
        entry = f"{self.ckpt_dir.name}/epoch_{self.state.epoch:04d}.pt"  # relative to the run folder
        score = float(eval_metrics.get("top1", -math.inf)) if eval_metrics else -math.inf
        ranked = sorted([*self.state.best, (score, entry)], key=lambda b: -b[0])
        keep, drop = ranked[: self.cfg.train.keep_best], ranked[self.cfg.train.keep_best :]
        self.state.best = keep
        keep_epoch = any(p == entry for _, p in keep)
        self._save(*([self.run_dir / entry] if keep_epoch else []), self.ckpt_dir / "last.pt")
        if self.strategy.is_main:
            for _, dropped in drop:
                self._remove_checkpoint(dropped)

    def _remove_checkpoint(self, entry: str) -> None:
        """Deletes a kept-best file that fell out of the best ``keep_best``: only ever one in this run's
        checkpoint folder (a symlink, ``..`` or an absolute path that leads elsewhere is left alone)."""
        path = (self.run_dir / entry).resolve()
        if path.parent != self.ckpt_dir.resolve():
            self._log(f"not deleting {path}: outside this run's checkpoint folder {self.ckpt_dir}")
            return
        path.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        """Deletes the temporary files of writes a kill interrupted (``.last.pt.<random>.tmp``,
        ``.config.yaml.tmp``, ...): never read, they only fill the disk."""
        stale = [p for d in (self.run_dir, self.ckpt_dir) if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            self._log(f"removed {len(stale)} temporary files of interrupted writes: {', '.join(p.name for p in stale)}")

    def _load_state(self, path: Path, force: bool = False) -> None:
        """Resumes from ``path`` after comparing the config it was written with to this one.

        Changes that keep the run what it was (`e2kd_fast.engine.resume.HARMLESS`) are logged;
        others are refused, naming each key with both values, unless ``force``. A forced change of
        optimiser starts the new optimiser's state afresh (the old one's does not fit it).
        """
        payload = read_checkpoint(path)
        saved = self._saved_config(path, payload, force)
        changes = [] if saved is None else config_changes(saved, config_to_dict(self.cfg))
        breaking = [c for c in changes if not c.harmless]
        if breaking and not force:
            raise TrainingError(
                f"resume from {path} refused: this config differs from the one the run was trained with in "
                f"{len(breaking)} setting(s) that change its result: {describe(breaking)}. Resume with the run's "
                "values, start a new run in another train.out_dir, or force the resume if the change is meant "
                "(e2kd-fast train --resume-force; Trainer.fit(resume_force=True))."
            )
        saved_student = payload.get("config", {}).get("student", {}).get("name")
        if saved_student != self.cfg.student.name:
            raise TrainingError(
                f"{path} was written for student {saved_student!r}, this run trains {self.cfg.student.name!r}"
            )
        load_checkpoint(self.student, payload, use_ema=False)  # the raw weights: training goes on from them
        if self.ema is not None:
            if EMA_KEY in payload:
                try:
                    self.ema.load_state_dict(payload[EMA_KEY])
                except ValueError as err:
                    raise TrainingError(f"{path}: {err}") from None
            else:  # a forced resume that turned train.ema_decay on
                self.ema.reset(self.student)
                self._log(f"{path} holds no EMA weights: the average starts from its weights")
        if self.step_fn.objective is not None:
            if "distill_objective" not in payload:
                raise TrainingError(
                    f"{path} holds no distill_objective state for the {self.cfg.distill.method!r} baseline"
                )
            self.step_fn.objective.load_state_dict(payload["distill_objective"])
        saved_optimizer = (saved or {}).get("optim", {}).get("name", self.cfg.optim.name)
        if saved_optimizer != self.cfg.optim.name:
            self._log(f"optim.name {saved_optimizer!r} → {self.cfg.optim.name!r}: the optimiser state starts afresh")
        else:
            try:
                self.strategy.load_optimizer_state(payload["optimizer"], payload.get("model"))
            except (KeyError, IndexError, ValueError) as err:
                raise TrainingError(
                    f"{path}: its optimiser state does not fit this run's {self.cfg.optim.name!r} optimiser "
                    f"({type(err).__name__}: {err})"
                ) from None
            # The saved groups carry the old hyperparameters; a forced resume means the new ones.
            for group in self.optimizer.param_groups:
                group["weight_decay"] = self.cfg.optim.weight_decay
                if "momentum" in group:
                    group["momentum"] = self.cfg.optim.momentum
        self.strategy.load_scaler_state(payload.get("grad_scaler"))  # fp16's loss scale, for an exact resume
        self.state = TrainState(
            step=int(payload["step"]),
            epoch=int(payload["epoch"]),
            step_in_epoch=int(payload["step_in_epoch"]),
            skipped_images=int(payload.get("skipped_images", 0)),
            overflow_steps=int(payload.get("overflow_steps", 0)),
            best=[(float(m), _run_relative(str(p))) for m, p in payload.get("best", [])],
            last_eval=dict(payload.get("last_eval", {})),
            # A checkpoint from before training accuracy was counted: the epoch's count starts at the resume.
            train_hits=[float(v) for v in payload.get("train_hits", [0.0, 0.0, 0.0])],
            wall_seconds=float(payload.get("wall_seconds", 0.0)),
        )
        self._last_saved = (path, self.state.step)
        self._resume_record = {
            "checkpoint": str(path),
            "changes": {c.key: [c.saved, c.new] for c in changes},
            "forced": bool(breaking),
        }
        s = self.state
        self._log(f"resuming from {path} at step {s.step} of {self.total_steps} (epoch {s.epoch + 1})")
        for change in changes:
            self._log(f"resume: {change}" + ("" if change.harmless else " (forced: the run is no longer exact)"))

    def _saved_config(self, path: Path, payload: dict, force: bool) -> dict | None:
        """The config the run was trained with, as `config_to_dict` gives it: the checkpoint's own, else
        the run's ``config.yaml``; None when there is neither (nothing to compare)."""
        raw, source = payload.get("config"), f"the config stored in {path}"
        try:
            if isinstance(raw, dict):
                return config_to_dict(config_from_dict(raw))
            if (self.run_dir / "config.yaml").is_file():
                source = str(self.run_dir / "config.yaml")
                return config_to_dict(load_config(self.run_dir / "config.yaml"))
        except ValueError as err:
            if not force:
                raise TrainingError(
                    f"resume from {path} refused: {source} is no valid config any more ({err}), so this config "
                    "cannot be compared with it; force the resume (--resume-force) to go on without comparing"
                ) from None
        return None

    def _recorded_before_resume(self, record: dict) -> bool:
        """Whether a ``metrics.jsonl`` record was written before the checkpoint the run resumed from
        (what came after is re-run and logged again). An evaluation at the checkpoint's step came
        before it when the checkpoint closed that epoch, after it when it was taken mid-epoch."""
        s, step = self.state, int(record.get("step", 0))
        if record.get("kind") == "eval":
            return step < s.step or (step == s.step and int(record.get("epoch", 0)) <= s.epoch)
        return step <= s.step

    # ------------------------------------------------------------------ summary and failures

    def _summary(self, status: str, error: str | None = None) -> dict:
        s = self.state
        summary = {
            "status": status,  # finished, interrupted (SIGTERM / SIGINT) or failed
            "steps": s.step,
            "epochs": s.epoch,
            "skipped_train_images": s.skipped_images,
            "overflow_steps": s.overflow_steps,
            "wall_seconds": round(self._wall_base + time.perf_counter() - self._started, 1),
            "final_eval": s.last_eval,
            "run_dir": str(self.run_dir.resolve()),
            # Absolute paths: `--checkpoint best` works from any directory (checkpoints keep them relative).
            "best": [{"top1": m, "checkpoint": str((self.run_dir / p).resolve())} for m, p in s.best],
        }
        if error is not None:
            summary["error"] = error
        return summary

    def _write_summary(self, summary: dict) -> None:
        path = self.run_dir / "summary.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err

    def _record_failure(self, error: TrainingError, status: str) -> None:
        """``summary.json`` for a run that stopped early; if even that cannot be written, the error says so."""
        if not self.strategy.is_main:
            return
        try:
            self._write_summary(self._summary(status, str(error)))
        except OSError as err:
            error.args = (f"{error} (and {self._io_failure(err, note=False)})",)

    def _io_failure(self, err: OSError, note: bool = True) -> str:
        """A write that failed, named: the file, the cause and, with ``note``, the checkpoint left intact."""
        where = f"could not write {err.filename}" if err.filename else "a file of the run could not be written"
        text = f"{where}: {err.strerror or err}"
        return f"{text} (at step {self.state.step}); {self._checkpoint_note()}" if note else text


def _train_hits(out: dict[str, Tensor]) -> list[Tensor]:
    """[top-1 hits, top-5 hits] of the step's student logits against its labels, as 0-dim float tensors on
    the device (no sync); zeros when the objective returned no student logits."""
    logits, target = out.get("student_logits"), out.get("accuracy_target")
    if logits is None or target is None:
        return [torch.zeros((), device=out["loss"].device)] * 2
    hits = topk_hits(logits.detach().float(), target)
    return [hits[1].float(), hits[5].float()]


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


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it, else as it is."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _run_relative(entry: str) -> str:
    """A kept-best entry as a path relative to the run folder.

    Checkpoints written before entries were relative hold absolute paths into the folder they were
    written in; in a copy of that folder they mean the copy's own file of the same name.
    """
    path = Path(entry)
    return f"checkpoints/{path.name}" if path.is_absolute() else path.as_posix()


def _plain_values(value: object) -> object:
    """``value`` with numbers, strings, lists and dicts only (a 0-d tensor or NumPy number becomes its
    Python number), so that checkpoints holding it load with ``weights_only=True``."""
    if isinstance(value, dict):
        return {str(k): _plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_values(v) for v in value]
    if value is None:
        return value
    for plain in (bool, int, float, str):  # exactly these types: NumPy's float64 is a float but pickles as NumPy
        if isinstance(value, plain):
            return plain(value)
    return value.item() if hasattr(value, "item") else str(value)


def _all_finite(states: list) -> bool:
    """Whether every floating-point tensor in ``states`` (nested dicts and lists) is finite: one fused
    check, one device sync."""
    tensors: list[Tensor] = []
    pending = list(states)
    while pending:
        item = pending.pop()
        if isinstance(item, Tensor):
            if item.is_floating_point() and item.numel():
                tensors.append(item.detach())
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    if not tensors:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:  # the weights on the GPU, Adam's step counts on the CPU: one check per device
        by_device.setdefault(t.device, []).append(t)
    checks = [torch.stack([n.float() for n in torch._foreach_norm(g)]).isfinite().all() for g in by_device.values()]
    return all(bool(c) for c in checks)


def _rate(images_per_second: float | None) -> str:
    """Throughput as the log shows it: ``?`` before a step was measured."""
    return "?" if images_per_second is None else f"{images_per_second:.1f}"


def _parameters(model: nn.Module) -> str:
    """``11,689,512``: the model's parameter count."""
    return f"{sum(p.numel() for p in model.parameters()):,}"
