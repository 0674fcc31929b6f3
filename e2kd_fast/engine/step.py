"""The e²KD training step as two graphs: the teacher's inference and the student's forward to the loss.

With the explanation computed by the explicit sweep (`e2kd_fast.explain.sweep`; GradCAM in closed
form), everything from the batch to the loss is ordinary first-order autograd. A live teacher's
forward and sweep run under ``no_grad`` as their own graph (`teacher_outputs`): an inference graph,
compiled without a joint forward-backward trace or partitioning. Its outputs enter the student's
graph exactly as stored ("frozen") outputs do, so a live and a frozen teacher share the student's
graph. Each is compiled with ``fullgraph=True`` (no graph breaks), once for steps with the
explanation term and once for steps without it, so ``guided_step_interval`` causes no recompiles;
``loss.backward()`` then runs the student graph's compiled backward.

The compiled graphs see one batch size only, that of a full micro-batch. A batch of another size (the
epoch's last, partial step with ``data.drop_last: false``; a batch that lost unreadable images) runs
the same functions eagerly: the same loss, no new graph, where a recompile would cost minutes (and
leave a dynamic-shape graph behind). A graph that compiles again all the same (a guard failed) is
logged with Dynamo's reason.

On CUDA, ``teacher_cuda_graph`` replays the compiled teacher graph as one CUDA graph
(`CapturedInference`): its kernels are launched by one call instead of one by one.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from e2kd_fast.config import BASELINE_DEFAULTS
from e2kd_fast.distill import TeacherOutputs, build_baseline, e2kd_objective, teacher_outputs
from e2kd_fast.engine.builders import resolve_compile


class TrainStep:
    """Computes the e²KD / KD objective of a batch, compiled or eager.

    Args:
        student, teacher: the models (teacher in eval mode, frozen; None with frozen outputs).
        tau, lam, explanation, gt_coef, logit_coef, guided_step_interval: as `e2kd_objective`.
        guided_step_counter: what ``guided_step_interval`` counts: ``"run"`` (the ``step`` passed in,
            the run's optimiser step) or ``"epoch"`` (``step % steps_per_epoch``: the step's index in its
            epoch, the official batch index; the trainer's epochs all have ``steps_per_epoch`` steps).
        compile: compile the live teacher's graph and the student's forward-to-loss graph (a feature
            baseline: its forward-to-loss), each with ``fullgraph=True``.
        log: called with one line per compilation (what was compiled and how long it took, and for a
            recompile Dynamo's reason) and once per batch size that runs eagerly instead.
        objective: a feature baseline (`e2kd_fast.distill.baselines`) computed instead of e²KD / KD;
            its connectors are in `extra_parameters`.
        steps_per_epoch: optimiser steps per epoch, to give the baseline its epoch (warm-up, phases).
        batch_size: the images of a full micro-batch, the one batch size the compiled graphs are built
            and called for; a batch of any other size runs eagerly. None: the first batch's size.
        teacher_cuda_graph: with ``compile`` and CUDA images, replay the live teacher's compiled graph
            as a CUDA graph (`CapturedInference`; its first call compiles, its second records).
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
        batch_size: int | None = None,
        teacher_cuda_graph: bool = False,
    ) -> None:
        if teacher_cuda_graph and not compile:
            raise ValueError("teacher_cuda_graph replays the compiled teacher graph: it needs compile=True")
        self.student, self.teacher = student, teacher
        self.teacher_cuda_graph = teacher_cuda_graph
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
        # key → (the function as called for full batches: compiled or eager, the eager function)
        self._fns: dict[tuple, tuple[Callable, Callable]] = {}
        self.compile_seconds: dict[str, float] = {}
        self.objective, self.steps_per_epoch = objective, max(int(steps_per_epoch), 1)
        self.batch_size = batch_size
        self._eager_sizes: set[int] = set()  # batch sizes that ran eagerly (each logged once)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective (baseline connectors) to optimise with the student."""
        return [] if self.objective is None else [p for p in self.objective.parameters() if p.requires_grad]

    def _feature_call(self, images: Tensor, labels: Tensor | None, step: int, frozen) -> dict[str, Tensor]:
        """A feature baseline's batch: one graph per phase; the warm-up ramp is a tensor (no recompiles)."""
        if frozen is not None or self.teacher is None:
            raise ValueError(f"baseline {self.objective.method!r} needs a live teacher (teacher.mode 'live')")
        phase, ramp = self.objective.schedule(step // self.steps_per_epoch)
        key = ("feature", phase)
        if key not in self._fns:
            objective, student, teacher = self.objective, self.student, self.teacher

            def forward_to_loss(images: Tensor, labels: Tensor | None, ramp: Tensor):
                return objective(student, teacher, images, labels, ramp, phase)

            self._fns[key] = (self._compiled(forward_to_loss, images.device.type), forward_to_loss)
        name = f"{self.objective.method} step ({phase})"
        return self._run(key, name, images, labels, torch.tensor(ramp, device=images.device))

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
        kind = "e2kd" if explain else "kd"
        if frozen is None:
            if self.teacher is None:
                raise ValueError("the step needs a teacher model or its frozen outputs")
            key = ("teacher", explain)
            if key not in self._fns:
                if self.teacher_cuda_graph and images.device.type != "cuda":
                    raise ValueError(f"teacher_cuda_graph needs CUDA images; got {images.device.type} ones")
                eager = self._teacher_graph(explain)
                compiled = self._compiled(eager, images.device.type)
                self._fns[key] = (CapturedInference(compiled) if self.teacher_cuda_graph else compiled, eager)
            frozen = self._run(key, f"teacher {kind}", images)
        key = ("student", explain)
        if key not in self._fns:
            eager = self._student_graph(explain)
            self._fns[key] = (self._compiled(eager, images.device.type), eager)
        return self._run(key, f"student {kind}", images, labels, frozen)

    def _compiled(self, fn: Callable, device_type: str) -> Callable:
        if not self.compile:
            return fn
        # On the CPU, Inductor's layout optimisation stores the conv weights channels_last: oneDNN's
        # convolution backward transposes them back on every step and the weight gradients are
        # copied into the parameters' layout (bench/NOTES.md). Off there; GPUs keep it.
        options = {"layout_optimization": False} if device_type == "cpu" else None
        return torch.compile(fn, fullgraph=True, options=options)

    def _run(self, key: tuple, name: str, images: Tensor, *args: Any) -> dict[str, Tensor]:
        """Calls the graph of ``key``: compiled for full batches, eager for a batch of any other size."""
        fn, eager = self._fns[key]
        if not self.compile:
            return fn(images, *args)
        size = int(images.shape[0])
        if self.batch_size is None:
            self.batch_size = size
        if size != self.batch_size:
            if size not in self._eager_sizes:
                self._eager_sizes.add(size)
                self.log(
                    f"a batch of {size} images (not {self.batch_size}) runs eagerly, now and whenever that size "
                    "comes again: the compiled graphs keep their static batch size"
                )
            return eager(images, *args)
        first = name not in self.compile_seconds
        watch = CompileWatch()
        started = time.perf_counter()
        out = fn(images, *args)
        seconds = time.perf_counter() - started
        if first:
            self.compile_seconds[name] = seconds
            backward = "" if name.startswith("teacher") else " (its backward compiles during the first backward)"
            self.log(f"compiled the {name} graph in {seconds:.1f} s{backward}")
        else:
            for record in watch.new():
                reason = getattr(record, "recompile_reason", None) or "no reason given"
                self.log(f"recompiled the {name} graph in {seconds:.1f} s: {reason}")
        return out

    def _teacher_graph(self, explain: bool) -> Callable:
        """The live teacher's inference: logits and, with ``explain``, its top-1 explanation."""
        outputs = partial(
            teacher_outputs,
            explanation=self.common["explanation"],
            explain=explain,
            algorithm=self.common["algorithm"],
        )

        def teacher_forward(images: Tensor) -> TeacherOutputs:
            return outputs(self.teacher, images)

        return teacher_forward

    def _student_graph(self, explain: bool) -> Callable:
        """The student's forward to the loss given the teacher's outputs (live or stored)."""
        objective = partial(e2kd_objective, lam=self.lam if explain else 0.0, **self.common)

        def forward_to_loss(images: Tensor, labels: Tensor | None, outputs: TeacherOutputs):
            return objective(self.student, None, images, labels=labels, frozen=outputs)

        return forward_to_loss


class CompileWatch:
    """The graphs `torch.compile` built in this process since the watch was made (or last asked).

    Reads Dynamo's compilation records (`torch._dynamo.utils.get_compilation_metrics`: one per frame
    compiled, with ``recompile_reason`` for a recompile). Where they are not available (another torch),
    it sees nothing.
    """

    def __init__(self) -> None:
        records = _compilation_records()
        self._last = records[-1] if records else None

    def new(self) -> list[Any]:
        """The records added since the last look, oldest first."""
        records = _compilation_records()
        start = 0
        for i in range(len(records) - 1, -1, -1):
            if records[i] is self._last:
                start = i + 1
                break
        if records:
            self._last = records[-1]
        return records[start:]


class CapturedInference:
    """A compiled inference function of one CUDA batch tensor, replayed as a CUDA graph.

    The first call runs ``fn`` as it is (it compiles, and cuDNN picks its algorithms); the second
    records its kernels into a `torch.cuda.CUDAGraph` reading a static copy of the batch; every call
    from then on copies the batch into that copy, replays the graph and returns clones of its
    outputs (the next replay overwrites the graph's own). For what never changes between calls but
    the batch's values: its shape and strides (full batches only) and the weights (a frozen teacher).

    Args:
        fn: images [N, ...] on CUDA → a `TeacherOutputs` (tensors or None in its fields).
    """

    def __init__(self, fn: Callable[[Tensor], TeacherOutputs]) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: Tensor | None = None
        self.static_outputs: TeacherOutputs | None = None
        self.calls = 0

    def __call__(self, images: Tensor) -> TeacherOutputs:
        self.calls += 1
        if self.calls == 1:
            return self.fn(images)
        if self.graph is None:
            self.static_images = images.clone(memory_format=torch.preserve_format)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the replay below runs it
                self.static_outputs = self.fn(self.static_images)
        if images.shape != self.static_images.shape or images.stride() != self.static_images.stride():
            raise ValueError(
                f"a captured graph replays one batch layout: {tuple(self.static_images.shape)} with strides "
                f"{self.static_images.stride()}, got {tuple(images.shape)} with {images.stride()}"
            )
        self.static_images.copy_(images)
        self.graph.replay()
        out = self.static_outputs
        cloned = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return dataclasses.replace(out, **{k: v.clone() for k, v in cloned.items() if v is not None})


def _compilation_records() -> list[Any]:
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet: no need to import the compiler
        return []
    try:
        from torch._dynamo.utils import get_compilation_metrics
    except ImportError:
        return []
    return get_compilation_metrics()


def make_train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    cfg,
    *,
    log=print,
    steps_per_epoch: int = 1,
    compile: bool | None = None,
    batch_size: int | None = None,
) -> TrainStep:
    """The `TrainStep` a `Config` describes.

    Args:
        compile: compiled or eager; None: ``train.compile`` resolved for the student's device
            (`e2kd_fast.engine.builders.resolve_compile`: ``"auto"`` compiles on CUDA only).
        batch_size: as `TrainStep`: the images of a full micro-batch on this process.
    """
    if compile is None:
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        compile = resolve_compile(cfg.train.compile, device)[0]
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
        compile=compile,
        log=log,
        multilabel=d.multilabel,
        objective=objective,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
    )
