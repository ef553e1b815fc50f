"""The package's shape, checked from its source: no import cycle, weights read only through the stores, short
functions in the driver and the stores, one atomic-write helper and no umask changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "optimum_admm"


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return trees


def _imports(name: str, tree: ast.Module, known: set[str], is_package: bool) -> set[str]:
    """Every module of the package that ``name`` imports, at module level or inside a function."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _is_lazy_export_table(name: str, module: str) -> bool:
    """The package ``__init__`` imports its public names on first use; every module imports the package itself
    as the parent of its own name, which is no dependency."""
    return module == "optimum_admm"


def test_no_import_cycle_inside_the_package():
    trees = _modules()
    known = set(trees)
    packages = {n for n in trees if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").is_file()}
    graph = {
        name: {m for m in _imports(name, tree, known, name in packages) if not _is_lazy_export_table(name, m)}
        for name, tree in trees.items()
    }
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]
    assert "optimum_admm.registry" in graph["optimum_admm.sequential"]  # the graph is real


#: Where a module's ``.weight`` may be read directly, and why.
WEIGHT_ACCESS_ALLOWED = {
    "optimum_admm/stores.py": "the stores themselves",
    "optimum_admm/offload.py": "the offloaded store's accelerate weights-map reads and writes",
    "optimum_admm/streaming.py": "the checkpoint store swaps the embedding weight for the capture's compact rows",
    "optimum_admm/modeling.py": "get/set_weight_matrix, called on modules a store holds",
}
WEIGHT_ACCESS_IN_FUNCTIONS = {
    ("optimum_admm/structured/gating.py", "_norm_hook"): "inside the module's own forward: its weights are present",
}


def _functions_with_weight_access(tree: ast.Module):
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            attribute = isinstance(node, ast.Attribute) and node.attr == "weight"
            by_name = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "setattr"}  # hasattr asks, it reads no value
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "weight"
            )
            if attribute or by_name:
                yield func.name, node.lineno


def test_no_direct_weight_access_outside_the_stores():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative in WEIGHT_ACCESS_ALLOWED:
            continue
        for function, line in _functions_with_weight_access(ast.parse(path.read_text(encoding="utf-8"))):
            if (relative, function) not in WEIGHT_ACCESS_IN_FUNCTIONS:
                offenders.append(f"{relative}:{line} in {function}()")
    assert not offenders, "read weights through optimum_admm.stores (or get_weight_matrix on a held module): " + str(
        offenders
    )


def test_the_weight_access_check_catches_an_access():
    tree = ast.parse("def f(module):\n    return module.weight.sum() + getattr(module, 'weight').sum()\n")
    assert [name for name, _ in _functions_with_weight_access(tree)] == ["f", "f"]


@pytest.mark.parametrize("relative", ["sequential.py", "stores.py", "streaming.py", "files.py", "resume.py"])
def test_functions_of_the_driver_and_the_stores_are_short(relative):
    tree = ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
    long = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            body = node.body[1:] if ast.get_docstring(node) else node.body  # the docstring is documentation
            if not body:
                continue
            length = body[-1].end_lineno - body[0].lineno + 1
            if length > 60:
                long.append(f"{node.name}: {length} lines")
    assert not long


def test_one_atomic_write_helper_and_no_umask_changes():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "umask":
                offenders.append(f"{relative}:{node.lineno} os.umask")
            renames = isinstance(node, ast.Attribute) and node.attr == "replace" and ast.unparse(node.value) == "os"
            if renames and relative != "optimum_admm/files.py":
                offenders.append(f"{relative}:{node.lineno} os.replace (use optimum_admm.files.atomic_write)")
            scratch = isinstance(node, ast.Attribute) and node.attr in {"mkstemp", "mkdtemp"}
            if scratch and relative != "optimum_admm/activations.py":  # unlinked scratch files, never an output
                offenders.append(f"{relative}:{node.lineno} tempfile.{node.attr}")
    assert not offenders
