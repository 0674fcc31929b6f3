"""The `ops` suite: every B-cos layer and loss term over real layer shapes, per provider and mode.

Ops: ``bcos_conv2d`` (`e2kd_fast.nn.BcosConv2d`), ``bcos_linear`` (`BcosLinear`), ``bcos_dense_head``
(a dense layer's norm and 1×1 B-cos conv in eval mode, as a teacher's sweep runs them), ``kd_kl`` and
``explanation_cosine_loss`` (`e2kd_fast.reference.losses`), ``distill_loss`` (the whole e²KD loss,
`e2kd_fast.ops.distill_loss`) and ``contribution_map`` (`e2kd_fast.explain.contribution_map`). The
rows of the ``e2kd::`` ops are named by their stems (``e2kd_fast/ops/<stem>.py``). Modes:

- ``fwd``: the training forward (autograd recording);
- ``bwd``: the backward of that forward, to the input and the weight;
- ``exp``: the explanation path, a ``create_graph`` backward to the input in explanation mode;
- ``exp_bwd``: the backward *of* the explanation path (second order), to the input and the weight,
  outside explanation mode, as the final ``loss.backward()`` of an e²KD step runs it.

``bcos_dense_head`` has the ``fwd`` mode only, without gradients (a teacher's): the reference runs the
layer's modules on the concatenation of two feature maps (the block's earlier channels and the
newest 32), ``fast`` the op ``e2kd::bcos_dense_head`` that the teacher's sweep calls.

Providers are a table (`PROVIDERS`): ``reference-eager``, ``reference-compiled`` (``torch.compile``
of the same module or function: the honest baseline) and ``fast`` (the registered ``e2kd::`` ops,
which plug in through `FAST_PATHS`). Where a provider has no implementation of an (op, mode), the
record has status ``unsupported`` and the table shows "–".

Shapes: ``real`` traces B-cos R18/R50/D169 at 224² (every distinct `BcosConv2d`) and ViT-Ti (every
distinct `BcosLinear`) with forward hooks; losses at batch 256 and 1000 classes; contribution maps
of 6×224² inputs at the loss batch. ``small`` is a handful of tiny shapes for CPUs and the smoke test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench import common

SUITE = "ops"
REFERENCE = "reference-eager"
MODES = ("fwd", "bwd", "exp", "exp_bwd", "train")
LAYER_MODES = ("fwd", "bwd", "exp", "exp_bwd")
LOSS_MODES = ("fwd", "bwd")
# distill_loss adds train: forward and backward in one timed call (the fused loss moves work between them)
FUSED_LOSS_MODES = ("fwd", "bwd", "train")
OPS = (
    "bcos_conv2d",
    "bcos_linear",
    "bcos_dense_head",
    "kd_kl",
    "explanation_cosine_loss",
    "distill_loss",
    "contribution_map",
)
LOSS_TAU, LOSS_LAM = 4.0, 1.0  # distill_loss: τ and λ (speed does not depend on them)

# Fast paths: op name → factory(reference callable) → fast callable with the same signature. An op
# without an entry has no fast provider: its records are "unsupported" and the table shows "–".
FAST_PATHS: dict[str, Callable[[Callable[..., Tensor]], Callable[..., Tensor]]] = {}


def _with_fast_backend(op_name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """The layer run with the first fast back end of ``op_name`` on the input's device (cpp, then triton)."""

    def factory(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        from e2kd_fast.ops import backends

        def call(*inputs: Tensor) -> Tensor:
            device = inputs[0].device.type
            fast = [b for b in backends.candidates(op_name, device) if b != "reference"]
            if device == "cpu":  # the Triton interpreter is a test tool, not a fast path
                fast = [b for b in fast if b != "triton"]
            if not fast:  # recorded as "unsupported", like a provider without the op
                raise NotImplementedError(f"no fast back end of {op_name} on {device}")
            with backends.use_backend(fast[0]):
                return fn(*inputs)

        return call

    return factory


FAST_PATHS["bcos_conv2d"] = _with_fast_backend("e2kd::bcos_conv2d")
FAST_PATHS["bcos_dense_head"] = lambda head: head.as_op
FAST_PATHS["contribution_map"] = _with_fast_backend("e2kd::contribution_map")


def _loss_backend(
    backend: str, triton_kernel: str | None = None
) -> Callable[[str, Callable[..., Tensor]], Callable[..., Tensor] | None]:
    """Provider ``wrap`` for one back end of ``e2kd::distill_loss`` (other ops: no implementation).

    ``triton_kernel`` picks the Triton forward (``E2KD_TRITON_LOSS`` during the call: ``split`` or
    ``one-pass``); None leaves the environment's choice.
    """

    def wrap(op: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor] | None:
        if op != "distill_loss":
            return None
        from e2kd_fast.ops import backends, distill_loss

        def call(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor) -> Tensor:
            device = zs.device.type
            fast = [b for b in backends.candidates("e2kd::distill_loss_fused", device) if b != "reference"]
            fast = [b for b in fast if not (b == "triton" and device == "cpu")]  # the interpreter: tests only
            name = fast[0] if backend == "fast" and fast else backend
            if name not in fast:
                raise NotImplementedError(f"no {backend} kernel of e2kd::distill_loss on {device} here")
            with common.environment_variable("E2KD_TRITON_LOSS", triton_kernel), backends.use_backend(name):
                return distill_loss(zs, zt, es, et, LOSS_TAU, LOSS_LAM)[0]

        return call

    return wrap


FAST_PATHS["distill_loss"] = lambda fn: _loss_backend("fast")("distill_loss", fn)


@dataclass(frozen=True)
class Provider:
    """How a provider turns the reference callable of an op into the callable it benchmarks.

    ``wrap`` returns None when the provider has no implementation of that op;
    ``double_backward`` says whether the result may be differentiated twice (the ``exp`` modes).
    """

    name: str
    wrap: Callable[[str, Callable[..., Tensor]], Callable[..., Tensor] | None]
    double_backward: bool
    why_not_double_backward: str = ""


def _compiled(op: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    torch._dynamo.reset()  # a fresh cache per shape: compile time is reported per entry
    return torch.compile(fn, dynamic=False)


def _fast(op: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor] | None:
    factory = FAST_PATHS.get(op)
    return None if factory is None else factory(fn)


PROVIDERS: dict[str, Provider] = {
    "reference-eager": Provider("reference-eager", lambda op, fn: fn, True),
    "reference-compiled": Provider(
        "reference-compiled",
        _compiled,
        False,
        "torch.compile does not support double backward (docs/architecture.md#platform-notes)",
    ),
    "fast": Provider("fast", _fast, True),
    # One column per kernel back end of the fused loss (other ops: "–"); Triton's two forwards.
    "cpp": Provider("cpp", _loss_backend("cpp"), True),
    "triton": Provider("triton", _loss_backend("triton", "split"), True),
    "triton-one-pass": Provider("triton-one-pass", _loss_backend("triton", "one-pass"), True),
}


@dataclass(frozen=True)
class OpShape:
    """One benchmark case: the op and its geometry (batch included)."""

    op: str
    batch: int
    in_channels: int = 0  # conv C_in, linear in_features, loss: classes or map channels
    out_channels: int = 0
    height: int = 0  # conv input H, W; linear: tokens per sample in height, width 1
    width: int = 0
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    groups: int = 1
    b: float = 2.0
    max_out: int = 1
    source: str = ""  # which models use it

    def label(self) -> str:
        if self.op == "bcos_conv2d":
            return (
                f"N{self.batch} C{self.in_channels}→{self.out_channels} {self.height}×{self.width} "
                f"k{self.kernel} s{self.stride} p{self.padding}" + (f" g{self.groups}" if self.groups > 1 else "")
            )
        if self.op == "bcos_dense_head":
            return f"N{self.batch} C{self.in_channels}→{self.out_channels} {self.height}×{self.width}"
        if self.op == "bcos_linear":
            return f"{self.batch}×{self.height} tok, {self.in_channels}→{self.out_channels}"
        if self.op == "distill_loss":
            return f"N{self.batch} C{self.in_channels} maps {self.out_channels}×{self.height}×{self.width}"
        if self.op == "kd_kl":
            return f"N{self.batch} C{self.in_channels}"
        return f"N{self.batch} {self.in_channels}×{self.height}×{self.width}"

    def config(self, dtype: str) -> dict[str, Any]:
        cfg = {k: v for k, v in asdict(self).items() if k != "source"}
        cfg["dtype"] = dtype
        return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=("real", "small"), default=None, help="default: real on CUDA, small on CPU")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ", ".join(PROVIDERS)
    )
    parser.add_argument(
        "--dtype", choices=sorted(common.DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="conv/linear batch (default 64 on CUDA, 2 on CPU; loss: 256)"
    )
    parser.add_argument("--loss-batch", type=int, default=256)
    parser.add_argument(
        "--models", default="bcos_resnet18,bcos_resnet50,bcos_densenet169", help="models traced for conv shapes"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many shapes per op (for quick looks)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def trace_layer_shapes(model_name: str, resolution: int = 224, distinct: bool = True) -> list[tuple]:
    """The geometries of the B-cos layers of ``model_name``, from forward hooks (batch 1).

    Returns tuples ``("conv", C_in, H, W, C_out, k, stride, padding, groups, b, max_out)`` or
    ``("linear", tokens, in_features, out_features, b, max_out)``, in first-use order; with
    ``distinct=False`` one tuple per layer call, repeats included (what a forward pass runs).
    """
    from e2kd_fast import create_model
    from e2kd_fast.nn import BcosConv2d, BcosLinear

    model = create_model(model_name).eval()
    found: list[tuple] = []

    def conv_hook(mod: BcosConv2d, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        _, c, h, w = inputs[0].shape
        key = (
            "conv",
            c,
            h,
            w,
            mod.out_channels,
            mod.kernel_size[0],
            mod.stride[0],
            mod.padding[0],
            mod.groups,
            float(mod.b),
            mod.max_out,
        )
        found.append(key)

    def linear_hook(mod: BcosLinear, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        tokens = inputs[0].numel() // inputs[0].shape[-1]
        found.append(("linear", tokens, mod.in_features, mod.out_features, float(mod.b), mod.max_out))

    handles = []
    for m in model.modules():
        if isinstance(m, BcosConv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, BcosLinear):
            handles.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, 6, resolution, resolution))
    for h in handles:
        h.remove()
    return list(dict.fromkeys(found)) if distinct else found


def trace_dense_head_shapes(model_name: str, resolution: int = 224) -> list[tuple[int, int, int, int, float]]:
    """``(C_in, H, W, C_out, b)`` of every dense layer's head in ``model_name`` (none outside DenseNets)."""
    from e2kd_fast import create_model
    from e2kd_fast.models.bcos_densenet import DenseLayer

    model = create_model(model_name).eval()
    found: list[tuple[int, int, int, int, float]] = []

    def hook(layer: DenseLayer, inputs: tuple, _out: Tensor) -> None:
        features = inputs[0]
        _, _, h, w = features[0].shape
        channels = sum(f.shape[1] for f in features)
        found.append((channels, h, w, layer.conv1.out_channels, float(layer.conv1.b)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DenseLayer)]
    with torch.no_grad():
        model(torch.zeros(1, 6, resolution, resolution))
    for h in handles:
        h.remove()
    return list(dict.fromkeys(found))


def real_shapes(models: list[str], batch: int, loss_batch: int) -> list[OpShape]:
    """Conv shapes of ``models`` at 224² and linear shapes of ViT-Ti, deduplicated; losses at ``loss_batch``."""
    shapes: dict[OpShape, list[str]] = {}

    def add(shape: OpShape, model: str) -> None:
        shapes.setdefault(shape, []).append(model)

    for name in [*models, "bcos_vit_ti_patch16_224"]:
        for t in trace_layer_shapes(name):
            if t[0] == "conv":
                _, c, h, w, o, k, s, p, g, b, mo = t
                add(OpShape("bcos_conv2d", batch, c, o, h, w, k, s, p, g, b, mo), name)
            else:
                _, tokens, fin, fout, b, mo = t
                add(OpShape("bcos_linear", batch, fin, fout, tokens, 1, b=b, max_out=mo), name)
        for c, h, w, o, b in trace_dense_head_shapes(name):
            add(OpShape("bcos_dense_head", batch, c, o, h, w, b=b), name)
    out = [OpShape(**{**asdict(s), "source": "+".join(sorted(set(m)))}) for s, m in shapes.items()]
    out.append(OpShape("kd_kl", loss_batch, 1000, source="loss"))
    out.append(OpShape("explanation_cosine_loss", loss_batch, 6, height=224, width=224, source="loss"))
    out.append(OpShape("contribution_map", loss_batch, 6, height=224, width=224, source="explanation"))
    for n in sorted({128, loss_batch}):
        out.append(OpShape("distill_loss", n, 1000, 6, 224, 224, source="loss"))
    return out


def small_shapes() -> list[OpShape]:
    """A few tiny shapes: the harness check on CPUs, not a performance statement."""
    return [
        OpShape("bcos_conv2d", 2, 6, 16, 32, 32, 3, 1, 1, source="small"),
        OpShape("bcos_conv2d", 2, 16, 32, 32, 32, 3, 2, 1, source="small"),
        OpShape("bcos_conv2d", 2, 32, 64, 16, 16, 1, 1, 0, source="small"),
        OpShape("bcos_linear", 2, 64, 192, 16, 1, source="small"),
        OpShape("bcos_dense_head", 2, 96, 128, 16, 16, source="small"),
        OpShape("kd_kl", 16, 100, source="small"),
        OpShape("explanation_cosine_loss", 16, 6, height=32, width=32, source="small"),
        OpShape("contribution_map", 16, 6, height=32, width=32, source="small"),
        OpShape("distill_loss", 8, 1000, 6, 128, 128, source="step, CPU"),
    ]


# --------------------------------------------------------------------------------------------------
# Cases: the reference callable, its inputs, and one callable per mode
# --------------------------------------------------------------------------------------------------


DENSE_GROWTH = 32  # the channels of a dense layer's output: the newest of its head's input maps


class DenseHead(nn.Module):
    """A dense layer's head in eval mode without gradients: its norm and 1×1 B-cos conv on the
    concatenation of two feature maps, inline (``forward``) or as the op (``as_op``)."""

    def __init__(self, in_channels: int, out_channels: int, b: float) -> None:
        super().__init__()
        from e2kd_fast.nn import BatchNormUncentered2d, BcosConv2d

        self.norm1 = BatchNormUncentered2d(in_channels)
        self.conv1 = BcosConv2d(in_channels, out_channels, 1, b=b)
        with torch.no_grad():
            self.norm1.running_var.uniform_(0.5, 2.0)
        self.eval().requires_grad_(False)

    def forward(self, earlier: Tensor, latest: Tensor) -> Tensor:
        return self.conv1(self.norm1(torch.cat([earlier, latest], 1)))

    def as_op(self, earlier: Tensor, latest: Tensor) -> Tensor:
        from e2kd_fast import ops

        norm, conv = self.norm1, self.conv1
        features = [earlier, latest]
        return ops.bcos_dense_head(features, norm.running_var, norm.weight, norm.eps, conv.linear.weight, conv.b)[0]


@dataclass
class Case:
    """The callables of one (shape, provider) and the tensors each mode touches."""

    module: nn.Module | None  # the layer (explanation mode is switched on it), None for losses
    forward: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    params: tuple[Tensor, ...]


def build_reference(
    shape: OpShape, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module | None, Callable[..., Tensor], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(layer or None, reference forward, inputs requiring grad where differentiated, parameters)."""
    from e2kd_fast.explain import contribution_map
    from e2kd_fast.nn import BcosConv2d, BcosLinear
    from e2kd_fast.reference.losses import explanation_cosine_loss, kd_kl

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int, grad: bool = True) -> Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    if shape.op == "bcos_conv2d":
        layer = BcosConv2d(
            shape.in_channels,
            shape.out_channels,
            shape.kernel,
            stride=shape.stride,
            padding=shape.padding,
            groups=shape.groups,
            b=shape.b,
            max_out=shape.max_out,
        ).to(device=device, dtype=dtype)
        x = rand(shape.batch, shape.in_channels, shape.height, shape.width)
        return layer, layer, (x,), (layer.linear.weight,)
    if shape.op == "bcos_linear":
        layer = BcosLinear(shape.in_channels, shape.out_channels, b=shape.b, max_out=shape.max_out)
        layer = layer.to(device=device, dtype=dtype)
        x = rand(shape.batch, shape.height, shape.in_channels)
        return layer, layer, (x,), (layer.linear.weight,)
    if shape.op == "bcos_dense_head":
        head = DenseHead(shape.in_channels, shape.out_channels, shape.b).to(device=device, dtype=dtype)
        newest = min(DENSE_GROWTH, shape.in_channels - 1)
        size = (shape.batch, shape.height, shape.width)
        earlier, latest = (
            rand(size[0], shape.in_channels - newest, *size[1:], grad=False),
            rand(size[0], newest, *size[1:], grad=False),
        )
        return None, head, (earlier, latest), ()
    if shape.op == "kd_kl":
        zs, zt = rand(shape.batch, shape.in_channels), rand(shape.batch, shape.in_channels, grad=False)
        return None, lambda s, t: kd_kl(s, t, 1.0), (zs, zt), ()
    if shape.op == "explanation_cosine_loss":
        size = (shape.batch, shape.in_channels, shape.height, shape.width)
        return None, explanation_cosine_loss, (rand(*size), rand(*size, grad=False)), ()
    if shape.op == "distill_loss":
        n, maps = shape.batch, (shape.batch, shape.out_channels, shape.height, shape.width)
        logits = (rand(n, shape.in_channels), rand(n, shape.in_channels, grad=False))
        inputs = (*logits, rand(*maps), rand(*maps, grad=False))

        def distill(zs: Tensor, zt: Tensor, es: Tensor, et: Tensor) -> Tensor:
            return kd_kl(zs, zt, LOSS_TAU) + LOSS_LAM * explanation_cosine_loss(es, et)

        return None, distill, inputs, ()
    if shape.op == "contribution_map":
        # Routes to e2kd::contribution_map when a fast back end is chosen (the fast provider), else inline.
        size = (shape.batch, shape.in_channels, shape.height, shape.width)
        return None, contribution_map, (rand(*size), rand(*size)), ()
    raise ValueError(f"unknown op {shape.op!r}")


def mode_callable(case: Case, mode: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(the timed callable, a function returning the tensors it touches, for the traffic estimate).

    Graphs that a mode differentiates are built once, outside the timed callable, and retained.
    """
    from e2kd_fast.nn import explanation_mode

    diff = tuple(t for t in case.inputs if t.requires_grad) + case.params
    if mode == "fwd":

        def fwd() -> Tensor:
            return case.forward(*case.inputs)

        return fwd, lambda: (case.inputs, case.params, fwd())
    if mode == "bwd":
        y = case.forward(*case.inputs)
        g = torch.randn_like(y)

        def bwd() -> tuple[Tensor, ...]:
            return torch.autograd.grad(y, diff, g, retain_graph=True)

        return bwd, lambda: (g, case.inputs, case.params, bwd())
    if mode == "train":

        def train() -> tuple[Tensor, ...]:
            return torch.autograd.grad(case.forward(*case.inputs), diff)

        return train, lambda: (case.inputs, case.params, train())
    if case.module is None:
        raise ValueError("the explanation modes exist only for B-cos layers")
    x = case.inputs[0]
    if mode == "exp":
        # The explanation flag is read at backward time: the timed callable switches the mode itself.
        with explanation_mode(case.module):
            y = case.forward(x)
        g = torch.randn_like(y)

        def exp() -> Tensor:
            with explanation_mode(case.module):
                return torch.autograd.grad(y, x, g, create_graph=True, retain_graph=True)[0]

        return exp, lambda: (g, x, case.params, exp())
    if mode == "exp_bwd":
        with explanation_mode(case.module):
            y = case.forward(x)
            g = torch.randn_like(y)
            (e,) = torch.autograd.grad(y, x, g, create_graph=True)
        h = torch.randn_like(e)

        def exp_bwd() -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(e, diff, h, retain_graph=True, allow_unused=True)

        return exp_bwd, lambda: (h, g, x, case.params, exp_bwd())
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


def _split(value: str, known: tuple[str, ...] | dict, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return items


def run(
    args: argparse.Namespace, device: torch.device, env: dict[str, Any], run_id: str, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    ops = _split(args.ops, OPS, "op(s)")
    modes = _split(args.modes, MODES, "mode(s)")
    providers = _split(args.providers, PROVIDERS, "provider(s)")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = common.DTYPES[dtype_name]
    shape_set = args.shapes or ("real" if cuda else "small")
    if shape_set == "real":
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        shapes = real_shapes(models, args.batch or (64 if cuda else 2), args.loss_batch)
    else:
        shapes = small_shapes()
    shapes = [s for s in shapes if s.op in ops]
    if args.limit is not None:
        kept, per_op = [], {}
        for s in shapes:
            per_op[s.op] = per_op.get(s.op, 0) + 1
            if per_op[s.op] <= args.limit:
                kept.append(s)
        shapes = kept
    log(f"[ops] {len(shapes)} shapes ({shape_set}), modes {modes}, providers {providers}, {dtype_name}")
    records: list[dict[str, Any]] = []
    for shape in shapes:
        kind = LAYER_MODES if shape.op.startswith("bcos_") else LOSS_MODES
        kind = ("fwd",) if shape.op == "bcos_dense_head" else kind
        shape_modes = [m for m in modes if m in (FUSED_LOSS_MODES if shape.op == "distill_loss" else kind)]
        for mode in shape_modes:
            config = {**shape.config(dtype_name), "mode": mode, "shapes": shape_set}
            flops = nbytes = None
            for name in providers:
                rec = _measure(shape, mode, PROVIDERS[name], config, device, dtype, args, env, run_id)
                if name == REFERENCE and rec["status"] == "ok":
                    flops, nbytes = rec["flops"], rec["bytes"]
                records.append(rec)
            # FLOPs and bytes are properties of the maths: the reference's count applies to every provider.
            for rec in records[-len(providers) :]:
                if rec["status"] == "ok" and rec["variant"] != REFERENCE:
                    rec["flops"], rec["bytes"] = flops, nbytes
                    rec.update(common.roofline(env["device_kind"], dtype_name, flops, nbytes, rec["time_ms"]["median"]))
            if shape.op == "distill_loss":  # the target is a share of the measured copy bandwidth
                copy = _copy_gbps(shape, device, dtype, args)
                for rec in records[-len(providers) :]:
                    if rec["status"] == "ok" and rec.get("gbps"):
                        rec["copy_gbps"], rec["copy_share"] = copy, rec["gbps"] / copy
            log(
                f"  {shape.op:24s} {shape.label():40s} {mode:8s} "
                + "  ".join(_short(r) for r in records[-len(providers) :])
            )
    common.add_ratios(records)
    return records


def _copy_gbps(shape: OpShape, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9) of a buffer the size of both maps."""
    numel = 2 * shape.batch * shape.out_channels * shape.height * shape.width
    src = torch.ones(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    samples = common.measure(lambda: dst.copy_(src), device, warmup=args.warmup, repeats=args.repeats)
    return 2 * src.nbytes / (common.summarize(samples)["median"] / 1e3) / 1e9


def _short(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return f"{rec['variant']}: –"
    return f"{rec['variant']}: {rec['time_ms']['median']:.3f} ms"


def _measure(shape, mode, provider: Provider, config, device, dtype, args, env, run_id) -> dict[str, Any]:
    def record(status: str, note: str | None = None, **fields: Any) -> dict[str, Any]:
        return common.make_record(
            run_id=run_id,
            env=env,
            suite=SUITE,
            config=config,
            variant=provider.name,
            reference=REFERENCE,
            status=status,
            note=note,
            source=shape.source,
            label=shape.label(),
            **fields,
        )

    if mode.startswith("exp") and not provider.double_backward:
        return record("unsupported", provider.why_not_double_backward)
    module, reference, inputs, params = build_reference(shape, device, dtype)
    forward = provider.wrap(shape.op, reference)
    if forward is None:
        return record("unsupported", f"no {provider.name} implementation of {shape.op}")
    case = Case(module, forward, inputs, params)
    try:
        t0 = time.perf_counter()
        fn, touched = mode_callable(case, mode)
        fn()  # the first call compiles for reference-compiled: timed apart from the steady state
        common.synchronize(device)
        first_call_s = time.perf_counter() - t0
        samples = common.measure(fn, device, warmup=args.warmup, repeats=args.repeats)
    except NotImplementedError as exc:  # e.g. a kernel back end that does not run on this device
        return record("unsupported", str(exc))
    except Exception as exc:  # one failing provider must not end the suite: record why
        return record("error", f"{type(exc).__name__}: {exc}"[:500])
    stats = common.summarize(samples)
    flops = common.count_flops(fn) if provider.name == REFERENCE else None
    nbytes = common.tensor_bytes([touched()]) if provider.name == REFERENCE else None
    fields = {"time_ms": stats, "first_call_s": first_call_s, "flops": flops, "bytes": nbytes}
    fields.update(common.roofline(env["device_kind"], config["dtype"], flops, nbytes, stats["median"]))
    return record("ok", **fields)


def table(records: list[dict[str, Any]]) -> str:
    """One row per (op, shape, mode): time per provider, speed-up against the eager and compiled reference."""
    providers = list(dict.fromkeys(r["variant"] for r in records if r["suite"] == SUITE))
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    labels: dict[tuple[str, str], tuple[str, str, str]] = {}
    for r in records:
        if r["suite"] != SUITE:
            continue
        key = (r["key"], r["config"]["mode"])
        groups.setdefault(key, {})[r["variant"]] = r
        labels[key] = (r["config"]["op"], r.get("label", ""), r["config"]["mode"])
    headers = ["op", "shape", "mode", *[f"{p} ms" for p in providers]]
    others = [p for p in providers if p != REFERENCE]
    headers += [f"{p} × eager" for p in others]
    if "fast" in providers and "reference-compiled" in providers:
        headers.append("fast × compiled")
    headers += ["TFLOP/s (best)", "GB/s (best)", "roofline (best)"]
    rows = []
    for key, by_provider in groups.items():

        def ms(p: str, by_provider: dict[str, dict[str, Any]] = by_provider) -> float | None:
            r = by_provider.get(p)
            return r["time_ms"]["median"] if r and r["status"] == "ok" else None

        row = [*labels[key], *[common.fmt_num(ms(p)) for p in providers]]
        for p in others:
            row.append(common.fmt_num(ms(REFERENCE) / ms(p)) + "×" if ms(p) and ms(REFERENCE) else "–")
        if "fast × compiled" in headers:
            row.append(
                common.fmt_num(ms("reference-compiled") / ms("fast")) + "×"
                if ms("fast") and ms("reference-compiled")
                else "–"
            )
        ok = [r for r in by_provider.values() if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["time_ms"]["median"]) if ok else {}
        share = best.get("roofline_share")
        row += [
            common.fmt_num(best.get("tflops")),
            common.fmt_num(best.get("gbps")),
            common.fmt_num(100 * share) + " %" if share else "–",
        ]
        rows.append(row)
    return common.markdown_table(headers, rows)
