"""The traffic model of each kernel: bytes that must move, FLOPs, and the floor on H100/H200.

    python -m bench.kernel_traffic                  # R18/R50/D169 at 224², batch 64 and 128, bf16
    python -m bench.kernel_traffic --per-shape      # also one row per distinct conv shape

Predictions, not measurements: each kernel's bytes are its inputs read once and its outputs written
once at the launchers' dtypes (what the kernel cannot avoid moving; re-reads that the cache absorbs
are not counted), and the floor is `bench.floor.floor` with the ceilings of `bench.floor.CEILINGS`.
FLOPs of the memory-bound kernels (squares, sums, divisions: below one FLOP per byte) run on the
vector units, not the matrix units whose rate `CEILINGS` holds, so their floors use their bytes
only; the convolutions' FLOPs are matrix FLOPs and count against the matmul rate.

Per B-cos conv, with X = N·C·H·W input elements, Y = N·O·H'·W' output elements, Q = N·G·H·W
(G = groups), P = N·H'·W', K = O·(C/G)·k² weights, e the activation's bytes per element:

| kernel or op | bytes | FLOPs |
|---|---|---|
| cuDNN conv (the reference point) | e(X + K + Y) | 2·Y·(C/G)·k² |
| `_sumsq_kernel` | eX + 4Q (fp32 q) | 2X |
| `_epilogue_kernel` (scale, B = 2) | 4Q + 2eY (read l, write s) | G·P·k² + 2Y |
| `_epilogue_kernel` (norm only, `patch_norm`) | 4Q + e·P·(1 or O) | G·P·k² |
| `_product_kernel` (s ⊙ g) | 3eY | Y |
| cuDNN backward-data (conv2dᵀ) | e(Y + K + X) | 2·Y·(C/G)·k² |
| `e2kd::bcos_conv2d`, Triton today | conv + sumsq + epilogue | |
| … epilogue in the conv (the target) | e(X + K + 2Y) + 4·N·H·W (a one-channel Σx² map from the producer) | |
| `e2kd::scaled_conv_adjoint`, Triton today | product + backward-data | |
| … scale as the conv's prologue | e(2Y + K + X) | |
| `_box_sum_kernel` ×2 (rows, then columns + sqrt) | 4(N·H·W + 2·N·H·W' + P) | k·N·H·W' + k·P |
| `_conv_gemm_kernel`, B-cos epilogue | e(X + K + 2Y) + 4P (the norm map) | 2·Y·C·k² |
| `e2kd::bcos_conv2d`, implicit GEMM (as built) | 4·N·H·W (Σx², written by the producer) + box sums + GEMM | |
| `_conv_gemm_kernel`, product epilogue (adjoint's backward) | e(X + K + 4Y) (dy, ŵ, s, g; two outputs) | 2·Y·C·k² |
| … unfused: cuDNN conv + s·d and g·d | conv + 2 × product | |

The loss (`kernels/distill_loss.py`), N samples, C classes, D map elements per sample, e the maps'
bytes (logits in the same dtype): the forward reads both maps and logits once, e·2N(D + C); with
gradients, the two-pass kernels read the maps again and write ∂exp/∂s and ∂kd/∂z_S:
e·N(5D + 3C); a kernel that kept the maps on chip between the reduction and the gradient would
move e·N(3D + 3C), but at N ≥ 64 the maps (≥ 77 MB in bf16) do not fit in the 50–60 MB L2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from bench.floor import CEILINGS, Traffic, floor

MODELS = ("bcos_resnet18", "bcos_resnet50", "bcos_densenet169")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LOSS_CLASSES = 1000
MAP_ELEMENTS = 6 * 224 * 224  # one sample's explanation map (the 6-channel input's contributions)


@dataclass(frozen=True)
class Conv:
    """One B-cos conv's geometry (as `bench.bench_ops.trace_layer_shapes` reports it)."""

    c: int
    h: int
    w: int
    o: int
    k: int
    stride: int
    padding: int
    groups: int

    def out_hw(self) -> tuple[int, int]:
        size = lambda n: (n + 2 * self.padding - self.k) // self.stride + 1  # noqa: E731
        return size(self.h), size(self.w)

    def label(self) -> str:
        grouped = f" g{self.groups}" if self.groups > 1 else ""
        return f"C{self.c}→{self.o} {self.h}² k{self.k} s{self.stride}{grouped}"


def _vector(nbytes: float, flops: float = 0.0) -> tuple[Traffic, float]:
    """A memory-bound kernel: its bytes against bandwidth, its (vector) FLOPs only reported."""
    return Traffic(0, int(nbytes), 1), flops


def conv_kernels(conv: Conv, n: int, e: int) -> dict[str, tuple[Traffic, float]]:
    """``{kernel: (traffic for the floor, reported FLOPs)}`` of one conv at batch ``n``."""
    ho, wo = conv.out_hw()
    x = n * conv.c * conv.h * conv.w
    y = n * conv.o * ho * wo
    q = n * conv.groups * conv.h * conv.w
    p = n * ho * wo
    weights = conv.o * (conv.c // conv.groups) * conv.k**2
    conv_flops = 2 * y * (conv.c // conv.groups) * conv.k**2
    norm_channels = conv.o if conv.groups > 1 else 1
    box = conv.groups * p * conv.k**2
    return {
        "conv": (Traffic(conv_flops, e * (x + weights + y), 1), conv_flops),
        "sumsq": _vector(e * x + 4 * q, 2 * x),
        "epilogue": _vector(4 * q + 2 * e * y, box + 2 * y),
        "norm_epilogue": _vector(4 * q + e * p * norm_channels, box),
        "product": _vector(3 * e * y, y),
        "backward_data": (Traffic(conv_flops, e * (y + weights + x), 1), conv_flops),
        "fused_conv": (Traffic(conv_flops, e * (x + weights + 2 * y) + 4 * n * conv.h * conv.w, 1), conv_flops),
        "fused_adjoint": (Traffic(conv_flops, e * (2 * y + weights + x), 1), conv_flops),
        "producer_sums": _vector(4 * n * conv.h * conv.w),
        "box_norm": _vector(4 * (n * conv.h * conv.w + 2 * n * conv.h * wo + p), conv.k * (n * conv.h * wo + p)),
        "gemm_conv": (Traffic(conv_flops, e * (x + weights + 2 * y) + 4 * p, 1), conv_flops),
        "gemm_product": (Traffic(conv_flops, e * (x + weights + 4 * y), 1), conv_flops),
    }


def op_floors(conv: Conv, n: int, dtype: str, kind: str) -> dict[str, float]:
    """Floor in ms on ``kind`` of each kernel and of the ops built from them, for one conv."""
    parts = {
        name: floor(t, kind, dtype)["floor_ms"] for name, (t, _) in conv_kernels(conv, n, ELEMENT_BYTES[dtype]).items()
    }
    parts["triton_layer"] = parts["conv"] + parts["sumsq"] + parts["epilogue"]
    parts["triton_patch_norm"] = parts["sumsq"] + parts["norm_epilogue"]
    parts["triton_adjoint"] = parts["product"] + parts["backward_data"]
    parts["gemm_layer"] = parts["producer_sums"] + parts["box_norm"] + parts["gemm_conv"]
    parts["adjoint_backward"] = parts["conv"] + 2 * parts["product"]
    return parts


def model_convs(model: str) -> list[Conv]:
    """Every B-cos conv a forward pass of ``model`` at 224² runs, repeats included."""
    from bench.bench_ops import trace_layer_shapes

    return [Conv(*t[1:9]) for t in trace_layer_shapes(model, distinct=False) if t[0] == "conv"]


def loss_traffic(n: int, e: int, with_grad: bool, on_chip: bool = False) -> Traffic:
    """The loss kernels' bytes (see the module docstring); FLOPs are vector FLOPs, left out of the floor."""
    d, c = MAP_ELEMENTS, LOSS_CLASSES
    if not with_grad:
        return Traffic(0, e * 2 * n * (d + c), 1)
    return Traffic(0, e * n * ((3 if on_chip else 5) * d + 3 * c), 1)


def loss_flops(n: int, with_grad: bool) -> int:
    """Three products and sums per map element (s·t, s², t²), three more for the gradient; ~10 per logit."""
    return n * (MAP_ELEMENTS * (6 + (3 if with_grad else 0)) + 10 * LOSS_CLASSES)


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def layer_table(models: Sequence[str], batches: Sequence[int], dtype: str) -> str:
    """Per model and batch, summed over the model's convs: the layer and adjoint floors, both devices."""
    from bench.common import markdown_table

    rows = []
    for model in models:
        convs = model_convs(model)
        for n in batches:
            for kind in CEILINGS:
                total: dict[str, float] = {}
                for conv in convs:
                    for key, value in op_floors(conv, n, dtype, kind).items():
                        total[key] = total.get(key, 0.0) + value
                rows.append(
                    [
                        model.removeprefix("bcos_"),
                        n,
                        kind.removeprefix("nvidia-"),
                        len(convs),
                        _ms(total["conv"]),
                        _ms(total["triton_layer"]),
                        f"{total['triton_layer'] / total['conv']:.2f}×",
                        _ms(total["fused_conv"]),
                        f"{total['fused_conv'] / total['conv']:.2f}×",
                        _ms(total["triton_patch_norm"]),
                        _ms(total["backward_data"]),
                        _ms(total["triton_adjoint"]),
                        f"{total['triton_adjoint'] / total['backward_data']:.2f}×",
                        _ms(total["fused_adjoint"]),
                        _ms(total["gemm_layer"]),
                        f"{total['gemm_layer'] / total['conv']:.2f}×",
                    ]
                )
    headers = [
        "model",
        "N",
        "device",
        "convs",
        "cuDNN conv ms",
        "Triton layer ms",
        "÷ conv",
        "epilogue in conv ms",
        "÷ conv",
        "Triton patch norm ms",
        "cuDNN bwd-data ms",
        "Triton adjoint ms",
        "÷ bwd-data",
        "prologue in conv ms",
        "implicit GEMM layer ms",
        "÷ conv",
    ]
    return markdown_table(headers, rows)


def ratio_table(models: Sequence[str], batches: Sequence[int], dtype: str) -> str:
    """Per distinct conv shape of ``models``, the predicted layer ÷ conv floor ratio: median and range."""
    from bench.bench_bcos_conv2d import zoo_conv_shapes
    from bench.common import markdown_table

    shapes = [Conv(*s) for s in zoo_conv_shapes(list(models))]
    rows = []
    for n in batches:
        for kind in CEILINGS:
            floors = [op_floors(conv, n, dtype, kind) for conv in shapes]
            for name, num, den in (
                ("Triton layer ÷ cuDNN conv", "triton_layer", "conv"),
                ("epilogue in conv ÷ cuDNN conv", "fused_conv", "conv"),
                ("Triton adjoint ÷ cuDNN bwd-data", "triton_adjoint", "backward_data"),
                ("prologue in conv ÷ cuDNN bwd-data", "fused_adjoint", "backward_data"),
                ("implicit GEMM layer (as built) ÷ cuDNN conv", "gemm_layer", "conv"),
                ("implicit GEMM adjoint bwd ÷ cuDNN conv + 2 products", "gemm_product", "adjoint_backward"),
            ):
                ratios = [f[num] / f[den] for f in floors]
                rows.append(
                    [
                        n,
                        kind.removeprefix("nvidia-"),
                        name,
                        f"{statistics.median(ratios):.2f}×",
                        f"{min(ratios):.2f}–{max(ratios):.2f}×",
                    ]
                )
    headers = ["N", "device", f"floor ratio over the {len(shapes)} distinct conv shapes", "median", "range"]
    return markdown_table(headers, rows)


def shape_table(models: Sequence[str], n: int, dtype: str, kind: str) -> str:
    """One row per distinct conv shape: each kernel's bytes, FLOPs and floor on ``kind``."""
    from bench.bench_bcos_conv2d import zoo_conv_shapes
    from bench.common import markdown_table

    rows = []
    for conv in (Conv(*s) for s in zoo_conv_shapes(list(models))):
        kernels = conv_kernels(conv, n, ELEMENT_BYTES[dtype])
        f = op_floors(conv, n, dtype, kind)
        row = [conv.label()]
        for name in ("conv", "sumsq", "epilogue", "product"):
            traffic, flops = kernels[name]
            row.append(f"{traffic.bytes / 1e6:.1f} MB, {flops / 1e9:.2f} GF, {_ms(f[name] * 1e3)} µs")
        row.append(f"{f['triton_layer'] / f['conv']:.2f}×")
        rows.append(row)
    headers = ["shape", "cuDNN conv", "_sumsq_kernel", "_epilogue_kernel", "_product_kernel", "layer ÷ conv"]
    return markdown_table(headers, rows)


def loss_table(batches: Sequence[int], dtype: str) -> str:
    """The loss and the contribution map per batch: bytes, FLOPs, floor on each device."""
    from bench.common import markdown_table

    e = ELEMENT_BYTES[dtype]
    rows = []
    for n in batches:
        cases = [
            ("distill_loss forward", loss_traffic(n, e, False), loss_flops(n, False)),
            ("distill_loss forward + gradients (two passes)", loss_traffic(n, e, True), loss_flops(n, True)),
            (
                "… maps kept on chip (not possible at this N)",
                loss_traffic(n, e, True, on_chip=True),
                loss_flops(n, True),
            ),
            (
                "contribution_map (x, W → map)",
                Traffic(0, e * n * (2 * MAP_ELEMENTS + MAP_ELEMENTS // 6), 1),
                2 * n * MAP_ELEMENTS,
            ),
        ]
        for name, traffic, flops in cases:
            floors = [_ms(floor(traffic, kind, dtype)["floor_ms"] * 1e3) for kind in CEILINGS]
            rows.append([name, n, f"{traffic.bytes / 1e6:.0f}", f"{flops / 1e9:.2f}", *floors])
    headers = ["kernel", "N", "MB", "GFLOP (vector)", *(f"floor µs {k.removeprefix('nvidia-')}" for k in CEILINGS)]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--loss-batches", default="64,128,256")
    parser.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="bfloat16")
    parser.add_argument("--per-shape", action="store_true", help="also one row per distinct conv shape (H100)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"Predicted floors (no measurement), {args.dtype}, ceilings of bench.floor.CEILINGS\n")
    print(
        f"### B-cos conv layers, summed over each model's convs at 224²\n\n{layer_table(models, batches, args.dtype)}\n"
    )
    print(f"### Per conv shape\n\n{ratio_table(models, batches, args.dtype)}\n")
    if args.per_shape:
        kind = next(iter(CEILINGS))
        print(f"### Every shape, N = {batches[0]}, {kind}\n\n{shape_table(models, batches[0], args.dtype, kind)}\n")
    loss_batches = [int(b) for b in args.loss_batches.split(",")]
    print(
        f"### Loss and contribution map (maps 6×224², {LOSS_CLASSES} classes)\n\n{loss_table(loss_batches, args.dtype)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
