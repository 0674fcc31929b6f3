"""Every ``e2kd::`` op's files share one stem, so each op's files are found by its name alone.

The stem of an op is the name of the module under ``e2kd_fast/ops/`` that defines it. From it:
``tests/test_<stem>.py``; every Triton implementation registered for the op (`backends.register`)
calls kernels of ``kernels/<stem>.py`` only; a C++ implementation calls library ops
``e2kd_cpp::<stem>*`` defined in ``csrc/cpu/<stem>.cpp``, with its shared checks in ``csrc/<stem>.h``
(and ``csrc/cuda/<stem>.cu``, where there is one, implements the same ops); the benchmarks have a
row named by the stem (``bench.bench_ops.OPS``) or a ``bench/bench_<stem>.py``. Conversely, every
kernel file and every extension source is named by the stem of an op. The checks read sources and
registrations only: nothing is compiled or built.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from e2kd_fast.ops import OPS, backends

ROOT = Path(__file__).resolve().parents[1]
# The extension's module-init stub belongs to no op.
CSRC_SHARED = {"ops.cpp"}


def _defining_module(op) -> str:
    # custom_op keeps the function it wrapped; that function's module is where the op is defined.
    return op._init_fn.__module__


STEMS = {test.name: _defining_module(test.op).rpartition(".")[2] for test in OPS}
OP_NAMES = sorted(STEMS)


def _tree(fn: Callable) -> ast.Module:
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _kernel_modules(fn: Callable) -> set[str]:
    """The modules of ``e2kd_fast.kernels`` that ``fn`` imports."""
    found = set()
    for node in ast.walk(_tree(fn)):
        if isinstance(node, ast.ImportFrom) and node.module == "e2kd_fast.kernels":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("e2kd_fast.kernels."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("e2kd_fast.kernels."))
    return found


def _library_ops(fn: Callable) -> set[str]:
    """The ``torch.ops.e2kd_cpp.<name>`` that ``fn`` calls."""
    return {
        node.attr
        for node in ast.walk(_tree(fn))
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.ops.e2kd_cpp"
    }


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_is_defined_in_a_module_of_ops_with_its_test_file(name):
    module, stem = _defining_module(next(t.op for t in OPS if t.name == name)), STEMS[name]
    assert module == f"e2kd_fast.ops.{stem}", f"{name} is defined in {module}, not in a module of e2kd_fast.ops"
    assert (ROOT / "e2kd_fast" / "ops" / f"{stem}.py").is_file()
    assert (ROOT / "tests" / f"test_{stem}.py").is_file(), f"{name}: no tests/test_{stem}.py"
    implementations = backends.registered(name)
    assert "reference" in implementations, f"{name}: no reference implementation"
    for backend, fn in implementations.items():
        assert fn.__module__ == module, f"{name}: the {backend} implementation is in {fn.__module__}, not {module}"


@pytest.mark.parametrize("name", OP_NAMES)
def test_triton_implementation_calls_kernels_of_the_stem_only(name):
    stem, fn = STEMS[name], backends.registered(name).get("triton")
    if fn is None:
        pytest.skip(f"{name} has no Triton implementation")
    assert _kernel_modules(fn) == {stem}, f"{name}: Triton implementation imports kernels {_kernel_modules(fn)}"
    assert (ROOT / "kernels" / f"{stem}.py").is_file()


@pytest.mark.parametrize("name", OP_NAMES)
def test_cpp_implementation_calls_library_ops_of_the_stem_defined_in_its_sources(name):
    stem, fn = STEMS[name], backends.registered(name).get("cpp")
    if fn is None:
        pytest.skip(f"{name} has no C++ implementation")
    csrc = ROOT / "csrc"
    cpu, cuda = csrc / "cpu" / f"{stem}.cpp", csrc / "cuda" / f"{stem}.cu"
    assert cpu.is_file(), f"{name}: no csrc/cpu/{stem}.cpp"
    assert (csrc / f"{stem}.h").is_file(), f"{name}: no csrc/{stem}.h"
    library_ops = _library_ops(fn)
    assert library_ops, f"{name}: its C++ implementation calls no torch.ops.e2kd_cpp op"
    for library_op in library_ops:
        assert library_op.startswith(stem), f"{name}: e2kd_cpp::{library_op} is not named by the stem {stem}"
        assert re.search(rf'"{library_op}\(', cpu.read_text()), f"{cpu.relative_to(ROOT)} defines no {library_op}"
        if cuda.is_file():
            assert f'm.impl("{library_op}"' in cuda.read_text(), f"{cuda.relative_to(ROOT)} lacks {library_op}"


@pytest.mark.parametrize("name", OP_NAMES)
def test_benchmarks_have_an_entry_named_by_the_stem(name):
    from bench import bench_ops

    stem = STEMS[name]
    assert stem in bench_ops.OPS or (ROOT / "bench" / f"bench_{stem}.py").is_file(), (
        f"{name}: no row {stem!r} in bench.bench_ops.OPS and no bench/bench_{stem}.py"
    )


def test_every_kernel_and_extension_source_is_named_by_an_op_stem():
    stems = set(STEMS.values())
    files = [p for p in (ROOT / "kernels").glob("*.py") if not p.name.startswith("_")]
    files += [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    orphans = [str(p.relative_to(ROOT)) for p in files if p.stem not in stems and p.name not in CSRC_SHARED]
    assert not orphans, f"not named by the stem of any e2kd:: op {sorted(stems)}: {orphans}"
