"""The package's layers: every import points down (or across one layer), and no modules import each other in a loop.

`LAYERS` is the one list of the layers, from the ground up; docs/architecture.md describes them. A
module may import modules of its own layer and of lower ones. Imports are read from the source (no
module is run), both at module level and inside functions, so a function-level import cannot hide a
cycle or an upward edge. Function-level imports of the package's own modules are allowed only where
`DEFERRED_IMPORTS` gives the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# From the ground up. A name stands for that module and everything under it; the longest name wins.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("e2kd_fast._build_config", "e2kd_fast._ext", "e2kd_fast._files", "e2kd_fast.config"),  # build facts; modes; config
    ("e2kd_fast.reference",),  # the maths in plain PyTorch: the spec of every op
    ("e2kd_fast.ops._common", "e2kd_fast.ops._registry", "e2kd_fast.ops.backends"),  # ops' leaf helpers
    ("e2kd_fast.kernels",),  # Triton kernels (the top-level kernels/ folder)
    ("e2kd_fast.ops",),  # registered e2kd:: ops: schema, fake, autograd, back-end choice
    ("e2kd_fast.nn",),  # B-cos layers and norms
    ("e2kd_fast.models",),  # the model zoo and checkpoints
    ("e2kd_fast.explain",),  # explanations: autograd, the sweep, GradCAM
    ("e2kd_fast.distill",),  # the e²KD objective and the baselines
    ("e2kd_fast.metrics",),  # scores: evaluation extras, localisation, UniCAM, distance correlation
    ("e2kd_fast.data",),  # datasets, transforms, samplers, loaders, the frozen store
    ("e2kd_fast.engine",),  # jobs: build models, train, evaluate, precompute; distribution
    ("e2kd_fast.report", "e2kd_fast.xdistill"),  # applications on top of the engine
    ("e2kd_fast.demo",),
    ("e2kd_fast.cli", "e2kd_fast.__main__", "e2kd_fast"),  # the command line; the package's face
)

# (importer, imported prefix) → why the import waits until the function runs.
DEFERRED_IMPORTS: dict[tuple[str, str], str] = {
    ("e2kd_fast.cli", "e2kd_fast"): "each command imports what it runs: --help and argument errors answer at once",
    ("e2kd_fast._ext", "e2kd_fast._build_config"): "setup.py generates it; an unbuilt checkout has none",
    ("e2kd_fast.ops", "e2kd_fast.kernels"): "Triton kernels load when a Triton back end first runs",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":  # installed as e2kd_fast.kernels (setup.py package_dir)
        rel = Path("e2kd_fast", *rel.parts)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("e2kd_fast/**/*.py"), *ROOT.glob("kernels/**/*.py")]
    return {_module_name(f): f for f in files}


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an import statement loads (``from pkg import sub`` names the submodule)."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, deferred) for every import of a package module."""
    edges = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target in MODULES:
                    edges.append((name, target, node.lineno, id(node) not in top_level))
    return edges


EDGES = _imports()


def _layer(module: str) -> int:
    best, level = -1, -1
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    return level


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_imports_point_down():
    upward = [
        f"{MODULES[a].relative_to(ROOT)}:{line} imports {b} (layer {_layer(b)} above {_layer(a)})"
        for a, b, line, _ in EDGES
        if _layer(b) > _layer(a)
    ]
    assert upward == [], "\n".join(upward)


def test_function_level_imports_have_a_reason():
    def allowed(a: str, b: str) -> bool:
        return any((a == i or a.startswith(i + ".")) and (b == t or b.startswith(t + ".")) for i, t in DEFERRED_IMPORTS)

    unexplained = [
        f"{MODULES[a].relative_to(ROOT)}:{line} imports {b} inside a function"
        for a, b, line, deferred in EDGES
        if deferred and not allowed(a, b)
    ]
    assert unexplained == [], "\n".join(unexplained)


def _cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b in edges:
        if a != b:
            graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles([(a, b) for a, b, _, _ in EDGES]) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert _cycles([("e2kd_fast.data.build", "e2kd_fast.data.voc"), ("e2kd_fast.data.voc", "e2kd_fast.data.build")])
    assert _layer("e2kd_fast.engine.trainer") > _layer("e2kd_fast.data.loaders") > _layer("e2kd_fast.models")


def test_no_private_name_is_imported_across_modules():
    """``from x import _name`` between modules: a private name is its module's own business."""
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("e2kd_fast")):
                continue
            for alias, target in zip(node.names, _resolve(name, path.name == "__init__.py", node), strict=True):
                dunder = alias.name.startswith("__") and alias.name.endswith("__")  # public: __version__
                if alias.name.startswith("_") and not dunder and target != f"{target.rsplit('.', 1)[0]}.{alias.name}":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {target}")
    assert offenders == [], "\n".join(offenders)
