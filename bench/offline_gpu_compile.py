"""Offline compile of a live teacher's step graph for a Hopper GPU (sm_90: H100, H200), without one.

    python -m bench.offline_gpu_compile                     # R18 ← D169 e²KD teacher graph, batch 128, 224², bf16
    python -m bench.offline_gpu_compile --graph kd          # the KD teacher's graph (its forward)
    python -m bench.offline_gpu_compile --record            # also append to bench/results/sm90-offline-compile.jsonl

The graph is the one `TrainStep` compiles for a live teacher on a GPU, compiled the same way
(Dynamo with ``fullgraph=True``, the sweep's compile regions, Inductor's Triton back end), for
CUDA tensors that are fake: `FakeTensorMode` tensors on ``cuda`` carry shapes, dtypes and
strides and no data. The CUDA device is described to torch and Triton as an H200 (sm_90, 132
SMs), so every choice Inductor makes from the device is the one it makes there. Every Triton kernel
Inductor generates is built, with each of its autotuning configs, to a cubin for sm_90 in this
process (``compile_threads`` 1, so the builds are timed one by one), and is not loaded; the compiled
graph is never run. The compile is cold: Inductor's and Triton's caches are empty folders made for
the run, and one process compiles one graph (in-process caches would serve a second).

It reports the compile's wall time and its phases (`torch._dynamo.utils.compilation_time_metrics`),
the distinct Triton kernels built and their configs, the seconds the builds took (serial: a GPU
machine spreads them over its build workers) and the rest (the main process's share: tracing,
lowering, fusion, code generation), and how many configs the kernels with more than one would
benchmark on the GPU at their first launch. So a change's effect on the GPU's cold compile is
measured here before any GPU run; compare runs of one machine and one torch only.

What it does not measure: the GPU's autotuning benchmarks (it counts them), the device and the GPU
host's own speed, and the student's graphs (AOTAutograd traces their backward through the autograd
engine, which needs a CUDA context). It patches torch's and Triton's device queries while it runs
and restores them after; it depends on torch internals (tested with torch 2.14) and says so when
they are missing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_FILE = "sm90-offline-compile.jsonl"
GRAPHS = ("e2kd", "kd")
# The device Inductor is told it compiles for: an H200 (an H100 SXM differs only in memory).
H200_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H200",
    major=9,
    minor=0,
    multi_processor_count=132,
    regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048,
    max_threads_per_block=1024,
    warp_size=32,
    total_memory=140 * 2**30,
    L2_cache_size=50 * 2**20,
    shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472,
    gcnArchName="",
)


class NotRun(Exception):
    """Raised instead of running a compiled graph: there is no device to run it on."""


class _TritonTarget:
    """A Triton driver that names the sm_90 target and nothing more (nothing is loaded or launched)."""

    def get_current_target(self) -> Any:
        from bench.ptxas_report import sm90_target

        return sm90_target()

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_device_interface(self) -> Any:
        return torch.cuda

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


Build = tuple[str, int, float]
"""One Triton kernel built: its name, how many configs, seconds."""


def _patches(builds: list[Build]) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value while compiling): torch's and Inductor's device queries answer for
    an H200; Inductor loads a Triton kernel by building each config and appending to ``builds``;
    a compiled graph raises `NotRun` instead of running. ``torch.cuda.is_available()`` stays False."""
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor import output_code
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    props = H200_PROPERTIES

    def precompile(
        self: CachingAutotuner,
        warm_cache_only: bool = False,
        reload_kernel: Any = None,
        static_triton_bundle_key: str | None = None,
    ) -> None:
        if self.compile_results:
            return
        started = time.perf_counter()
        self._precompile_worker()  # every config to a cubin, as a build worker does
        builds.append((self.fn.__name__, len(self.compile_results or []), time.perf_counter() - started))

    def not_run(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotRun

    return [
        (CudaInterface, "is_available", staticmethod(lambda: True)),
        (CudaInterface, "get_device_properties", staticmethod(lambda device=None: props)),
        (CudaInterface, "get_compute_capability", staticmethod(lambda device=None: 90)),
        (CudaInterface, "current_device", staticmethod(lambda: 0)),
        (CudaInterface, "device_count", staticmethod(lambda: 1)),
        (CudaInterface, "is_bf16_supported", staticmethod(lambda including_emulation=False: True)),
        (torch.cuda, "get_device_properties", lambda device=None: props),
        (torch.cuda, "get_device_capability", lambda device=None: (9, 0)),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "is_bf16_supported", lambda including_emulation=True: True),
        (torch.cuda.amp.common, "amp_definitely_not_available", lambda: False),  # so that autocast stays on
        (CachingAutotuner, "precompile", precompile),
        (output_code.CompiledFxGraph, "__call__", not_run),
    ]


def unavailable_reason() -> str:
    """Why the offline compile cannot run here (empty when it can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 makes Triton interpret kernels rather than build them; unset it"
    return missing_internals()


def missing_internals() -> str:
    """What of torch's, Inductor's and Triton's internals the compile patches or uses is missing
    (empty when nothing is)."""
    try:
        from torch._inductor.runtime import triton_helpers
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
        from triton.compiler import make_backend
        from triton.runtime.driver import driver

        from bench.ptxas_report import sm90_target

        make_backend(sm90_target())
        needed = [(target, name) for target, name, _ in _patches([])]
        needed += [
            (CachingAutotuner, "_precompile_worker"),
            (triton_helpers, "skip_gpu_driver_setup"),
            (driver, "_active"),
        ]
    except Exception as err:  # ImportError, or Triton built without its CUDA back end
        return f"needs Triton's CUDA back end and torch 2.14's Inductor: {type(err).__name__}: {err}"
    missing = [f"{getattr(t, '__name__', type(t).__name__)}.{name}" for t, name in needed if not hasattr(t, name)]
    if missing:
        return f"this torch or Triton lacks what it patches or uses: {', '.join(missing)} (written for torch 2.14)"
    return ""


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    """``target.name = value`` for the block, the attribute put back as it was (for a class: the
    object in its own ``__dict__``, a staticmethod as such; deleted again if it was inherited)."""
    missing = object()
    saved = vars(target).get(name, missing) if isinstance(target, type) else getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(target, name)
        else:
            setattr(target, name, saved)


@contextlib.contextmanager
def sm90_without_a_device(builds: list[Build]) -> Iterator[None]:
    """Torch, Inductor and Triton see an sm_90 CUDA device (`_patches`) for the block; every Triton
    kernel Inductor loads is built and recorded in ``builds``, not loaded. What it patches is
    restored on exit, on an error too. Caches torch fills meanwhile (device properties, whether
    Triton works) keep the H200's description: a process that compiled here should not go on to
    use a real GPU, which is why `main` compiles one graph per process."""
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.driver import driver

    saved_driver = driver._active
    with contextlib.ExitStack() as stack:
        for target, name, value in _patches(builds):
            stack.enter_context(_patched(target, name, value))
        stack.enter_context(inductor_config.patch(compile_threads=1))  # builds in this process, timed
        stack.enter_context(triton_helpers.skip_gpu_driver_setup())
        stack.callback(setattr, driver, "_active", saved_driver)
        driver.set_active(_TritonTarget())
        yield


def _fake_cuda(model: torch.nn.Module, mode: Any, channels_last: bool) -> torch.nn.Module:
    """The model with every parameter and buffer replaced by a fake CUDA tensor of ``mode`` (a
    `FakeTensorMode`), parameters frozen as a teacher's, 4-d ones channels_last if asked."""
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = mode.from_tensor(p.detach()).to("cuda")
                    if channels_last and fake.dim() == 4:
                        fake = fake.contiguous(memory_format=torch.channels_last)
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = mode.from_tensor(b).to("cuda")
    return model


def compile_teacher_graph(
    pair: str, graph: str, batch: int, resolution: int, dtype: str, channels_last: bool
) -> dict[str, Any]:
    """Compiles the live teacher's ``graph`` ("e2kd": forward and explanation sweep; "kd": forward)
    of ``pair`` for sm_90, cold (Inductor's and Triton's caches in a temporary folder), on a batch of
    [batch, 6 or 3, resolution, resolution], and returns what it cost (see the module's docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench import common
    from bench.bench_step import PAIRS, inductor_metrics
    from e2kd_fast import create_model
    from e2kd_fast.engine.step import TrainStep

    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; known: {', '.join(PAIRS)}")
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")
    spec = PAIRS[pair]
    kwargs = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    teacher = _fake_cuda(create_model(spec.teacher, **kwargs).eval(), mode, channels_last)
    channels = 6 if spec.explanation == "bcos" else 3
    with mode:
        x = torch.empty(batch, channels, resolution, resolution, device="cuda")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    explain = graph == "e2kd"
    step = TrainStep(
        torch.nn.Identity(), teacher, lam=1.0 if explain else 0.0, explanation=spec.explanation, compile=True
    )
    compiled = step._compiled(step._teacher_graph(explain), "cuda")
    low_precision = common.DTYPES[dtype] != torch.float32
    builds: list[Build] = []
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        caches = stack.enter_context(tempfile.TemporaryDirectory(prefix="offline-gpu-compile-"))
        stack.enter_context(common.environment_variable("TORCHINDUCTOR_CACHE_DIR", os.path.join(caches, "inductor")))
        stack.enter_context(common.environment_variable("TRITON_CACHE_DIR", os.path.join(caches, "triton")))
        started = time.perf_counter()
        stack.enter_context(sm90_without_a_device(builds))
        counted = stack.enter_context(inductor_metrics())
        stack.enter_context(mode)
        if low_precision:  # made here: outside the patches autocast finds no CUDA and turns itself off
            stack.enter_context(torch.autocast("cuda", dtype=common.DTYPES[dtype]))
            if not torch.is_autocast_enabled("cuda"):
                raise RuntimeError("bench.offline_gpu_compile: CUDA autocast did not turn on")
        try:
            compiled(x)
            raise RuntimeError("bench.offline_gpu_compile: the compiled graph ran; it should have stopped")
        except NotRun:
            wall = time.perf_counter() - started
    torch._dynamo.reset()
    build_s = sum(seconds for _, _, seconds in builds)
    configs = collections.Counter(n for _, n, _ in builds)
    tuned = [n for _, n, _ in builds if n > 1]
    return {
        "pair": pair,
        "teacher": spec.teacher,
        "graph": f"teacher {graph}",
        "batch": batch,
        "resolution": resolution,
        "dtype": dtype,
        "channels_last": channels_last,
        "compile_s": round(wall, 2),
        "build_s": round(build_s, 2),
        "main_process_s": round(wall - build_s, 2),
        "triton_kernels": len(builds),
        "configs_built": sum(n for _, n, _ in builds),
        "configs_per_kernel": {str(k): v for k, v in sorted(configs.items())},
        "kernels_autotuned": len(tuned),
        "configs_benchmarked": sum(tuned),
        "inductor_generated_kernels": counted["kernels"],
        "phases_s": counted["phases"],
    }


def table(records: Sequence[dict[str, Any]]) -> str:
    """The records as a markdown table, one row per compiled graph."""
    from bench import common

    headers = ["graph", "batch, size", "compile s", "builds s (serial)", "rest s", "kernels", "configs", "benchmarked"]
    rows = [
        [
            f"{r['pair']} {r['graph']}",
            f"{r['batch']}, {r['resolution']}², {r['dtype']}",
            f"{r['compile_s']:.1f}",
            f"{r['build_s']:.1f}",
            f"{r['main_process_s']:.1f}",
            r["triton_kernels"],
            r["configs_built"],
            f"{r['configs_benchmarked']} in {r['kernels_autotuned']} kernels",
        ]
        for r in records
    ]
    return common.markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    from bench import common

    parser = argparse.ArgumentParser(prog="python -m bench.offline_gpu_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="bcos_r18<-bcos_d169", help="a pair of bench step (default: %(default)s)")
    parser.add_argument("--graph", choices=GRAPHS, default="e2kd", help="the teacher graph (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="bfloat16", help="autocast dtype")
    parser.add_argument("--no-channels-last", action="store_true", help="teacher and batch in the default layout")
    parser.add_argument("--record", action="store_true", help=f"append the record to bench/results/{RESULTS_FILE}")
    parser.add_argument("--out", default=None, help="also write the record to this JSONL file")
    parser.add_argument("--quiet", action="store_true", help="no progress line (the table is still printed)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench.offline_gpu_compile: {reason}", file=sys.stderr)
        return 2
    env = {
        **common.environment(torch.device("cpu")),
        "target": "cuda sm_90, described as an H200",
        "run_id": common.new_run_id(),
        "time": common.utc_now(),
    }
    if not args.quiet:
        print(
            f"compiling the {args.pair} teacher's {args.graph} graph for sm_90, cold ...", file=sys.stderr, flush=True
        )
    record = compile_teacher_graph(
        args.pair, args.graph, args.batch, args.resolution, args.dtype, not args.no_channels_last
    )
    records = [{**record, **env}]
    if args.out:
        common.write_jsonl(records, Path(args.out), append=False)
    if args.record:
        path = common.RESULTS_DIR / RESULTS_FILE
        common.write_jsonl(records, path, append=True)
        if not args.quiet:
            print(f"appended the record to {path}", file=sys.stderr)
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
