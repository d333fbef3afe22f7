"""The package's imports point one way: down the layers below, with no cycle (issue 20, item 6).

Every ``import`` and ``from ... import`` of every module under ``kdkernels/`` counts, those inside functions
included (a lazy import is still an arrow). ``from kdkernels.torch_ops import x`` is an arrow to the module
``kdkernels.torch_ops.x`` when ``x`` is a module, else to ``kdkernels.torch_ops`` itself. The parent packages that
Python runs on the way (``kdkernels/__init__.py`` for any submodule) are not arrows. Layers, bottom to top, each
importing only its own and lower layers:

- contract: pure definitions (statistics columns, options, argument checks, float64 references);
- kernels: the Triton kernels and their launchers (``kdkernels/kernels/*``);
- ops: the backends, the registered ops and the row helpers;
- paths: layouts of the vocabulary (vocabulary-parallel slices, DTensor);
- api: the public functions and modules, the package and its integrations (``kdkernels/integrations/*``).

A new module fails :func:`test_every_module_is_placed` until it is given a layer in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdkernels"
CONTRACT, KERNELS, OPS, PATHS, API = range(5)
LAYER_NAMES = ("contract", "kernels", "ops", "paths", "api")

LAYERS = {
    # contract: import only contract modules
    "kdkernels.torch_ops": CONTRACT,  # the package: a docstring
    "kdkernels.torch_ops.layout": CONTRACT,
    "kdkernels.torch_ops.options": CONTRACT,
    "kdkernels.torch_ops.validate": CONTRACT,
    "kdkernels.torch_ops.reference": CONTRACT,
    "kdkernels.torch_ops.sparse_reference": CONTRACT,
    # kernels: every module under kdkernels/kernels (see PACKAGE_LAYERS)
    # ops: backends, registered ops, row helpers
    "kdkernels.torch_ops.torch_backend": OPS,
    "kdkernels.torch_ops.akl_select": OPS,
    "kdkernels.torch_ops.op": OPS,
    "kdkernels.torch_ops.sparse_ops": OPS,
    "kdkernels.torch_ops.rows": OPS,
    # paths: layouts of the vocabulary
    "kdkernels.torch_ops.vocab_parallel": PATHS,
    "kdkernels.torch_ops.dtensor": PATHS,
    # api: anything below, and each other without a cycle
    "kdkernels": API,
    "kdkernels.torch_ops.functional": API,
    "kdkernels.torch_ops.modules": API,
    "kdkernels.torch_ops.fused_linear": API,
    "kdkernels.torch_ops.sparse": API,
}
# Every module of these packages (the package itself included) has the package's layer.
PACKAGE_LAYERS = {"kdkernels.kernels": KERNELS, "kdkernels.integrations": API}
PLANNED = {"kdkernels.torch_ops.dtensor"}  # placed before they exist (dtensor.py: being written)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    for package, package_layer in PACKAGE_LAYERS.items():
        if module == package or module.startswith(package + "."):
            return package_layer
    return None


def _known(name: str) -> str | None:
    """``name`` if it is a module of the package, else its longest prefix that is (None outside the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module in ``module``, at any depth."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per further dot
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "kdkernels" or target.startswith("kdkernels."):
                resolved = _known(target)
                assert resolved is not None, f"{path}:{node.lineno} imports {target}, which is not in the package"
                if resolved != module:
                    found.append((resolved, node.lineno))
    return found


def graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over the package."""
    edges = {}
    for module in MODULES:
        out = edges.setdefault(module, {})
        for target, line in imports(module):
            out.setdefault(target, line)
    return edges


def _site(edges, a: str, b: str) -> str:
    return f"{a} -> {b} ({MODULES[a].relative_to(PACKAGE.parent)}:{edges[a][b]})"


def cycles(edges: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """``(modules, cycle)`` per strongly connected component of more than one module (Tarjan): its modules and one
    cycle ``[a, b, ..., a]`` through them."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    found = []
    for component in components:  # the shortest way back to the component's first module, breadth first
        start = min(component)
        parent, queue = {start: None}, [start]
        while queue:
            v = queue.pop(0)
            nxt = sorted(w for w in edges[v] if w in component)
            if start in nxt:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                found.append((sorted(component), [*reversed(path), start]))
                break
            for w in nxt:
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return found


def test_every_module_is_placed():
    unplaced = sorted(module for module in MODULES if layer(module) is None)
    assert not unplaced, f"give these modules a layer in tests/test_imports.py's LAYERS: {unplaced}"
    stale = sorted(module for module in LAYERS if module not in MODULES and module not in PLANNED)
    assert not stale, f"LAYERS names modules that do not exist (renamed? add them to PLANNED if to come): {stale}"


def test_the_graph_sees_lazy_and_module_imports():
    """The resolver finds what the tests below rely on: a top-level ``from package import module``, a
    ``from module import name`` and an import inside a function."""
    edges = graph()
    assert "kdkernels.torch_ops.layout" in edges["kdkernels.kernels.sparse"]
    assert "kdkernels.torch_ops.sparse_ops" in edges["kdkernels.torch_ops.sparse"]
    assert "kdkernels.kernels.sparse" in edges["kdkernels.torch_ops.sparse_ops"]  # inside _stats_fn
    assert "kdkernels.torch_ops.vocab_parallel" in edges["kdkernels.torch_ops.sparse"]  # inside sparse_kd_loss


def test_no_import_cycle():
    edges = graph()
    found = cycles(edges)
    report = "\n".join(f"among {modules}, e.g. " + " ; ".join(_site(edges, a, b) for a, b in zip(cycle, cycle[1:]))
                       for modules, cycle in found)
    assert not found, f"import cycles:\n{report}"


def test_imports_point_down_the_layers():
    edges = graph()
    upward = [f"{_site(edges, a, b)}: {LAYER_NAMES[layer(a)]} imports {LAYER_NAMES[layer(b)]}"
              for a in sorted(edges) for b in sorted(edges[a])
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("target", ["rows", "sparse_ops", "layout", "options", "op", "torch_backend", "akl_select",
                                    "reference"])
def test_a_path_may_import_the_ops_and_contract(target):
    """What ``vocab_parallel.py`` (and a DTensor path) import is below it."""
    assert layer(f"kdkernels.torch_ops.{target}") <= layer("kdkernels.torch_ops.vocab_parallel")
