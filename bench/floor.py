"""The floor model: FLOPs and the fewest bytes of one traced call, and the roofline floor per device.

    python -m bench.floor            # R18 <- D169, batch 128, 224², bf16: counted at batch 1 and 2, scaled
    python -m bench.floor --pair tiny_bcos --batch 2 --resolution 32 --count-batches 2
    python -m bench.floor --measure-ceilings       # this device's copy bandwidth and matmul rate

`count_traffic` runs a callable once under a dispatch mode that sees every aten op (forward,
backward, optimiser) and counts

- **FLOPs** with `torch.utils.flop_counter`'s per-op formulas (matmuls, convolutions, attention;
  `FlopCounterMode` itself cannot be used because its module tracker fails inside
  ``autograd.grad``, which every e²KD step calls). A registered ``e2kd::`` op is one op to the
  mode, whatever its back end runs inside (a oneDNN or cuDNN conv, a Triton kernel), so its FLOPs
  are those of its reference (`e2kd_fast.ops.backends.registered`), counted on the same inputs;
- **bytes**: every distinct storage that an op reads or writes, counted once, at the largest
  number of bytes any op touches in it (a view counts its own elements). A storage an op creates
  (an output that aliases none of the op's inputs) is new data, even if the allocator reuses an
  old address. In-place updates and views add nothing for storages already counted. So the
  count is "every tensor the op sequence materialises, read or written once": parameters,
  gradients, optimiser state, the batch, and every intermediate of the unfused step. A fusion that
  keeps intermediates on chip can move less; re-reads (one activation read by several ops) and
  cache misses make real kernels move more.

The **floor** of a device is the roofline: ``max(flops / matmul rate, bytes / copy bandwidth)``,
with the ceilings of `CEILINGS` (achievable rates, each with its source). ``measured ÷ floor`` on
a GPU says how far a step is from what its op sequence permits; a kernel or fusion change that
removes FLOPs or bytes predicts its effect on the floor before any GPU run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Achievable ceilings per device kind: the rates a step can hope to reach. ``bytes_per_s`` is a
# device-to-device copy (bytes read + written ÷ time); ``flops_per_s`` a large dense matmul per
# autocast dtype (float32 runs as TF32 on these GPUs). ``source`` says where each figure comes from:
# "measured" figures were measured on the device, "datasheet" ones are vendor peaks, which real
# kernels do not reach, so floors against them are optimistic.
CEILINGS: dict[str, dict[str, Any]] = {
    "nvidia-h200": {
        "bytes_per_s": 4.3e12,
        "flops_per_s": {"bfloat16": 790e12, "float16": 790e12},
        "source": {
            "bytes_per_s": "measured: device-to-device copy on an H200 (4.22 TB/s for 1 GiB in "
            "bench/results/nvidia-h200-session.txt; `python -m bench.floor --measure-ceilings`)",
            "flops_per_s": "measured: 8192^3 bf16 matmul on an H200 (791 TFLOP/s in "
            "bench/results/nvidia-h200-session.txt; `python -m bench.floor --measure-ceilings`)",
        },
    },
    "nvidia-h100": {
        # bench/results/nvidia-h100.jsonl, run 20261122T093848Z: the highest `copy_gbps` of the
        # distill_loss records (dst.copy_(src) of 231 MB at batch 256).
        "bytes_per_s": 2.964e12,
        "flops_per_s": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
        "source": {
            "bytes_per_s": "measured: copy_gbps of bench/results/nvidia-h100.jsonl (distill_loss, batch 256)",
            "flops_per_s": "datasheet: H100 SXM dense bf16 989.4 TFLOP/s (float32 as TF32); not measured",
        },
    },
}


@dataclass(frozen=True)
class Traffic:
    """What one call computes and moves: FLOPs, bytes (each storage once) and the ops seen."""

    flops: int
    bytes: int
    ops: int


def extrapolate(a: Traffic, batch_a: int, b: Traffic, batch_b: int, batch: int) -> Traffic:
    """The traffic at ``batch`` from counts at two smaller batches, as ``fixed + per_image · batch``.

    Exact when the op sequence does not depend on the batch size (the same ops, on tensors whose
    batch dimension scales): parameters, gradients and optimiser state are the fixed part.
    """
    if batch_a == batch_b:
        raise ValueError("extrapolate: the two batches must differ")

    def line(x: int, y: int) -> int:
        slope = (y - x) / (batch_b - batch_a)
        return int(round(x + slope * (batch - batch_a)))

    return Traffic(line(a.flops, b.flops), line(a.bytes, b.bytes), b.ops)


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, opaque tensors
        return None


def _view_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    out, stack = [], [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out


def _flop_formula(func) -> Callable | None:
    from torch.utils.flop_counter import flop_registry

    return flop_registry.get(func._overloadpacket)


def _formula_flops(formula: Callable | None, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one aten op by its `flop_registry` formula (0 for an op without one)."""
    return 0 if formula is None else int(formula(*args, **kwargs, out_val=out))


def _reference_flops(func, args: tuple, kwargs: dict) -> int:
    """FLOPs of the registered ``e2kd::`` op ``func`` on these inputs: those of its reference's aten ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from e2kd_fast.ops import backends

    reference = backends.registered(func._schema.name).get("reference")
    if reference is None:
        return 0

    class _Flops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, inner, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            formula = _flop_formula(inner)
            if formula is None:
                # Below autograd, composite ops (conv_transpose2d) reach the mode whole: count their parts.
                with self:
                    out = inner.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = inner(*args, **kwargs)
            self.flops += _formula_flops(formula, args, kwargs, out)
            return out

    with torch.no_grad(), _Flops() as mode:
        reference(*args, **kwargs)
    return mode.flops


def count_traffic(fn: Callable[[], Any]) -> Traffic:
    """FLOPs and the fewest bytes of one call of ``fn`` (see the module docstring for what counts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Traffic(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0
            self.bytes = 0
            self.ops = 0
            self.seen: dict[int, int] = {}  # storage key -> bytes already counted for it

        def _touch(self, t: torch.Tensor, fresh: bool) -> None:
            key = _storage_key(t)
            if key is None:
                return
            nbytes = _view_bytes(t)
            if fresh:  # a new allocation: new data, whatever was at this address before
                self.seen[key] = nbytes
                self.bytes += nbytes
                return
            old = self.seen.get(key, 0)
            if nbytes > old:
                self.seen[key] = nbytes
                self.bytes += nbytes - old

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            self.ops += 1
            formula = _flop_formula(func)
            if formula is None and func.namespace == "e2kd":
                self.flops += _reference_flops(func, args, kwargs)
            else:
                self.flops += _formula_flops(formula, args, kwargs, out)
            inputs = _tensors((args, kwargs))
            input_keys = {_storage_key(t) for t in inputs}
            for t in inputs:
                self._touch(t, fresh=False)
            for t in _tensors(out):
                self._touch(t, fresh=_storage_key(t) not in input_keys)
            return out

    with _Traffic() as mode:
        fn()
    return Traffic(mode.flops, mode.bytes, mode.ops)


def floor(traffic: Traffic, kind: str, dtype: str) -> dict[str, Any] | None:
    """The roofline floor of ``traffic`` on device ``kind`` (None for a device without ceilings).

    Returns ``compute_ms`` (FLOPs ÷ matmul rate), ``memory_ms`` (bytes ÷ copy bandwidth), ``floor_ms``
    (their maximum), ``bound`` ("compute" or "memory") and the ceilings used with their sources.
    """
    c = CEILINGS.get(kind)
    if c is None:
        return None
    rate = c["flops_per_s"].get(dtype)
    compute_ms = traffic.flops / rate * 1e3 if rate else math.nan
    memory_ms = traffic.bytes / c["bytes_per_s"] * 1e3
    floor_ms = max(memory_ms, compute_ms if rate else 0.0)
    return {
        "floor_ms": floor_ms,
        "compute_ms": compute_ms if rate else None,
        "memory_ms": memory_ms,
        "bound": "compute" if rate and compute_ms >= memory_ms else "memory",
        "flops_per_s": rate,
        "bytes_per_s": c["bytes_per_s"],
        "source": c["source"],
    }


def floors(traffic: Traffic, dtype: str) -> dict[str, dict[str, Any]]:
    """`floor` on every device of `CEILINGS` (devices without a rate for ``dtype`` use bytes only)."""
    return {kind: floor(traffic, kind, dtype) for kind in CEILINGS}


def over_floor(time_ms: float | None, traffic: Traffic | None, kind: str, dtype: str) -> float | None:
    """measured time ÷ floor on ``kind`` (None off the devices of `CEILINGS`)."""
    if time_ms is None or traffic is None:
        return None
    f = floor(traffic, kind, dtype)
    return time_ms / f["floor_ms"] if f and f["floor_ms"] > 0 else None


# --------------------------------------------------------------------------------------------------
# Ceilings of this device, measured
# --------------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, *, copy_bytes: int = 2**30, matmul_n: int = 8192) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written ÷ time) and bf16 matmul FLOP/s, best of 10."""
    from bench import common

    half = copy_bytes // 2
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = min(common.measure(lambda: dst.copy_(src), device, warmup=3, repeats=10))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    mm_ms = min(common.measure(lambda: a @ b, device, warmup=3, repeats=10))
    return {
        "copy_bytes_per_s": 2 * half / (copy_ms / 1e3),
        "matmul_flops_per_s": 2 * matmul_n**3 / (mm_ms / 1e3),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_bytes": 2 * half,
        "matmul_n": matmul_n,
    }


# --------------------------------------------------------------------------------------------------
# Step traffic: one eager step of a bench_step variant
# --------------------------------------------------------------------------------------------------


def step_traffic(config: dict[str, Any], variant: str, device: torch.device) -> Traffic:
    """FLOPs and bytes of one eager step of ``variant`` (the optimiser step included).

    On the ``meta`` device nothing is computed (the e²KD variants cannot run there: they read a
    scalar from a tensor); on a CPU, count at small batches and `extrapolate`.
    """
    from bench import bench_step

    setup = bench_step.build_setup(config, device, frozen=variant == "e2kd-frozen")
    step = bench_step.make_step(setup, variant, compile=False)
    step()  # the optimiser state (momentum buffers) exists from the second step on, as in the timed steps
    return count_traffic(step)


def main(argv: Sequence[str] | None = None) -> int:
    from bench import bench_step, common

    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="bcos_r18<-bcos_d169", help="a pair of bench.bench_step.PAIRS")
    parser.add_argument("--variants", default=",".join(bench_step.DEFAULT_VARIANTS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or meta (no compute; kd and reference only)")
    parser.add_argument(
        "--count-batches",
        default="1,2",
        help="count at these two batch sizes and extrapolate linearly to --batch (one value: count at --batch)",
    )
    parser.add_argument("--measure-ceilings", action="store_true", help="measure this device's copy and matmul")
    parser.add_argument("--copy-mib", type=int, default=1024, help="--measure-ceilings: bytes copied (read + written)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="--measure-ceilings: n of the n×n×n matmul")
    args = parser.parse_args(argv)
    if args.measure_ceilings:
        device = common.resolve_device("auto" if args.device in ("meta", "cpu") else args.device)
        kind = common.device_kind(device)
        measured = measure_ceilings(device, copy_bytes=args.copy_mib * 2**20, matmul_n=args.matmul_n)
        print(f"{kind}: {measured}")
        if kind in CEILINGS:
            print(f"{kind} in CEILINGS: {CEILINGS[kind]}")
        return 0
    device = torch.device(args.device)
    pair = bench_step.PAIRS[args.pair]
    config = {
        "pair": args.pair,
        "student": pair.student,
        "teacher": pair.teacher,
        "explanation": pair.explanation,
        "batch": args.batch,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "channels_last": False,
        "tau": 1.0,
        "lam": 1.0,
        "optimizer": "sgd(lr=1e-4,momentum=0.9)",
    }
    batches = [int(b) for b in args.count_batches.split(",")]
    how = f"counted at batch {args.batch}"
    if len(batches) == 2:
        how = f"counted at batches {batches[0]} and {batches[1]}, extrapolated linearly to {args.batch}"
    print(f"{args.pair}, batch {args.batch}, {args.resolution}², {args.dtype} autocast, on {device}, {how}")
    rows = []
    for variant in args.variants.split(","):
        started = time.perf_counter()
        if len(batches) == 2:
            a, b = (step_traffic({**config, "batch": n}, variant, device) for n in batches)
            t = extrapolate(a, batches[0], b, batches[1], args.batch)
        else:
            t = step_traffic(config, variant, device)
        row = [variant, f"{t.flops / 1e9:.1f}", f"{t.bytes / 2**30:.2f}"]
        for kind in CEILINGS:
            f = floor(t, kind, args.dtype)
            row.append(f"{f['floor_ms']:.2f} ({f['bound']})" if f else "–")
        rows.append(row)
        print(f"  {variant}: {t.ops} ops counted in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    headers = ["variant", "GFLOP/step", "GiB moved/step", *(f"floor ms on {k}" for k in CEILINGS)]
    print(common.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
