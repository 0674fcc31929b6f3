"""``e2kd::bcos_conv2d`` kernels: the epilogue and the adjoint against the reference and against cuDNN alone.

    python -m bench.bench_bcos_conv2d [--device cpu|cuda] [--batch N] [--repeats R]

CPU: the epilogue (patch norm + scale, given the conv output l and its input x) of the reference
torch ops vs the C++ kernel, at the conv shapes of B-cos R18/R50/D169 at 224² (`bench_ops.trace_layer_shapes`).
CUDA (skipped cleanly without it): the fused B-cos conv forward (cuDNN conv + Triton/CUDA epilogue,
and Triton's implicit GEMM with the epilogue inside, ``E2KD_TRITON_CONV=implicit-gemm``) vs a plain
cuDNN conv of the same shape and vs the reference layer; the scaled adjoint (both Triton designs) vs
cuDNN's backward-data conv (``conv_transpose2d``); the adjoint's backward as one implicit GEMM vs
cuDNN's conv and two products. The implicit GEMM runs on channels_last inputs (``--channels-last``);
on NCHW it falls back to the cuDNN epilogue, so its rows then time that. Prints one line per shape
and the median ratios; timings are medians of ``--repeats`` runs after warm-up. Numbers are only
comparable within one run. On CUDA it also names, per op and conv shape class (kernel and stride),
the candidate with the lowest median time, as ``fastest.json`` entries (``--fastest-out FILE``
writes them; `auto` takes only what such a run measured, once merged into
``e2kd_fast/ops/fastest.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def zoo_conv_shapes(models: list[str]) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """Distinct (C, H, W, O, k, stride, padding, groups) of the B-cos convs of ``models`` at 224²."""
    from bench.bench_ops import trace_layer_shapes

    found: dict[tuple, None] = {}
    for name in models:
        for t in trace_layer_shapes(name):
            if t[0] == "conv":
                _, c, h, w, o, k, s, p, g, _b, _mo = t
                found.setdefault((c, h, w, o, k, s, p, g), None)
    return list(found)


def _reference_epilogue(lin, x, k, s, p, g, o):
    from e2kd_fast.reference.bcos import dynamic_scale, patch_norm

    return dynamic_scale(lin, patch_norm(x, k, s, p, g, o if g > 1 else None), 2.0)


def _adjoint_backward_row(x, w_hat, scale, g, s, p, device, args, row: dict, ratios: dict) -> None:
    """The adjoint's backward: conv(dy, ŵ) then s·d and g·d in torch, against `conv2d_product`."""
    from e2kd_fast.kernels.bcos_conv2d import conv2d_product

    dy = torch.randn_like(x)

    def torch_backward():
        d = F.conv2d(dy, w_hat, None, s, p)
        return scale * d, g * d

    row["torch adjoint bwd"] = base = _time(torch_backward, device, 2, args.repeats)
    row["triton implicit-gemm adjoint bwd"] = t = _time(
        lambda: conv2d_product(dy, w_hat, [s, s], [p, p], scale, g), device, 2, args.repeats
    )
    ratios.setdefault("triton implicit-gemm adjoint bwd / torch (cuDNN conv + 2 products)", []).append(t / base)


def _one_shape(shape: tuple, args: argparse.Namespace, device, dtype, fast: list[str], ratios: dict) -> dict:
    """Times one conv geometry, appends its ratios and returns its row of times (ms)."""
    from e2kd_fast.kernels.bcos_conv2d import CONV_KERNEL_ENV

    from bench.common import environment_variable
    from e2kd_fast import ops
    from e2kd_fast.ops import backends
    from e2kd_fast.ops.bcos_conv2d import _conv_transpose
    from e2kd_fast.reference.bcos import unit_norm_weight

    c, h, w, o, k, s, p, g = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, c, h, w, generator=gen).to(device, dtype)
    weight = torch.randn(o, c // g, k, k, generator=gen).to(device, dtype)
    if device.type == "cuda" and args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lin = F.conv2d(x, unit_norm_weight(weight), None, s, p, 1, g)
    label = f"C{c}→{o} {h}×{w} k{k} s{s} p{p}" + (f" g{g}" if g > 1 else "")
    row = {}
    with torch.no_grad():
        row["ref epilogue"] = _time(
            lambda: _reference_epilogue(lin, x, k, s, p, g, o), device, args.warmup, args.repeats
        )
        if device.type == "cpu" and "cpp" in fast:
            op = torch.ops.e2kd_cpp.bcos_conv2d_epilogue
            row["cpp epilogue"] = _time(
                lambda: op(lin, x, [k, k], [s, s], [p, p], g, 2.0, False), device, args.warmup, args.repeats
            )
            ratios.setdefault("ref/cpp epilogue", []).append(row["ref epilogue"] / row["cpp epilogue"])
        if device.type == "cuda":
            w_hat = unit_norm_weight(weight)
            row["cuDNN conv"] = _time(lambda: F.conv2d(x, w_hat, None, s, p, 1, g), device, 2, args.repeats)
            with backends.use_backend("reference"):
                row["ref layer"] = _time(
                    lambda: ops.bcos_conv2d(x, weight, 2.0, [s, s], [p, p], g), device, 2, args.repeats
                )
            scale = torch.rand_like(lin)
            grad = torch.randn_like(lin)
            with backends.use_backend("reference"):
                row["ref adjoint"] = _time(
                    lambda: ops.scaled_conv_adjoint(grad, scale, w_hat, [h, w], [s, s], [p, p], [1, 1], g),
                    device,
                    2,
                    args.repeats,
                )
            row["cuDNN bwd-data"] = _time(
                lambda: _conv_transpose(grad, w_hat, [h, w], [s, s], [p, p], [1, 1], g),
                device,
                2,
                args.repeats,
            )
            for name in fast:
                backend, _, conv_kernel = name.partition(" ")
                design = conv_kernel or ("cudnn-epilogue" if backend == "triton" else None)
                with backends.use_backend(backend), environment_variable(CONV_KERNEL_ENV, design):
                    row[f"{name} layer"] = t = _time(
                        lambda: ops.bcos_conv2d(x, weight, 2.0, [s, s], [p, p], g), device, 2, args.repeats
                    )
                    ratios.setdefault(f"{name} layer / cuDNN conv", []).append(t / row["cuDNN conv"])
                    ratios.setdefault(f"ref layer / {name} layer", []).append(row["ref layer"] / t)
                    if backend == "triton":
                        t_adj = _time(
                            lambda: ops.scaled_conv_adjoint(grad, scale, w_hat, [h, w], [s, s], [p, p], [1, 1], g),
                            device,
                            2,
                            args.repeats,
                        )
                        row[f"{name} adjoint"] = t_adj
                        ratios.setdefault(f"{name} adjoint / cuDNN bwd-data", []).append(t_adj / row["cuDNN bwd-data"])
            if "triton implicit-gemm" in fast and g == 1:
                _adjoint_backward_row(x, w_hat, scale, grad, s, p, device, args, row, ratios)
    print(f"  {label:34s} " + "  ".join(f"{key}: {value:.3f} ms" for key, value in row.items()))
    return row


# The fastest.json value of each timed column, per op: back end, and the Triton conv design after a colon.
CANDIDATES = {
    "e2kd::bcos_conv2d": {
        "ref layer": "reference",
        "cpp layer": "cpp",
        "triton layer": "triton:cudnn-epilogue",
        "triton implicit-gemm layer": "triton:implicit-gemm",
    },
    "e2kd::scaled_conv_adjoint": {
        "ref adjoint": "reference",
        "triton adjoint": "triton:cudnn-epilogue",
        "triton implicit-gemm adjoint": "triton:implicit-gemm",
    },
}


def propose_fastest(results: list[tuple[tuple, dict]], device_type: str) -> dict[str, str]:
    """``fastest.json`` entries per op and conv shape class from one run's rows: the candidate with
    the lowest median time over the class's shapes (the reference unless a kernel beat it there).
    ``results``: (C, H, W, O, k, stride, padding, groups) and its row of times in ms."""
    from e2kd_fast.ops._common import conv_shape_class

    by_class: dict[str, list[dict]] = {}
    for shape, row in results:
        _, _, _, _, k, stride, _, _ = shape
        by_class.setdefault(conv_shape_class((k, k), stride), []).append(row)
    proposals = {}
    for op_name, columns in CANDIDATES.items():
        for shape_class, rows in sorted(by_class.items()):
            medians = {
                value: statistics.median(row[column] for row in rows)
                for column, value in columns.items()
                if all(column in row for row in rows)
            }
            if "reference" in medians:
                proposals[f"{op_name}@{device_type}@{shape_class}"] = min(medians, key=medians.__getitem__)
    return proposals


def run(args: argparse.Namespace) -> None:
    from e2kd_fast.ops import backends

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: skipping the CUDA B-cos conv benchmarks")
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = zoo_conv_shapes(args.models.split(","))
    if args.limit:
        shapes = shapes[: args.limit]
    fast = [b for b in ("cpp", "triton") if b in backends.candidates("e2kd::bcos_conv2d", device.type)]
    if "triton" in fast and device.type == "cuda":  # both Triton designs, side by side
        fast += ["triton implicit-gemm"]
    print(f"{len(shapes)} conv shapes, batch {args.batch}, {dtype}, {device}; fast back ends: {fast or 'none'}")
    ratios: dict[str, list[float]] = {}
    results = []
    started = time.perf_counter()
    for i, shape in enumerate(shapes):
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            print(f"time budget of {args.time_budget:g} s spent: {len(shapes) - i} of {len(shapes)} shapes not timed")
            break
        results.append((shape, _one_shape(shape, args, device, dtype, fast, ratios)))
    for key, values in ratios.items():
        print(f"median {key}: {statistics.median(values):.2f}× (min {min(values):.2f}, max {max(values):.2f})")
    proposals = propose_fastest(results, device.type)
    if proposals:
        print("fastest per shape class (fastest.json entries):")
        for key, value in proposals.items():
            print(f"  {key}: {value}")
    if args.fastest_out is not None:
        args.fastest_out.write_text(json.dumps(proposals, indent=2) + "\n")
        print(f"wrote {len(proposals)} proposed entries to {args.fastest_out} (merge into e2kd_fast/ops/fastest.json)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 2 on CPU")
    parser.add_argument("--models", default="bcos_resnet18,bcos_resnet50,bcos_densenet169")
    parser.add_argument("--limit", type=int, default=0, help="at most this many shapes (0 = all)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true", help="CUDA: x in channels_last")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="start no new shape after this many seconds (0: no limit); the summary covers the shapes timed",
    )
    parser.add_argument(
        "--fastest-out",
        type=Path,
        default=None,
        help="write the fastest back end per op and conv shape class as fastest.json entries (CUDA)",
    )
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.device == "cuda" else 2
    run(args)


if __name__ == "__main__":
    main()
