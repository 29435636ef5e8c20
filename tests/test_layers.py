"""The package's layout stays honest: imports only go down the journey's layers, never in a circle.

Read from the source with `ast` (every import, also the ones inside functions, which the code uses
to keep start-up fast); nothing is imported. `if TYPE_CHECKING:` blocks count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraplan"

# Bottom to top. A module may import its own layer's modules (without a cycle) and any layer below.
LAYERS = [
    ("errors", "files", "hub"),  # one-line errors; writing files atomically; Hub look-ups offline
    ("data",),            # rows, formats, tokenization, batches
    ("autograd",),        # memory-lean loss and saved tensors (torch only)
    ("model",),           # built-in shapes, loading, structure, roles, targets, inspect
    ("plan",),            # LoraPlan, count, memory, recommend, config files read and written
    ("adapter",),         # adapter files, analyze, compress, merge
    ("probing",),         # the probe
    ("sweeps",),          # spec, engine, runner, folder, ranking, report, plots, planted tasks, demo
    ("diagnosis",),       # reads runs and sweep folders
    ("cli",),             # the command line, a thin layer over all of the above
]
FACADE = "loraplan"  # __init__: the lazy public API, above everything


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x when there is one
            candidates = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(candidates or [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t == FACADE or t.startswith(FACADE + ".")}


def _layer(module: str) -> int:
    if module == FACADE:
        return len(LAYERS)
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        _layer(module)


def test_imports_only_go_down(graph):
    upward = [f"{m} (layer {LAYERS[_layer(m)][0]}) imports {t} (layer {_layer_name(t)})"
              for m, targets in graph.items() for t in targets
              if t in graph and _layer(t) > _layer(m)]
    assert not upward, "imports that go up the layers:\n" + "\n".join(sorted(upward))


def _layer_name(module: str) -> str:
    i = _layer(module)
    return "the facade" if i == len(LAYERS) else LAYERS[i][0]


def test_no_import_cycles(graph):
    edges = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    # a package's __init__ is imported by every import of its modules: leave those edges out
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above would fail on an upward import and on a cycle (a check that can fail)."""
    graph = {"loraplan.model.a": {"loraplan.sweeps.b"}, "loraplan.sweeps.b": set()}
    assert any(_layer(t) > _layer(m) for m, ts in graph.items() for t in ts)
    (tmp_path / "x.py").write_text("from .y import f\nfrom ..model import targets\n")
    found = _imports("loraplan.plan.x", tmp_path / "x.py", {"loraplan.model.targets"})
    assert found == {"loraplan.plan.y", "loraplan.model.targets"}


def test_test_modules_do_not_import_each_other():
    """Shared test helpers live in tests/support (exposed by conftest), never in a test module."""
    tests = Path(__file__).resolve().parent
    local = {p.stem for p in tests.glob("*.py")} | {p.name for p in tests.iterdir() if p.is_dir()}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in local or top == "support", f"{path.name} imports {name}"
