"""Shared benchmark machinery: environment record, timing, statistics, FLOPs, rooflines, JSONL and tables.

Every suite produces *records*, one JSON object per measured (configuration, variant), with the schema
described in bench/README.md. Ratios are always taken inside one run (variant time ÷ reference time),
because only ratios are comparable between runs on a shared or drifting machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import floor

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH_DIR = REPO_ROOT / ".cache" / "bench"

# Dense peak rates of the devices we know (vendor datasheets). float32 is counted as TF32 because
# cuDNN convolutions use TF32 by default; the record names the basis it used.
DEVICE_PEAKS: dict[str, dict[str, Any]] = {
    "nvidia-h100": {
        "bytes_per_s": 3.35e12,
        "flops_per_s": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
        "basis": "H100 SXM5 dense (float32 as TF32), HBM3 3.35 TB/s",
    },
    "nvidia-h200": {
        "bytes_per_s": 4.8e12,
        "flops_per_s": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
        "basis": "H200 SXM dense (float32 as TF32), HBM3e 4.8 TB/s",
    },
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_kind_from_name(name: str, cores: int | None = None, machine: str | None = None) -> str:
    """The results-file key of a device: ``nvidia-h100``, ``nvidia-h200``, ``cpu-2core-x86_64``.

    GPUs are keyed by model (the first name token with a digit, e.g. "NVIDIA H100 80GB HBM3" → h100)
    so that runs on the same GPU model compare; CPUs by core count and architecture.
    """
    lowered = name.lower()
    if cores is not None:  # a CPU
        return f"cpu-{cores}core-{machine or platform.machine()}"
    tokens = [t for t in re.split(r"[^a-z0-9]+", lowered) if t and t not in ("nvidia", "geforce", "tesla")]
    model = next((t for t in tokens if any(ch.isdigit() for ch in t)), tokens[0] if tokens else "gpu")
    vendor = "nvidia" if "nvidia" in lowered or torch.version.hip is None else "amd"
    return f"{vendor}-{model}"


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return device_kind_from_name(torch.cuda.get_device_name(device))
    return device_kind_from_name(cpu_model(), cores=cpu_cores(), machine=platform.machine())


def git_commit() -> str | None:
    """``git rev-parse HEAD``, with ``-dirty`` when the working tree has changes; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def package_version(name: str) -> str | None:
    """A package's installed version without importing it (triton must not be imported on CPU)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a recorded number depends on, besides its configuration. On the CPU that includes
    the heap policy, which it pins first (`pin_heap`): call it before measuring."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    heap = pin_heap(device)
    return {
        "device": device_name(device),
        "device_kind": device_kind(device),
        "device_type": device.type,
        "driver": nvidia_driver(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "dali": package_version("nvidia-dali-cuda130") or package_version("nvidia-dali-cuda120"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_heap": heap,
    }


def new_run_id() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """``$name = value`` inside the block, restored after it; None leaves the variable as it is."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """Median and spread (p20, p80, min, max) of repeated timings, in milliseconds."""
    if not samples_ms:
        raise ValueError("summarize: no samples")
    ordered = sorted(samples_ms)
    return {
        "median": statistics.median(ordered),
        "p20": quantile(ordered, 0.2),
        "p80": quantile(ordered, 0.8),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call in ms, synchronised on CUDA (used where variants must alternate)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    min_sample_ms: float = 1.0,
) -> list[float]:
    """Per-call times in ms of ``fn``: ``repeats`` samples after ``warmup`` calls.

    On CUDA it uses `triton.testing.do_bench` when Triton is importable (L2 flushed between calls),
    otherwise CUDA events. On the CPU, short calls are looped so that one sample lasts at least
    ``min_sample_ms`` (perf_counter's resolution and Python overhead stay small against it).
    """
    if device.type == "cuda":
        samples = _do_bench(fn, repeats)
        if samples is not None:
            return samples
    t_warm = 0.0
    for _ in range(max(warmup, 1)):
        t_warm = time_once(fn, device)
    inner = 1 if device.type == "cuda" or t_warm >= min_sample_ms else math.ceil(min_sample_ms / max(t_warm, 1e-3))
    samples = []
    for _ in range(repeats):
        if inner == 1:
            samples.append(time_once(fn, device))
            continue
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return samples


def _do_bench(fn: Callable[[], Any], repeats: int) -> list[float] | None:
    try:  # imported here only: Triton must never be needed on a CPU machine
        from triton.testing import do_bench
    except Exception:
        return None
    try:
        times = do_bench(fn, warmup=25, rep=max(100, 10 * repeats), return_mode="all")
    except TypeError:  # an old Triton without return_mode="all"
        return None
    return [float(t) for t in times]


# --------------------------------------------------------------------------------------------------
# FLOPs, bytes, rooflines
# --------------------------------------------------------------------------------------------------


def count_flops(fn: Callable[[], Any]) -> int | None:
    """FLOPs of one call (matmuls, convs and attention, with `torch.utils.flop_counter`'s formulas),
    counted by `bench.floor.count_traffic`; None if counting fails (a provider the counter cannot see
    through: no figure rather than a wrong one)."""
    try:
        return floor.count_traffic(fn).flops
    except Exception:
        return None


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors among ``tensors`` (nested tuples/lists allowed; None skipped)."""
    seen: set[int] = set()
    total = 0
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if isinstance(t, list | tuple):
            stack.extend(t)
        elif isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def roofline(kind: str, dtype: str, flops: int | None, nbytes: int | None, time_ms: float) -> dict[str, Any]:
    """Achieved TFLOP/s and GB/s and, on a known device, the share of the roofline-bound time.

    share = max(flops / peak_flops, bytes / peak_bandwidth) / time: 1.0 means the kernel runs at the
    device's limit for its arithmetic intensity.
    """
    seconds = time_ms / 1e3
    out: dict[str, Any] = {
        "tflops": flops / seconds / 1e12 if flops else None,
        "gbps": nbytes / seconds / 1e9 if nbytes else None,
        "roofline_share": None,
    }
    peaks = DEVICE_PEAKS.get(kind)
    if peaks and (flops or nbytes):
        bound = max((flops or 0) / peaks["flops_per_s"].get(dtype, math.inf), (nbytes or 0) / peaks["bytes_per_s"])
        out["roofline_share"] = bound / seconds
        out["roofline_basis"] = peaks["basis"]
    return out


def mfu(kind: str, dtype: str, flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation against the device's dense peak (None on unknown devices)."""
    peaks = DEVICE_PEAKS.get(kind)
    if not peaks or not flops_per_s:
        return None
    return flops_per_s / peaks["flops_per_s"].get(dtype, math.inf)


# --------------------------------------------------------------------------------------------------
# Records, JSONL, tables
# --------------------------------------------------------------------------------------------------


def config_key(config: dict[str, Any]) -> str:
    """A stable string for a configuration: sorted ``k=v`` pairs, so runs can be matched."""

    def fmt(v: Any) -> str:
        if isinstance(v, list | tuple):
            return "x".join(fmt(x) for x in v)
        return str(v)

    return ",".join(f"{k}={fmt(config[k])}" for k in sorted(config))


def make_record(
    *,
    run_id: str,
    env: dict[str, Any],
    suite: str,
    config: dict[str, Any],
    variant: str,
    reference: str,
    status: str = "ok",
    note: str | None = None,
    **measurements: Any,
) -> dict[str, Any]:
    """One JSON line. ``config`` must not contain the variant: records of one configuration share a key."""
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "timestamp": utc_now(),
        "suite": suite,
        "key": config_key(config),
        "variant": variant,
        "reference": reference,
        "status": status,
        "note": note,
        "config": config,
        "env": env,
    }
    record.update(measurements)
    return record


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Sets ``ratio`` (time ÷ reference time) and ``mem_ratio`` (step memory ÷ reference's) in place.

    The reference of a record is the record of the same suite and key whose variant is its
    ``reference``; both must have been measured in this run.
    """
    by_key = {(r["suite"], r["key"], r["variant"]): r for r in records if r["status"] == "ok"}
    for r in records:
        r.setdefault("ratio", None)
        r.setdefault("mem_ratio", None)
        ref = by_key.get((r["suite"], r["key"], r["reference"]))
        if r["status"] != "ok" or ref is None:
            continue
        t, t_ref = (r.get("time_ms") or {}).get("median"), (ref.get("time_ms") or {}).get("median")
        if t and t_ref:
            r["ratio"] = t / t_ref
        m, m_ref = (r.get("memory") or {}).get("step_bytes"), (ref.get("memory") or {}).get("step_bytes")
        if m is not None and m_ref:
            r["mem_ratio"] = m / m_ref


def write_jsonl(records: Iterable[dict[str, Any]], path: Path, append: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a malformed line is an error that names the file and line."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not a JSON line: {exc}") from exc
    return records


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def fmt_num(value: float | None, digits: int = 3) -> str:
    """Compact number for tables; "–" for a missing value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:.{decimals}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def pin_heap(device: torch.device) -> str | None:
    """On the CPU, pins glibc's heap policy (`e2kd_fast.engine.cpu_heap`), so that every variant and
    every process of a run allocates the same way; returns the log line, None elsewhere."""
    if device.type != "cpu":
        return None
    from e2kd_fast.engine.cpu_heap import pin_cpu_heap  # here: the engine package is heavy to import

    return pin_cpu_heap()


def header_line(env: dict[str, Any]) -> str:
    """One line naming the device, versions and commit, printed above every table."""
    load = env.get("loadavg")
    return (
        f"device: {env['device']} ({env['device_kind']}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"triton {env['triton']}, driver {env['driver']}, commit {env['git_commit']}, "
        f"threads {env['torch_threads']}"
        + (f", load avg {load[0]}" if load else "")
        + (f"; {env['cpu_heap']}" if env.get("cpu_heap") else "")
    )


# --------------------------------------------------------------------------------------------------
# CPU memory: peak resident set size of this process
# --------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is no procfs."""
    with contextlib.suppress(OSError):
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def release_free_memory() -> None:
    """Returns freed heap pages to the OS so that the resident size before a step is what is live."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Resets VmHWM (the peak RSS) to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
