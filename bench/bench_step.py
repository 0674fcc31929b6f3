"""The `step` suite: one training step, images/s and peak memory, against the reference recipe.

Variants, all on the same models, batch, resolution and precision, in one process:

- ``reference``: the official implementation's way (bcos_and_e2kd.md §3.2). The input requires grad,
  both models are put in explanation mode, the teacher is in eval mode **with parameters that still
  require grad** (bug 9: ``param_to_buffer`` keeps ``requires_grad=True``, so a teacher autograd
  graph is recorded), the student explanation is ``autograd.grad(create_graph=True)``, the teacher's
  an input-gradient backward through its graph; eager. GradCAM pairs do the same with GradCAM.
- ``kd``: our `e2kd_objective` with λ = 0 (teacher under ``no_grad``).
- ``e2kd-live``: our `e2kd_objective` (teacher explained without any autograd graph).
- ``e2kd-frozen``: our `e2kd_objective` with precomputed `TeacherOutputs` (no teacher pass).
- ``e2kd-ckpt``: ``e2kd-live`` with the student's stages activation-checkpointed (a copy of the
  student with its own optimiser, so the other variants are untouched). Not in the default list.
- ``e2kd-live-graphed``: ``e2kd-live`` with the compiled teacher graph replayed as a CUDA graph
  (`TrainStep`'s ``teacher_cuda_graph``; CUDA and ``--compile`` only; its second step records the
  graph, so give it ``--warmup 2`` or more). Not in the default list.

The variants alternate in rounds (A B C D, then D C B A, ...) so slow drift of the machine cancels.
Peak memory is measured in a fresh subprocess per (configuration, variant): CUDA's
``max_memory_allocated``, or on the CPU the peak RSS (VmHWM, reset right before the first step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import common, floor

SUITE = "step"
REFERENCE = "reference"
VARIANTS = ("reference", "kd", "e2kd-live", "e2kd-frozen", "e2kd-ckpt", "e2kd-live-graphed")
DEFAULT_VARIANTS = VARIANTS[:4]


@dataclass(frozen=True)
class Pair:
    """A student ← teacher pair of the paper, explained by B-cos dynamic weights or GradCAM."""

    student: str
    teacher: str
    explanation: str
    num_classes: int | None = None  # None: the models' default (1000)


PAIRS: dict[str, Pair] = {
    "bcos_r18<-bcos_d169": Pair("bcos_resnet18", "bcos_densenet169", "bcos"),
    "bcos_r18<-bcos_r50": Pair("bcos_resnet18", "bcos_resnet50", "bcos"),
    "bcos_vit_ti<-bcos_d169": Pair("bcos_vit_ti_patch16_224", "bcos_densenet169", "bcos"),
    "r18<-r34": Pair("resnet18", "resnet34", "gradcam"),
    # Tiny pairs for the CPU smoke test: they check the harness, not the speed.
    "tiny_bcos": Pair("bcos_resnet20_cifar", "bcos_resnet32_cifar", "bcos", num_classes=10),
    "tiny_gradcam": Pair("resnet18", "resnet34", "gradcam", num_classes=10),
}
REAL_PAIRS = ("bcos_r18<-bcos_d169", "bcos_r18<-bcos_r50", "bcos_vit_ti<-bcos_d169", "r18<-r34")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs",
        default=None,
        help=f"comma-separated pairs (default: all real pairs on CUDA, bcos_r18<-bcos_r50 on CPU); "
        f"known: {', '.join(PAIRS)}",
    )
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 8 on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 224 on CUDA, 128 on CPU)")
    parser.add_argument(
        "--dtype",
        choices=sorted(common.DTYPES),
        default=None,
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds (each variant once per round)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="steps per variant before the rounds (at least 1; the first is timed on its own: first_step_s)",
    )
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument(
        "--memory",
        choices=("subprocess", "none"),
        default="subprocess",
        help="peak memory: fresh subprocess per variant, or skip",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per variant)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile our variants' forward-to-loss graph (fullgraph); compile time is spent in the warm-up",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: a variant whose first step would end later (predicted from the slowest first step so far) "
        "is not run (status error, with a note)",
    )
    parser.add_argument(
        "--warm-compile",
        action="store_true",
        help="with --compile: time the first step again in a fresh process with the compile caches populated",
    )
    parser.add_argument(
        "--warm-compile-runs",
        type=int,
        default=3,
        help="fresh processes per variant for --warm-compile; the record keeps their median and every sample "
        "(one warm start varies by a second or more from process to process)",
    )


def build_configs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    pairs = args.pairs.split(",") if args.pairs else (list(REAL_PAIRS) if cuda else ["bcos_r18<-bcos_r50"])
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pair(s) {unknown}; known: {', '.join(PAIRS)}")
    return [
        {
            "pair": p,
            "student": PAIRS[p].student,
            "teacher": PAIRS[p].teacher,
            "explanation": PAIRS[p].explanation,
            "batch": args.batch or (64 if cuda else 8),
            "resolution": args.resolution or (224 if cuda else 128),
            "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
            "channels_last": bool(args.channels_last),
            "tau": args.tau,
            "lam": args.lam,
            "optimizer": "sgd(lr=1e-4,momentum=0.9)",
            "compile": bool(args.compile),
        }
        for p in pairs
    ]


# --------------------------------------------------------------------------------------------------
# Building one configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class StepSetup:
    config: dict[str, Any]
    device: torch.device
    student: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    x: Tensor
    frozen: Any  # TeacherOutputs | None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = common.DTYPES[self.config["dtype"]]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def build_setup(
    config: dict[str, Any], device: torch.device, *, teacher: bool = True, frozen: bool = True
) -> StepSetup:
    """Models (student in train mode, teacher in eval mode), a seeded batch and, if asked, frozen outputs."""
    from e2kd_fast import create_model
    from e2kd_fast.data import IMAGENET_MEAN, IMAGENET_STD
    from e2kd_fast.distill import teacher_outputs
    from e2kd_fast.nn import AddInverse

    pair = PAIRS[config["pair"]]
    kwargs = {} if pair.num_classes is None else {"num_classes": pair.num_classes}
    torch.manual_seed(0)
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    student = create_model(config["student"], **kwargs).to(device, memory_format=memory_format).train()
    teacher_model = create_model(config["teacher"], **kwargs).to(device, memory_format=memory_format).eval()
    teacher_model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(config["batch"], 3, config["resolution"], config["resolution"], generator=gen)
    if pair.explanation == "bcos":
        x = AddInverse()(images)
    else:
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (images - mean) / std
    x = x.to(device).contiguous(memory_format=memory_format)
    outputs = None
    if frozen:
        outputs = teacher_outputs(teacher_model, x, explanation=pair.explanation, algorithm="sweep")
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    return StepSetup(config, device, student, teacher_model if teacher else None, optimizer, x, outputs)


def make_step(setup: StepSetup, variant: str, compile: bool | None = None) -> Callable[[], None]:
    """One full optimiser step of ``variant`` on the setup's batch.

    Our variants run the engine's `TrainStep` (explanations by the explicit sweep, GradCAM in closed
    form), compiled with ``fullgraph=True`` when ``compile`` (default: the config's ``compile``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown step variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == REFERENCE:
        return _reference_step(setup)
    from e2kd_fast.engine.step import TrainStep

    cfg = setup.config
    student, optimizer = setup.student, setup.optimizer
    if variant == "e2kd-ckpt":
        from e2kd_fast.nn.activation_checkpointing import enable_activation_checkpointing

        student = copy.deepcopy(setup.student)
        enable_activation_checkpointing(student)
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    lam = 0.0 if variant == "kd" else cfg["lam"]
    frozen = setup.frozen if variant == "e2kd-frozen" else None
    teacher = None if variant == "e2kd-frozen" else setup.teacher
    if variant == "e2kd-frozen" and frozen is None:
        raise ValueError("the e2kd-frozen variant needs a setup built with frozen=True")
    compile = cfg.get("compile", False) if compile is None else compile
    train_step = TrainStep(
        student,
        teacher,
        tau=cfg["tau"],
        lam=lam,
        explanation=cfg["explanation"],
        compile=compile,
        log=print,
        teacher_cuda_graph=variant == "e2kd-live-graphed" and compile,
    )

    def step() -> None:
        if teacher is not None:
            teacher.requires_grad_(False)  # ours: a frozen teacher (the reference turns it back on)
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            out = train_step(setup.x, None, 0, frozen)
        out["loss"].backward()
        optimizer.step()

    return step


def _reference_step(setup: StepSetup) -> Callable[[], None]:
    """The official recipe, written out (bcos_and_e2kd.md §3.2, including bugs 8/9's teacher graph)."""
    from e2kd_fast.nn import explanation_mode
    from e2kd_fast.reference.losses import explanation_cosine_loss, kd_kl

    cfg, student, teacher = setup.config, setup.student, setup.teacher
    if teacher is None:
        raise ValueError("the reference recipe needs a live teacher")

    def bcos_explanations(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with explanation_mode(student), explanation_mode(teacher):
            zs, zt = student(x), teacher(x)
            c = zt.argmax(1, keepdim=True)
            (es,) = torch.autograd.grad(zs.gather(1, c).sum(), x, create_graph=True)
            (et,) = torch.autograd.grad(zt.gather(1, c).sum(), x)
        return zs, zt, es, et

    def gradcam_explanations(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from e2kd_fast.explain.gradcam import split_forward

        a_s, head_s = split_forward(student, x)
        zs = head_s(a_s)
        a_t, head_t = split_forward(teacher, x)  # recorded: the teacher's parameters require grad
        zt = head_t(a_t)
        c = zt.argmax(1, keepdim=True)
        (gs,) = torch.autograd.grad(zs.gather(1, c).sum(), a_s, create_graph=True)
        (gt,) = torch.autograd.grad(zt.gather(1, c).sum(), a_t)
        size = x.shape[-2:]
        es = F.interpolate(
            F.relu((gs.mean((2, 3), keepdim=True) * a_s).sum(1, keepdim=True)), size=size, mode="bilinear"
        )
        et = F.interpolate(
            F.relu((gt.mean((2, 3), keepdim=True) * a_t).sum(1, keepdim=True)), size=size, mode="bilinear"
        )
        return zs, zt, es, et

    explanations = bcos_explanations if cfg["explanation"] == "bcos" else gradcam_explanations

    def step() -> None:
        teacher.requires_grad_(True)  # bug 9: the official teacher "buffers" still require grad
        setup.optimizer.zero_grad(set_to_none=True)
        x = setup.x.detach().requires_grad_(True)
        with setup.autocast():
            zs, zt, es, et = explanations(x)
            loss = kd_kl(zs, zt.detach(), cfg["tau"]) + cfg["lam"] * explanation_cosine_loss(
                es, et.detach().to(es.dtype)
            )
        loss.backward()  # outside explanation mode: the full gradient, through the explanation graph
        setup.optimizer.step()

    return step


# --------------------------------------------------------------------------------------------------
# Counters: FLOPs and bytes of the eager step, Inductor's kernels and bytes of the compiled one
# --------------------------------------------------------------------------------------------------


def _count(step: Callable[[], None]) -> floor.Traffic | None:
    try:
        return floor.count_traffic(step)
    except Exception:  # a path the counter cannot see through: report no figure, not a wrong one
        return None


# The compiler's phases that do not contain one another, in the order they run, as the log names them.
COMPILE_PHASES = (
    ("bytecode_tracing", "Dynamo trace"),
    ("aot_trace_joint_graph", "joint trace"),
    ("min_cut_rematerialization_partition", "partition"),
    ("Scheduler.__init__", "fusion"),
    ("Scheduler.codegen", "kernel code"),
    ("async_compile.wait", "waiting for kernel builds"),
)


@contextlib.contextmanager
def inductor_metrics():
    """Kernels Inductor generates, and the bytes it estimates they move, while the block runs.

    Yields a dict filled on exit: ``kernels`` (`torch._inductor.metrics.generated_kernel_count`),
    ``bytes`` (`num_bytes_accessed`: each scheduled kernel's buffer reads and writes, summed; Inductor
    computes it only while its ``inductor_metrics`` log is enabled at INFO, which this does with a
    silent handler), and ``phases``: the seconds the block spent in each of the compiler's timed
    phases (`torch._dynamo.utils.compilation_time_metrics`; they nest, so they do not add up), those
    of at least 0.5 s. Kernels and bytes are counted at compile time: a block
    that compiles nothing counts 0, and a hit in Inductor's FX-graph cache replays the counts stored
    with the cached graph.
    """
    import logging

    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor import metrics

    def phase_totals() -> dict[str, float]:
        return {name: sum(times) for name, times in compilation_time_metrics.items()}

    logger = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    saved = (logger.level, logger.propagate)
    handler = logging.NullHandler()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    counted: dict[str, Any] = {"kernels": None, "bytes": None, "phases": None}
    metrics.reset()
    before = phase_totals()
    try:
        yield counted
    finally:
        counted["kernels"] = metrics.generated_kernel_count
        counted["bytes"] = metrics.num_bytes_accessed or None
        spent = {name: total - before.get(name, 0.0) for name, total in phase_totals().items()}
        counted["phases"] = {name: round(seconds, 2) for name, seconds in spent.items() if seconds >= 0.5}
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def warm_compile_probe(config: dict[str, Any], variant: str, device: torch.device) -> float:
    """Seconds of the first step of ``variant`` in this process (call it in a fresh one, caches warm)."""
    setup = build_setup(config, device, teacher=variant != "e2kd-frozen", frozen=variant == "e2kd-frozen")
    return common.time_once(make_step(setup, variant), device) / 1e3


def run_warm_compile_probe(config: dict[str, Any], variant: str, device: torch.device) -> float | None:
    """`warm_compile_probe` in a fresh interpreter sharing this one's compile caches (None if it fails)."""
    result = _run_probe("--warmprobe", config, variant, device)
    return result["first_step_s"] if isinstance(result, dict) else None


def _run_probe(flag: str, config: dict[str, Any], variant: str, device: torch.device) -> dict[str, Any] | str:
    """Runs ``python -m bench.bench_step FLAG payload`` in a fresh interpreter: its JSON result, or on
    failure the last lines of its output."""
    payload = json.dumps(
        {"config": config, "variant": variant, "device": str(device), "threads": torch.get_num_threads()}
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(common.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_step", flag, payload],
        cwd=common.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        return " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Memory probe (runs in a fresh interpreter)
# --------------------------------------------------------------------------------------------------


MEMORY_STEPS = 2  # measured after one warm-up step (optimiser state, compilation), for every variant


def memory_probe(config: dict[str, Any], variant: str, device: torch.device) -> dict[str, Any]:
    """Peak memory of ``MEMORY_STEPS`` steps of ``variant``, in this process (call it in a fresh one)."""
    frozen = variant == "e2kd-frozen"
    setup = build_setup(config, device, teacher=not frozen, frozen=frozen)
    step = make_step(setup, variant)
    step()  # warm-up outside the measurement: the compiler's own memory and the optimiser state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(MEMORY_STEPS):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda max_memory_allocated in a fresh process after a warm-up step; step = peak - allocated before"
        return {"peak_bytes": peak, "step_bytes": peak - before, "method": method}
    common.release_free_memory()
    reset = common.reset_peak_rss()
    before = common.proc_status_kib("VmRSS")
    for _ in range(MEMORY_STEPS):
        step()
    peak = common.proc_status_kib("VmHWM")
    if before is None or peak is None:
        return {"peak_bytes": None, "step_bytes": None, "method": "unavailable (no /proc/self/status)"}
    method = "cpu peak RSS (VmHWM) in a fresh process after a warm-up step; step = peak - RSS before"
    if not reset:
        method += "; VmHWM could not be reset, so setup transients may be included"
    return {"peak_bytes": peak * 1024, "step_bytes": (peak - before) * 1024, "method": method}


def run_memory_probe(config: dict[str, Any], variant: str, device: torch.device) -> dict[str, Any]:
    """Runs `memory_probe` in a fresh interpreter (so one variant's peak cannot hide another's)."""
    result = _run_probe("--memprobe", config, variant, device)
    if isinstance(result, str):
        return {"peak_bytes": None, "step_bytes": None, "method": "failed: " + result}
    return result


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


def run(
    args: argparse.Namespace, device: torch.device, env: dict[str, Any], run_id: str, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "e2kd-live-graphed" in variants and (device.type != "cuda" or not args.compile):
        raise SystemExit("the e2kd-live-graphed variant replays a compiled teacher graph: it needs --compile on CUDA")
    if args.warm_compile and args.warm_compile_runs < 1:
        raise SystemExit(f"--warm-compile-runs must be at least 1, got {args.warm_compile_runs}")
    if REFERENCE not in variants:
        log("note: without the reference variant no ratios can be computed")
    records: list[dict[str, Any]] = []
    for config in build_configs(args, device):
        log(f"[step] {config['pair']}: batch {config['batch']}, {config['resolution']}², {config['dtype']}")
        records.extend(_run_config(config, variants, args, device, env, run_id, log))
    common.add_ratios(records)
    return records


def _run_config(config, variants, args, device, env, run_id, log) -> list[dict[str, Any]]:
    setup = build_setup(config, device, frozen="e2kd-frozen" in variants)
    steps = {v: make_step(setup, v) for v in variants}
    first_step_s: dict[str, float] = {}
    inductor: dict[str, dict[str, Any]] = {}
    started, all_variants, skipped = time.perf_counter(), variants, []
    for v in all_variants:  # warm-up (and compilation) outside the rounds; the first step is timed on its own
        # A first step (compilation) can take minutes: one predicted to overrun the budget is left out,
        # so that a caller's timeout does not cut the run before any record is written.
        predicted = max(first_step_s.values(), default=0.0)
        if args.time_budget and time.perf_counter() - started + predicted > args.time_budget:
            skipped.append(v)
            continue
        with inductor_metrics() as counted:
            first_step_s[v] = common.time_once(steps[v], device) / 1e3
        if config["compile"] and v != REFERENCE:
            inductor[v] = counted
        for _ in range(args.warmup - 1):
            steps[v]()
    common.synchronize(device)
    variants = [v for v in all_variants if v not in skipped]
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # ABCD DCBA: linear drift cancels
        for v in order:
            for _ in range(args.steps_per_round):
                samples[v].append(common.time_once(steps[v], device))
    # FLOPs and bytes are counted on eager steps: a compiled step hides its ops from the counter.
    traffic = {v: (None if args.no_flops else _count(make_step(setup, v, compile=False))) for v in variants}
    warm_samples = {  # None for a probe process that failed
        v: [run_warm_compile_probe(config, v, device) for _ in range(args.warm_compile_runs)]
        for v in variants
        if args.warm_compile and config["compile"] and v != REFERENCE
    }
    warm_s = {
        v: statistics.median(done)
        for v, probes in warm_samples.items()
        if (done := [seconds for seconds in probes if seconds is not None])
    }
    del steps, setup
    records = []
    for v in skipped:
        note = (
            f"not run: its first step would have ended after the --time-budget of {args.time_budget:g} s "
            "(predicted from the slowest first step before it)"
        )
        log(f"  {v:12s} {note}")
        records.append(
            common.make_record(
                run_id=run_id,
                env=env,
                suite=SUITE,
                config=config,
                variant=v,
                reference=REFERENCE,
                status="error",
                note=note,
            )
        )
    for v in variants:
        stats = common.summarize(samples[v])
        memory = run_memory_probe(config, v, device) if args.memory == "subprocess" else None
        seconds = stats["median"] / 1e3
        t = traffic[v]
        flops = t.flops if t else None
        achieved = flops / seconds if flops else None
        floors = {k: f["floor_ms"] for k, f in floor.floors(t, config["dtype"]).items()} if t else None
        over = floor.over_floor(stats["median"], t, env["device_kind"], config["dtype"]) if t else None
        record = common.make_record(
            run_id=run_id,
            env=env,
            suite=SUITE,
            config=config,
            variant=v,
            reference=REFERENCE,
            time_ms=stats,
            samples_ms=samples[v],
            throughput={"value": config["batch"] / seconds, "unit": "img/s"},
            flops=flops,
            gflop_per_img=flops / config["batch"] / 1e9 if flops else None,
            tflops=achieved / 1e12 if achieved else None,
            mfu=common.mfu(env["device_kind"], config["dtype"], achieved),
            bytes=t.bytes if t else None,
            floor_ms=floors,
            time_over_floor=over,
            first_step_s=first_step_s[v],
            warm_first_step_s=warm_s.get(v),
            warm_first_step_samples_s=warm_samples.get(v),
            inductor_kernels=inductor.get(v, {}).get("kernels"),
            inductor_bytes=inductor.get(v, {}).get("bytes"),
            compile_phases_s=inductor.get(v, {}).get("phases"),
            memory=memory,
            teacher_requires_grad=(v == REFERENCE),
        )
        log(
            f"  {v:12s} {stats['median']:9.1f} ms  {config['batch'] / seconds:8.1f} img/s"
            f"  first step {first_step_s[v]:.1f} s"
            + (f"  warm first step {warm_s[v]:.1f} s" if v in warm_s else "")
            + (f"  ÷ floor {over:.2f}" if over else "")
            + (f"  kernels {inductor[v]['kernels']}" if v in inductor else "")
            + (f"  step mem {common.fmt_bytes(memory['step_bytes'])}" if memory else "")
        )
        phases = inductor.get(v, {}).get("phases") or {}
        if shown := [f"{label} {phases[name]:.1f}" for name, label in COMPILE_PHASES if name in phases]:
            log("    compile, s: " + ", ".join(shown))
        records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    rows = []
    for r in records:
        if r["suite"] != SUITE:
            continue
        t, mem, cfg = r.get("time_ms") or {}, r.get("memory") or {}, r["config"]
        ratio = r.get("ratio")
        rows.append(
            [
                cfg["pair"],
                f"{cfg['batch']}×{cfg['resolution']}² {cfg['dtype']}",
                r["variant"],
                common.fmt_num(r["throughput"]["value"]) if r.get("throughput") else "–",
                f"{common.fmt_num(t.get('median'))} ({common.fmt_num(t.get('p20'))}–{common.fmt_num(t.get('p80'))})",
                common.fmt_num(1 / ratio) + "×" if ratio else "–",
                common.fmt_bytes(mem.get("peak_bytes")),
                common.fmt_bytes(mem.get("step_bytes")),
                common.fmt_num(r.get("mem_ratio")) + "×" if r.get("mem_ratio") else "–",
                common.fmt_num(r.get("gflop_per_img")),
                common.fmt_num(100 * r["mfu"]) + " %" if r.get("mfu") else "–",
                common.fmt_num(r.get("time_over_floor")) + "×" if r.get("time_over_floor") else "–",
                common.fmt_num(r.get("first_step_s")),
                str(r["inductor_kernels"]) if r.get("inductor_kernels") is not None else "–",
            ]
        )
    headers = [
        "pair",
        "batch, res, dtype",
        "variant",
        "img/s",
        "ms/step median (p20–p80)",
        "speed vs reference",
        "peak mem",
        "step mem",
        "step mem ÷ reference",
        "GFLOP/img",
        "MFU",
        "time ÷ floor",
        "first step s",
        "kernels",
    ]
    return common.markdown_table(headers, rows)


def _memprobe_main(payload: str) -> None:
    spec = json.loads(payload)
    torch.set_num_threads(int(spec["threads"]))
    common.pin_heap(torch.device(spec["device"]))
    result = memory_probe(spec["config"], spec["variant"], torch.device(spec["device"]))
    print(json.dumps(result))


def _warmprobe_main(payload: str) -> None:
    spec = json.loads(payload)
    torch.set_num_threads(int(spec["threads"]))
    common.pin_heap(torch.device(spec["device"]))
    seconds = warm_compile_probe(spec["config"], spec["variant"], torch.device(spec["device"]))
    print(json.dumps({"first_step_s": seconds}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memprobe":
        _memprobe_main(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--warmprobe":
        _warmprobe_main(sys.argv[2])
    else:
        raise SystemExit("internal entry point; run `python -m bench step` instead")
