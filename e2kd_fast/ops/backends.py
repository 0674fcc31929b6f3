"""Which implementation of an ``e2kd::`` op runs: the reference, Triton or the compiled C++/CUDA kernels.

Every op has one contract (its ``custom_op`` schema, fake and autograd) and several implementations
of its forward. The op's body asks this module for the implementation to call for the device of its
inputs::

    impl = backends.implementation("e2kd::distill_loss", x.device.type)
    return impl(...)

The choice, in order of precedence:

1. the innermost ``with use_backend(name):`` block,
2. the environment variable ``E2KD_BACKEND`` (read at call time, so it can change between runs),
3. ``"auto"``.

``"reference"`` always runs the plain-PyTorch reference. ``"triton"`` and ``"cpp"`` run that back end
for every op that has it on the inputs' device and the reference for the others (`describe` lists
which is which); asking for a back end that is not available at all (the extension was not built,
Triton is not importable) is an error that says why. ``"auto"`` takes, per op and device, the back end
recorded as fastest in ``fastest.json`` (written from benchmark runs), or else the first available of
``cpp``, ``triton``, ``reference`` for that op and device (never the Triton interpreter on CPU
tensors: it is there for tests and must be asked for by name).

``fastest.json`` maps ``"<op>@<device>"`` to a back end, and may refine it per shape class,
``"<op>@<device>@<class>"`` (the convs' class is their kernel and stride, ``k3x3-s1x1``; an op passes
its class to `choose`). A value may name a kernel variant after a colon, ``"triton:implicit-gemm"``:
the back end's own choice among its kernels (`recorded_variant`), taken under ``auto`` only.

Triton kernels run on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the
interpreter the tests use); the C++ back end runs wherever the extension registered a kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from e2kd_fast._ext import build_config, load_extension

BACKENDS = ("auto", "reference", "triton", "cpp")
FAST_BACKENDS = ("cpp", "triton")  # the order "auto" tries when nothing is recorded

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("e2kd_backend", default=None)


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    device_types: tuple[str, ...]
    available: Callable[[], bool] | None = None  # a per-op check (e.g. a kernel missing from an older build)


# (op name, back end) -> implementation; the reference is registered by each op module.
_IMPLS: dict[tuple[str, str], _Impl] = {}


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown e2kd back end {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The requested back end: ``use_backend`` block, else ``E2KD_BACKEND``, else ``"auto"``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("E2KD_BACKEND", "auto").strip().lower() or "auto", "E2KD_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the ``e2kd::`` ops in the block with back end ``name`` (``auto|reference|triton|cpp``)."""
    if name != "auto" and name != "reference":
        reason = unavailable_reason(name)
        if reason:
            raise RuntimeError(f"e2kd back end {name!r} is not available: {reason}")
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def register(
    op_name: str, backend: str, device_types: tuple[str, ...], available: Callable[[], bool] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements the forward of ``op_name`` for ``backend`` on ``device_types``.

    ``available``, when given, is asked (after the back end itself is found available) whether this
    op's kernel can run here; when it says no, the op runs as if ``backend`` had no kernel for it.
    """
    _check_name(backend, "register")
    if backend == "auto":
        raise ValueError("register: 'auto' is a choice, not a back end")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(op_name, backend)] = _Impl(fn, tuple(device_types), available)
        return fn

    return wrap


def cpp_device_types() -> tuple[str, ...]:
    """Where the C++ back end has kernels: CUDA only when setup.py recorded a CUDA build (a file read, no
    device query), so a CPU-only build never claims CUDA tensors."""

    return ("cpu", "cuda") if build_config()["cuda"] else ("cpu",)


@functools.cache
def cpp_op_current(name: str, argument: str | None = None) -> bool:
    """Whether the loaded extension has ``e2kd_cpp::<name>`` (with ``argument`` in its schema, when
    given); one warning when the extension predates it. Pass as `register`'s ``available``: with an
    older build, the op runs as if ``cpp`` had no kernel for it."""
    packet = getattr(torch.ops.e2kd_cpp, name, None)
    if packet is not None and (argument is None or any(a.name == argument for a in packet.default._schema.arguments)):
        return True
    warnings.warn(
        f"e2kd_cpp::{name} in the loaded extension predates this package (rebuild it: pip install -e .); "
        f"its op runs on the next back end instead",
        stacklevel=2,
    )
    return False


def unavailable_reason(backend: str) -> str:
    """Why ``backend`` cannot run at all here (empty when it can)."""
    if backend == "cpp":
        if load_extension() is None:
            return f"the compiled extension e2kd_fast._C is not loaded ({build_config()['reason']})"
        return ""
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not importable"
        return ""
    return ""


def _runs_on(backend: str, impl: _Impl, device_type: str) -> bool:
    if backend == "triton":
        # CPU tensors only in the interpreter; read at call time, never at import.
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False
        if device_type == "cpu":
            return True
    return device_type in impl.device_types


def candidates(op_name: str, device_type: str) -> list[str]:
    """The back ends that can run ``op_name`` on ``device_type`` here, the reference last."""
    found = []
    for backend in FAST_BACKENDS:
        impl = _IMPLS.get((op_name, backend))
        if impl is None or not _runs_on(backend, impl, device_type) or unavailable_reason(backend):
            continue
        if impl.available is None or impl.available():
            found.append(backend)
    return [*found, "reference"]


@functools.cache
def _fastest_table() -> dict[str, str]:
    """``{"<op>@<device>[@<shape class>]": "backend[:variant]"}`` as written from benchmark runs
    (``python -m bench.bench_bcos_conv2d --fastest-out`` proposes the conv entries)."""
    path = Path(__file__).with_name("fastest.json")
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    return {key: value for key, value in table.items() if key != "_comment"}


def _recorded(
    op_name: str, device_type: str, shape_class: str | None, available: list[str] | None = None
) -> tuple[str, str | None] | None:
    """(back end, variant or None) recorded for the op, device and shape class, else for the op and
    device (the first whose back end is in ``available``, when given), or None."""
    table = _fastest_table()
    keys = [f"{op_name}@{device_type}@{shape_class}"] if shape_class else []
    for key in [*keys, f"{op_name}@{device_type}"]:
        entry = table.get(key)
        if entry is None:
            continue
        backend, _, variant = entry.strip().partition(":")
        if available is None or backend in available:
            return backend, variant.strip() or None
    return None


def _choice(op_name: str, device_type: str, shape_class: str | None) -> tuple[str, str | None]:
    """(back end, kernel variant) for ``op_name`` under the current request; the variant is the one
    ``auto``'s record names, else None."""
    requested = current_backend()
    if requested == "reference":
        return "reference", None
    available = candidates(op_name, device_type)
    if requested == "auto":
        # Triton on CPU tensors is the interpreter (tests): asked for by name, never a default.
        available = [b for b in available if not (b == "triton" and device_type == "cpu")]
        return _recorded(op_name, device_type, shape_class, available) or (available[0], None)
    reason = unavailable_reason(requested)
    if reason:
        raise RuntimeError(f"E2KD_BACKEND={requested!r} was requested for {op_name}, but it is not available: {reason}")
    return (requested if requested in available else "reference"), None


def choose(op_name: str, device_type: str, shape_class: str | None = None) -> str:
    """The back end that runs ``op_name`` on ``device_type`` (inputs of ``shape_class``) under the
    current request."""
    return _choice(op_name, device_type, shape_class)[0]


def recorded_variant(op_name: str, device_type: str, shape_class: str | None = None) -> str | None:
    """The kernel variant ``fastest.json`` names for the op, device and shape class ("implicit-gemm"
    of ``"triton:implicit-gemm"``), when ``auto`` chose that record's back end; else None."""
    return _choice(op_name, device_type, shape_class)[1]


@torch.compiler.assume_constant_result
def use_fused(op_name: str, device_type: str, shape_class: str | None = None) -> bool:
    """Whether a layer should call the registered op ``op_name`` instead of its inline reference maths.

    True when the back end chosen for ``device_type`` is not the reference: the plain torch ops stay
    visible to Inductor on the reference path (an opaque reference op was slower). (`choose` never
    picks the Triton interpreter on CPU under ``auto``, nor a C++ kernel missing from the loaded
    extension.) Under ``torch.compile`` the answer is a trace-time constant (no guard, no graph
    break): choose the back end before compiling.
    """
    return choose(op_name, device_type, shape_class) != "reference"


def implementation(op_name: str, device_type: str, shape_class: str | None = None) -> Callable:
    """The forward function to call for ``op_name`` on ``device_type`` (see `choose`)."""
    return _IMPLS[(op_name, choose(op_name, device_type, shape_class))].fn


def registered(op_name: str) -> dict[str, Callable]:
    """``{back end: forward}`` of every implementation registered for ``op_name``, available here or not."""
    return {backend: impl.fn for (op, backend), impl in _IMPLS.items() if op == op_name}


def describe(device_type: str = "cpu") -> dict[str, str]:
    """``{op name: back end}`` for every op with a registered reference, under the current request."""
    ops = sorted({op for op, backend in _IMPLS if backend == "reference"})
    return {op: choose(op, device_type) for op in ops}
