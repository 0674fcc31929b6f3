"""The e²KD training step with its forward-to-loss part captured whole by ``torch.compile``.

With the explanation computed by the explicit sweep (`e2kd_fast.explain.sweep`; GradCAM in closed
form), everything from the batch to the loss is ordinary first-order autograd: the teacher's
forward and sweep under ``no_grad``, the student's forward and sweep, the KD and cosine terms. That
function is compiled with ``fullgraph=True`` (no graph breaks; one graph for steps with the
explanation term and one for steps without it, so ``guided_step_interval`` causes no recompiles);
``loss.backward()`` then runs the compiled backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.config import BASELINE_DEFAULTS
from e2kd_fast.distill import TeacherOutputs, build_baseline, e2kd_objective


class TrainStep:
    """Computes the e²KD / KD objective of a batch, compiled or eager.

    Args:
        student, teacher: the models (teacher in eval mode, frozen; None with frozen outputs).
        tau, lam, explanation, gt_coef, logit_coef, guided_step_interval: as `e2kd_objective`.
        guided_step_counter: what ``guided_step_interval`` counts: ``"run"`` (the ``step`` passed in,
            the run's optimiser step) or ``"epoch"`` (``step % steps_per_epoch``: the step's index in its
            epoch, the official batch index; the trainer's epochs all have ``steps_per_epoch`` steps).
        compile: compile the forward-to-loss function with ``fullgraph=True``.
        log: called with one line per compilation (what was compiled and how long it took).
        objective: a feature baseline (`e2kd_fast.distill.baselines`) computed instead of e²KD / KD;
            its connectors are in `extra_parameters`.
        steps_per_epoch: optimiser steps per epoch, to give the baseline its epoch (warm-up, phases).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        tau: float = 1.0,
        lam: float = 1.0,
        explanation: str = "bcos",
        gt_coef: float = 0.0,
        logit_coef: float = 1.0,
        guided_step_interval: int = 1,
        guided_step_counter: str = "run",
        compile: bool = False,
        log: Callable[[str], None] = print,
        multilabel: bool = False,
        objective: nn.Module | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        self.student, self.teacher = student, teacher
        self.lam, self.guided_step_interval = lam, guided_step_interval
        if guided_step_counter not in ("run", "epoch"):
            raise ValueError(f"guided_step_counter must be 'run' or 'epoch'; got {guided_step_counter!r}")
        self.guided_step_counter = guided_step_counter
        # multilabel (VOC): per-class sigmoid KD (e2kd_fast.distill.multilabel)
        self.common = {
            "tau": tau,
            "explanation": explanation,
            "gt_coef": gt_coef,
            "logit_coef": logit_coef,
            "algorithm": "sweep",
            "multilabel": multilabel,
        }
        self.compile, self.log = compile, log
        self._fns: dict[tuple[bool, bool], Callable] = {}
        self.compile_seconds: dict[str, float] = {}
        self.objective, self.steps_per_epoch = objective, max(int(steps_per_epoch), 1)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective (baseline connectors) to optimise with the student."""
        return [] if self.objective is None else [p for p in self.objective.parameters() if p.requires_grad]

    def _feature_call(self, images: Tensor, labels: Tensor | None, step: int, frozen) -> dict[str, Tensor]:
        """A feature baseline's batch: one graph per phase; the warm-up ramp is a tensor (no recompiles)."""
        if frozen is not None or self.teacher is None:
            raise ValueError(f"baseline {self.objective.method!r} needs a live teacher (teacher.mode 'live')")
        phase, ramp = self.objective.schedule(step // self.steps_per_epoch)
        key = ("feature", phase)
        fn = self._fns.get(key)
        if fn is None:
            objective, student, teacher = self.objective, self.student, self.teacher

            def forward_to_loss(images: Tensor, labels: Tensor | None, ramp: Tensor):
                return objective(student, teacher, images, labels, ramp, phase)

            fn = self._fns[key] = torch.compile(forward_to_loss, fullgraph=True) if self.compile else forward_to_loss
            started = time.perf_counter()
            out = fn(images, labels, torch.tensor(ramp, device=images.device))
            if self.compile:
                name = f"{self.objective.method} step ({phase})"
                self.compile_seconds[name] = time.perf_counter() - started
                self.log(f"compiled the {name} forward-to-loss graph in {self.compile_seconds[name]:.1f} s")
            return out
        return fn(images, labels, torch.tensor(ramp, device=images.device))

    def explains_at(self, step: int) -> bool:
        """Whether the run's optimiser step ``step`` has the explanation term (``guided_step_interval``)."""
        counter = step % self.steps_per_epoch if self.guided_step_counter == "epoch" else step
        return self.lam > 0 and counter % self.guided_step_interval == 0

    def __call__(
        self, images: Tensor, labels: Tensor | None, step: int, frozen: TeacherOutputs | None = None
    ) -> dict[str, Tensor]:
        if self.objective is not None:
            return self._feature_call(images, labels, step, frozen)
        explain = self.explains_at(step)
        key = (explain, frozen is not None)
        if key not in self._fns:
            self._fns[key] = self._build(explain, frozen is not None)
            started = time.perf_counter()
            out = self._fns[key](images, labels, frozen)
            if self.compile:
                name = f"{'e2kd' if explain else 'kd'} step ({'frozen' if frozen is not None else 'live'} teacher)"
                self.compile_seconds[name] = time.perf_counter() - started
                self.log(
                    f"compiled the {name} forward-to-loss graph in {self.compile_seconds[name]:.1f} s "
                    "(its backward compiles during the first backward)"
                )
            return out
        return self._fns[key](images, labels, frozen)

    def _build(self, explain: bool, frozen: bool) -> Callable:
        lam = self.lam if explain else 0.0
        objective = partial(e2kd_objective, lam=lam, **self.common)
        teacher = None if frozen else self.teacher

        def forward_to_loss(images: Tensor, labels: Tensor | None, outputs: TeacherOutputs | None):
            return objective(self.student, teacher, images, labels=labels, frozen=outputs)

        return torch.compile(forward_to_loss, fullgraph=True) if self.compile else forward_to_loss


def make_train_step(
    student: nn.Module, teacher: nn.Module | None, cfg, *, log=print, steps_per_epoch: int = 1
) -> TrainStep:
    """The `TrainStep` a `Config` describes (``train.compile`` chooses compiled or eager)."""
    d = cfg.distill
    objective = None
    if d.method in BASELINE_DEFAULTS:
        objective = build_baseline(
            d.method, student, teacher, weight=d.feature_weight, kd_coef=d.kd_coef, tau=d.tau, options=d.feature_options
        )
    return TrainStep(
        student,
        teacher,
        tau=d.tau,
        lam=d.lam if d.method == "e2kd" else 0.0,
        explanation=d.explanation,
        gt_coef=d.gt_coef,
        logit_coef=d.logit_coef,
        guided_step_interval=d.guided_step_interval,
        guided_step_counter=d.guided_step_counter,
        compile=cfg.train.compile,
        log=log,
        multilabel=d.multilabel,
        objective=objective,
        steps_per_epoch=steps_per_epoch,
    )
