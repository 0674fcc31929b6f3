"""Offline Hopper resource report of every Triton kernel: registers, spills, shared memory.

    python -m bench ptxas                      # the zoo's specialisations (R18/R50/D169 at 224²)
    python -m bench ptxas --workload core      # the small set tests/test_kernel_resources.py compiles
    python -m bench ptxas --record             # also append to bench/results/sm90a-ptxas.jsonl

No GPU is needed. The launchers of ``kernels/*.py`` run on ``meta`` tensors (no data, no device)
with their ``@triton.jit`` kernels swapped for recorders, so every launch they would make on a GPU
is captured with its real arguments, block sizes and ``num_warps``. Each launch is specialised the
way Triton's JIT would specialise it on a GPU (argument types, 16-divisible pointers and integers,
integers equal to 1 as constants), distinct specialisations are compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, and the PTX goes through
``ptxas -arch=sm_90a -v`` (``/usr/local/cuda/bin/ptxas``, or ``$PTXAS``). The table lists per
specialisation the registers, the spill stores and loads, the stack frame, ptxas' static shared
memory and Triton's dynamic shared memory, and where it came from (op, shape, dtype, layout).

Workloads: ``zoo`` is what the ops launch at every B-cos conv of R18/R50/D169 at 224² (batch 64
and 128; bf16, fp16 and fp32; NCHW and channels_last), the contribution map of 6×224² inputs and
the loss at batch 64/128/256 with 1000 classes and 6×224² maps. ``core`` replaces the traced conv
shapes with `CORE_CONV_GEOMETRIES` (batch 64 only), a handful of geometries that give the same block
sizes and constants as the zoo; `main` says when the zoo has a specialisation ``core`` lacks
(ignoring integer divisibility), so the test's set can be kept complete. Results are cached in
``.cache/ptxas`` per kernel source, specialisation, Triton and ptxas (``--no-cache`` compiles all).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

TARGET_ARCH = 90
PTXAS_ARCH = "sm_90a"
DEFAULT_PTXAS = "/usr/local/cuda/bin/ptxas"
RESULTS_FILE = "sm90a-ptxas.jsonl"
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "ptxas"
KERNEL_MODULES = ("bcos_conv2d", "contribution_map", "distill_loss")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_DTYPES = (torch.bfloat16, torch.float32)
ZOO_MODELS = ("bcos_resnet18", "bcos_resnet50", "bcos_densenet169")
ZOO_BATCHES = (64, 128)
LOSS_BATCHES = (64, 128, 256)
LOSS_CLASSES = 1000
MAP_SHAPE = (6, 224, 224)  # the explanation maps and contribution-map inputs of a 224² B-cos model
B_VALUES = (2.0,)  # every conv of the zoo's B-cos models (the epilogue's B = 2 branch)

# (C, H, W, O, k, stride, padding, groups): the stem; 3×3 and 1×1 at 56², 28², 14² and 7×7, strided
# and not; 32 (DenseNet's growth), 64, 128, 512 and 1000 outputs; DenseNet's wide 1×1 at 7×7.
# Together they reach every block size and constant the zoo reaches (checked by `main` on the zoo
# workload); the implicit GEMM's tile choices make most of them necessary.
CORE_CONV_GEOMETRIES: tuple[tuple[int, ...], ...] = (
    (6, 224, 224, 64, 7, 2, 3, 1),
    (64, 56, 56, 64, 3, 1, 1, 1),
    (64, 56, 56, 64, 1, 1, 0, 1),
    (64, 56, 56, 128, 1, 2, 0, 1),
    (64, 56, 56, 128, 3, 2, 1, 1),
    (128, 28, 28, 32, 3, 1, 1, 1),
    (128, 28, 28, 128, 3, 1, 1, 1),
    (128, 28, 28, 512, 1, 1, 0, 1),
    (256, 14, 14, 512, 1, 2, 0, 1),
    (256, 14, 14, 512, 3, 2, 1, 1),
    (128, 7, 7, 32, 3, 1, 1, 1),
    (512, 7, 7, 512, 3, 1, 1, 1),
    (512, 7, 7, 1000, 1, 1, 0, 1),
    (1632, 7, 7, 128, 1, 1, 0, 1),
)


# --------------------------------------------------------------------------------------------------
# Recording the launches
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call a launcher made, and the workload that made it."""

    fn: Any  # triton.runtime.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    origin: str


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``rec[grid](...)`` records the call instead of launching."""

    def __init__(self, fn: Any, sink: list[Launch], origin: Callable[[], str]) -> None:
        self.fn = fn
        self._sink = sink
        self._origin = origin

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self._sink.append(Launch(self.fn, tuple(grid), args, kwargs, self._origin()))

        return record


def _jit_function(value: Any) -> Any:
    """The ``JITFunction`` of a kernel, also under ``TRITON_INTERPRET=1`` (where ``@triton.jit``
    makes an interpreted function instead); None for anything else."""
    from triton.runtime.jit import JITFunction

    if isinstance(value, JITFunction):
        return value
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    if isinstance(value, InterpretedFunction):
        if value not in _JIT_OF_INTERPRETED:
            _JIT_OF_INTERPRETED[value] = JITFunction(value.fn, **value.kwargs)
        return _JIT_OF_INTERPRETED[value]
    return None


_JIT_OF_INTERPRETED: dict[Any, Any] = {}  # one JITFunction per interpreted kernel or helper


def _kernel_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(f"e2kd_fast.kernels.{name}") for name in KERNEL_MODULES]


@contextlib.contextmanager
def compilable() -> Iterator[None]:
    """Lets Triton's compiler see JITFunctions where ``TRITON_INTERPRET=1`` left interpreted ones.

    A kernel that calls a ``@triton.jit`` helper finds it in its module's globals; the compiler
    cannot call an interpreted function, so the modules hold the helpers' JITFunctions meanwhile.
    Triton's own library functions (``tl.zeros``, the reductions' combine functions) are
    ``@triton.jit`` helpers too.
    """
    import sys

    language = [module for name, module in list(sys.modules.items()) if name.startswith("triton.language")]
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for module in _kernel_modules() + language:
            for attr, value in list(vars(module).items()):
                fn = _jit_function(value)
                if fn is not None and fn is not value:
                    swapped.append((module, attr, value))
                    setattr(module, attr, fn)
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


@contextlib.contextmanager
def recording() -> Iterator[tuple[list[Launch], Callable[[str], None]]]:
    """Swaps every ``@triton.jit`` kernel of the kernel modules for a recorder.

    Yields the list the launches go to and a function that sets the origin label of the next ones.
    """
    sink: list[Launch] = []
    label = [""]
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for module in _kernel_modules():
            for attr, value in list(vars(module).items()):
                fn = _jit_function(value)
                if fn is not None:
                    swapped.append((module, attr, value))
                    setattr(module, attr, _Recorder(fn, sink, lambda: label[0]))
        yield sink, lambda text: label.__setitem__(0, text)
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(shape: Sequence[int], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _conv_launches(
    geometries: Sequence[tuple[int, ...]], batches: Sequence[int], set_origin: Callable[[str], None]
) -> None:
    """What ``e2kd::bcos_conv2d``, ``e2kd::patch_norm`` and ``e2kd::scaled_conv_adjoint`` launch."""
    from e2kd_fast.kernels import bcos_conv2d as kernels

    from e2kd_fast.ops._common import conv_output_size

    for c, h, w, o, k, s, p, g in geometries:
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        for n in batches:
            for dtype in DTYPES:
                for channels_last in (False, True):
                    where = f"C{c}→{o} {h}² k{k} s{s}" + (f" g{g}" if g > 1 else "") + f", N{n}, {_dtype_name(dtype)}"
                    where += ", channels_last" if channels_last else ", NCHW"
                    x = _meta((n, c, h, w), dtype, channels_last)
                    lin = _meta((n, o, ho, wo), dtype, channels_last)
                    for b in B_VALUES:
                        set_origin(f"bcos_conv2d {where}")
                        kernels.bcos_conv2d_epilogue(lin, x, [k, k], [s, s], [p, p], g, b, False)
                    set_origin(f"patch_norm {where}")
                    kernels.patch_norm(x, [k, k], [s, s], [p, p], g, o)
                    set_origin(f"scaled_conv_adjoint {where}")
                    kernels.scale_product(_meta(lin.shape, dtype, channels_last), lin)
                    # The implicit GEMM (E2KD_TRITON_CONV=implicit-gemm) runs on channels_last inputs;
                    # fp16 takes bf16's tiles and instructions, so bf16 stands for both.
                    if g == 1 and channels_last and dtype in GEMM_DTYPES:
                        w_hat = _meta((o, c, k, k), dtype)
                        for b in B_VALUES:
                            set_origin(f"bcos_conv2d implicit-gemm {where}")
                            kernels.bcos_conv2d_gemm(x, w_hat, b, [s, s], [p, p])
                        set_origin(f"scaled_conv_adjoint implicit-gemm {where}")
                        scale = _meta((n, 1, ho, wo), dtype, channels_last)
                        kernels.scaled_conv_adjoint_gemm(lin, scale, w_hat, [h, w], [s, s], [p, p])
                        set_origin(f"scaled_conv_adjoint backward implicit-gemm {where}")
                        kernels.conv2d_product(x, w_hat, [s, s], [p, p], scale, lin)


def _loss_launches(batches: Sequence[int], set_origin: Callable[[str], None]) -> None:
    """What ``e2kd::distill_loss`` (both kernels, with and without gradients) and ``e2kd::contribution_map`` launch."""
    from e2kd_fast.kernels.contribution_map import contribution_map
    from e2kd_fast.kernels.distill_loss import LOSS_KERNELS, distill_loss_triton

    from e2kd_fast.reference.losses import COSINE_EPS

    for n in batches:
        for dtype in DTYPES:
            logits = _meta((n, LOSS_CLASSES), dtype)
            maps = _meta((n, *MAP_SHAPE), dtype)
            map_text = "×".join(map(str, MAP_SHAPE))
            for kernel in LOSS_KERNELS:
                for with_grad in (False, True):
                    set_origin(f"distill_loss {kernel} N{n} maps {map_text}, {_dtype_name(dtype)}, grad {with_grad}")
                    distill_loss_triton(logits, logits, maps, maps, 4.0, 1.0, COSINE_EPS, with_grad, kernel)
            for channels_last in (False, True):
                layout = "channels_last" if channels_last else "NCHW"
                set_origin(f"contribution_map N{n} {map_text}, {_dtype_name(dtype)}, {layout}")
                x = _meta((n, *MAP_SHAPE), dtype, channels_last)
                contribution_map(x, x)


def zoo_geometries() -> list[tuple[int, ...]]:
    """Distinct conv geometries of `ZOO_MODELS` at 224² (traces the models: about 20 s on a CPU)."""
    from bench.bench_bcos_conv2d import zoo_conv_shapes

    return zoo_conv_shapes(list(ZOO_MODELS))


def record_launches(workload: str) -> list[Launch]:
    """Every launch the kernel launchers make for ``workload`` (``zoo`` or ``core``)."""
    if workload not in ("zoo", "core"):
        raise ValueError(f"bench.ptxas_report: unknown workload {workload!r}; expected zoo or core")
    geometries = zoo_geometries() if workload == "zoo" else list(CORE_CONV_GEOMETRIES)
    batches = ZOO_BATCHES if workload == "zoo" else ZOO_BATCHES[:1]
    with recording() as (sink, set_origin):
        _conv_launches(geometries, batches, set_origin)
        _loss_launches(LOSS_BATCHES, set_origin)
    return sink


# --------------------------------------------------------------------------------------------------
# Specialising as the JIT would, compiling, assembling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One compilation of one kernel: what Triton's JIT would compile for a launch on a Hopper GPU."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, type) in order; "constexpr" for constants
    constants: tuple[tuple[str, str], ...]  # (argument, value) of the constexprs
    attrs: tuple[tuple[int, int], ...]  # (argument index, divisibility) of 16-divisible arguments
    options: tuple[tuple[str, Any], ...]  # num_warps, num_stages

    def short(self) -> str:
        """The types of the pointers and the constants, e.g. ``*bf16,*fp32 BLOCK_P=128 w4``."""
        pointers = ",".join(dict.fromkeys(t for _, t in self.signature if t.startswith("*")))
        consts = " ".join(f"{k}={v}" for k, v in self.constants if k.isupper())
        ones = ",".join(k for k, v in self.constants if not k.isupper())  # integers the JIT fixed at 1
        return f"{pointers} {consts}" + (f" {ones}=1" if ones else "") + f" w{dict(self.options)['num_warps']}"

    def without_divisibility(self) -> tuple:
        """The key that ignores which integers happen to be divisible by 16 (shape-dependent)."""
        return (self.kernel, self.signature, self.constants, self.options)


def sm90_target():
    """The compile target of every offline sm_90 build: CUDA, compute capability 9.0, warps of 32."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


def _constant_text(value: Any) -> str:
    return str(value.value if hasattr(value, "value") and not hasattr(value, "primitive_bitwidth") else value)


def specialise(launch: Launch) -> tuple[Specialisation, dict[str, Any]]:
    """The JIT's specialisation of ``launch`` for `_target` (uses Triton's own binder).

    Returns the hashable description and the ``(signature, constexprs, attrs, options)`` that
    `compile_specialisation` needs.
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(sm90_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    names = list(signature)
    constants = tuple(sorted((names[path[0]], _constant_text(v)) for path, v in constexprs.items()))
    divisible = tuple(
        sorted((path[0], value) for path, attr in attrs.items() for key, value in attr if key == "tt.divisibility")
    )
    spec = Specialisation(
        kernel=fn.__name__,
        signature=tuple(signature.items()),
        constants=constants,
        attrs=divisible,
        options=(("num_warps", options.num_warps), ("num_stages", options.num_stages)),
    )
    return spec, {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options}


def ptxas_path() -> str | None:
    """``$PTXAS``, else `DEFAULT_PTXAS`, else ``ptxas`` on the PATH (None when there is none)."""
    for candidate in (os.environ.get("PTXAS"), DEFAULT_PTXAS, shutil.which("ptxas")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def ptxas_version(ptxas: str) -> str:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release [\d.]+, V[\d.]+", out)
    return found.group(0) if found else out.strip().splitlines()[-1]


def unavailable_reason() -> str:
    """Why the report cannot run here (empty when it can): no Triton, no CUDA back end, no ptxas."""
    try:
        import triton  # noqa: F401
        from triton.compiler import make_backend

        make_backend(sm90_target())
    except Exception as err:  # ImportError, or a Triton built without its CUDA back end
        return f"Triton's CUDA back end is not usable: {type(err).__name__}: {err}"
    if ptxas_path() is None:
        return f"no ptxas ({DEFAULT_PTXAS} is missing, $PTXAS unset, none on the PATH)"
    return ""


_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, spill stores/loads, stack frame and static shared memory from a ``ptxas -v`` log."""
    props, used = _PROPS.search(log), _USED.search(log)
    if props is None or used is None:
        raise ValueError(f"bench.ptxas_report: no resource lines in the ptxas log:\n{log}")
    smem = _SMEM.search(log)
    return {
        "registers": int(used.group(1)),
        "spill_stores": int(props.group(2)),
        "spill_loads": int(props.group(3)),
        "stack_bytes": int(props.group(1)),
        "static_smem_bytes": int(smem.group(1)) if smem else 0,
    }


def compile_ptx(compiled: dict[str, Any], fn: Any) -> tuple[str, int]:
    """Triton's PTX of one specialisation for `_target`, and its dynamic shared memory in bytes."""
    import triton
    from triton.compiler import ASTSource

    source = ASTSource(fn, compiled["signature"], constexprs=compiled["constexprs"], attrs=compiled["attrs"])
    kernel = triton.compile(source, target=sm90_target(), options=compiled["options"].__dict__)
    return kernel.asm["ptx"], kernel.metadata.shared


def assemble(ptx: str, name: str, ptxas: str, ptx_dir: Path | None = None) -> dict[str, Any]:
    """``ptxas -arch=sm_90a -v`` of one PTX text: its parsed resources and the PTX's hash."""
    digest = hashlib.sha256(ptx.encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-{digest}.ptx"
        path.write_text(ptx)
        done = subprocess.run(
            [ptxas, f"-arch={PTXAS_ARCH}", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{ptxas} failed on {name} ({path.name}):\n{done.stderr}")
        if ptx_dir is not None:
            ptx_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, ptx_dir / path.name)
    return {**parse_ptxas(done.stderr + done.stdout), "ptx": digest}


def _cache_key(spec: Specialisation, fn: Any, ptxas: str, ptxas_release: str) -> str:
    """What a result depends on: the kernel's source (and what it calls), the specialisation, the tools."""
    import triton

    text = repr((fn.cache_key, spec, triton.__version__, ptxas, ptxas_release, PTXAS_ARCH))
    return hashlib.sha256(text.encode()).hexdigest()


def report(
    launches: Sequence[Launch],
    ptx_dir: Path | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One record per distinct specialisation of ``launches``: its resources and the launches it serves.

    Triton compiles one after the other (in this process); the ptxas runs overlap, one per core.
    With ``cache_dir``, a result is kept per kernel source, specialisation, Triton and ptxas, and
    read back instead of compiling again (never when ``ptx_dir`` asks for the PTX files).
    """
    with compilable():
        return _report(launches, ptx_dir, cache_dir, log)


def _report(
    launches: Sequence[Launch], ptx_dir: Path | None, cache_dir: Path | None, log: Callable[[str], None]
) -> list[dict]:
    import json
    from concurrent.futures import ThreadPoolExecutor

    ptxas = ptxas_path()
    if ptxas is None:
        raise RuntimeError(unavailable_reason())
    release = ptxas_version(ptxas)
    found: dict[Specialisation, tuple[Launch, dict[str, Any], list[str]]] = {}
    for launch in launches:
        spec, compiled = specialise(launch)
        found.setdefault(spec, (launch, compiled, []))[2].append(launch.origin)
    log(f"{len(launches)} launches, {len(found)} distinct specialisations")
    results: dict[Specialisation, Any] = {}
    cached = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for spec, (launch, compiled, _) in found.items():
            path = None
            if cache_dir is not None and ptx_dir is None:
                path = cache_dir / f"{_cache_key(spec, launch.fn, ptxas, release)}.json"
                if path.exists():
                    results[spec] = json.loads(path.read_text())
                    cached += 1
                    continue
            ptx, dynamic_smem = compile_ptx(compiled, launch.fn)
            results[spec] = (path, dynamic_smem, pool.submit(assemble, ptx, spec.kernel, ptxas, ptx_dir))
        records = []
        for spec, (_, _, origins) in found.items():
            resources = results[spec]
            if isinstance(resources, tuple):
                path, dynamic_smem, job = resources
                resources = {**job.result(), "dynamic_smem_bytes": dynamic_smem}
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(resources))
            records.append(
                {
                    "kernel": spec.kernel,
                    "specialisation": spec.short(),
                    "signature": dict(spec.signature),
                    "constants": dict(spec.constants),
                    "divisible_by_16": [name for name, _ in _named_attrs(spec)],
                    **dict(spec.options),
                    **resources,
                    "launches": len(origins),
                    "example": origins[0],
                    "_key": spec.without_divisibility(),
                }
            )
    log(f"{len(records)} specialisations: {len(records) - cached} compiled and assembled, {cached} from {cache_dir}")
    return records


def _named_attrs(spec: Specialisation) -> list[tuple[str, int]]:
    names = [name for name, _ in spec.signature]
    return [(names[i], value) for i, value in spec.attrs]


def table(records: Sequence[dict]) -> str:
    from bench.common import markdown_table

    rows = [
        [
            r["kernel"],
            r["specialisation"],
            r["registers"],
            f"{r['spill_stores']}/{r['spill_loads']}",
            r["stack_bytes"],
            r["static_smem_bytes"] + r["dynamic_smem_bytes"],
            r["launches"],
            r["example"],
        ]
        for r in sorted(records, key=lambda r: (r["kernel"], -r["registers"]))
    ]
    headers = ["kernel", "pointers, constants, warps", "regs", "spill st/ld B", "stack B", "smem B", "launches", "e.g."]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    from bench import common

    parser = argparse.ArgumentParser(prog="python -m bench ptxas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("zoo", "core"), default="zoo")
    parser.add_argument("--ptx-dir", type=Path, default=None, help="also keep every PTX file here")
    parser.add_argument("--record", action="store_true", help=f"append the records to bench/results/{RESULTS_FILE}")
    parser.add_argument("--no-cache", action="store_true", help=f"compile everything again (cache: {CACHE_DIR})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (the table is still printed)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench ptxas: {reason}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    records = report(record_launches(args.workload), args.ptx_dir, None if args.no_cache else CACHE_DIR, log)
    spilled = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    if args.workload == "zoo":
        core = {specialise(launch)[0].without_divisibility() for launch in record_launches("core")}
        missing = sorted({r["kernel"] + " " + r["specialisation"] for r in records if r["_key"] not in core})
        if missing:
            log("specialisations of the zoo that CORE_CONV_GEOMETRIES does not reach: " + "; ".join(missing))
    env = {
        "target": f"cuda {TARGET_ARCH} ({PTXAS_ARCH})",
        "ptxas": ptxas_version(ptxas_path()),
        "triton": common.package_version("triton"),
        "torch": torch.__version__,
        "git_commit": common.git_commit(),
        "run_id": common.new_run_id(),
        "time": common.utc_now(),
        "workload": args.workload,
    }
    out = [{**{k: v for k, v in r.items() if k != "_key"}, **env} for r in records]
    if args.record:
        path = common.RESULTS_DIR / RESULTS_FILE
        common.write_jsonl(out, path, append=True)
        log(f"appended {len(out)} records to {path}")
    header = f"{env['target']}, ptxas {env['ptxas']}, triton {env['triton']}, commit {env['git_commit']}"
    print(f"{header}, {len(records)} specialisations, {len(spilled)} with spills\n\n{table(records)}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
