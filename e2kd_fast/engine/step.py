"""The e²KD training step as two graphs: the teacher's inference and the student's forward to the loss.

With the explanation computed by the explicit sweep (`e2kd_fast.explain.sweep`; GradCAM in closed
form), everything from the batch to the loss is ordinary first-order autograd. A live teacher's
forward and sweep run under ``no_grad`` as their own graph (`teacher_outputs`): an inference graph,
compiled without a joint forward-backward trace or partitioning, so the teacher's depth costs the
step's compile the least it can. Its outputs enter the student's graph exactly as stored ("frozen")
outputs do, so a live and a frozen teacher share the student's graph. Each is compiled with
``fullgraph=True`` (no graph breaks), once for steps with the explanation term and once for steps
without it, so ``guided_step_interval`` causes no recompiles; ``loss.backward()`` then runs the
student graph's compiled backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.config import BASELINE_DEFAULTS
from e2kd_fast.distill import TeacherOutputs, build_baseline, e2kd_objective, teacher_outputs


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
        self._fns: dict[tuple, Callable] = {}
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
        if frozen is None:
            if self.teacher is None:
                raise ValueError("the step needs a teacher model or its frozen outputs")
            frozen = self._compiled(("teacher", explain), partial(self._teacher_graph, explain), images)
        return self._compiled(("student", explain), partial(self._student_graph, explain), images, labels, frozen)

    def _compiled(self, key: tuple[str, bool], build: Callable[[], Callable], *args):
        """Calls the graph ``key`` (built on first use); the first call's time is logged as its compile."""
        fn = self._fns.get(key)
        if fn is not None:
            return fn(*args)
        fn = self._fns[key] = build()
        started = time.perf_counter()
        out = fn(*args)
        if self.compile:
            part, explain = key
            name = f"{part} {'e2kd' if explain else 'kd'}"
            self.compile_seconds[name] = time.perf_counter() - started
            backward = " (its backward compiles during the first backward)" if part == "student" else ""
            self.log(f"compiled the {name} graph in {self.compile_seconds[name]:.1f} s{backward}")
        return out

    def _teacher_graph(self, explain: bool) -> Callable:
        """The live teacher's inference graph: logits and, with ``explain``, its top-1 explanation."""
        outputs = partial(
            teacher_outputs,
            explanation=self.common["explanation"],
            explain=explain,
            algorithm=self.common["algorithm"],
        )

        def teacher_forward(images: Tensor) -> TeacherOutputs:
            return outputs(self.teacher, images)

        return torch.compile(teacher_forward, fullgraph=True) if self.compile else teacher_forward

    def _student_graph(self, explain: bool) -> Callable:
        """The student's forward to the loss given the teacher's outputs (live or stored)."""
        objective = partial(e2kd_objective, lam=self.lam if explain else 0.0, **self.common)

        def forward_to_loss(images: Tensor, labels: Tensor | None, outputs: TeacherOutputs):
            return objective(self.student, None, images, labels=labels, frozen=outputs)

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
