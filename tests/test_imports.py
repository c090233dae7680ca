"""The package's import structure: no cycle among qkvlab modules, and every module imports alone.

The graph counts the imports that run when a module is imported: module level, class bodies
and ``try`` / ``if`` blocks, not function bodies (they run later) nor ``if TYPE_CHECKING:``
blocks (they never run). Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so an
import is an edge to those packages too, except to the importing module's own packages (they
are always initialised first). A cycle in this graph is what makes an import order fail with
"partially initialized module".
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "qkvlab"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(body: list[ast.stmt], *, deferred: bool = False):
    """The import statements among ``body`` that run when the module is imported; with
    ``deferred`` also those in function bodies, which run when the function is called."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_statements(node.body, deferred=deferred)
            yield from _import_statements(node.orelse, deferred=deferred)
        elif isinstance(node, ast.ClassDef | ast.With) or (
            deferred and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.For | ast.While)
        ):
            yield from _import_statements(node.body, deferred=deferred)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _import_statements(block, deferred=deferred)


def _with_packages(target: str, importer: str) -> set[str]:
    """``target`` and the packages above it that importing it runs (not the importer's own)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    return chain - own - {importer}


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """qkvlab module -> the qkvlab modules its import runs (see the module docstring); with
    ``deferred`` also those its functions import when called."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_statements(ast.parse(path.read_text(encoding="utf-8")).body, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] == PACKAGE:
                    edges |= {m for m in _with_packages(target, name) if m in modules}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_and_cycles():
    """The checker itself: it finds the edges it should and reports a cycle it is shown."""
    graph = import_graph()
    assert "qkvlab.train.batches" in graph["qkvlab.tasks.lm"]
    assert "qkvlab.train" in graph["qkvlab.tasks.lm"]  # the package the import runs first
    assert "qkvlab.study.spec" in graph["qkvlab.study.report"]
    assert "qkvlab.train.trainer" not in graph["qkvlab.train"]  # imported on first use only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_qkvlab_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("packages", [("qkvlab.study",), ("qkvlab.tasks", "qkvlab.train")])
def test_layers_stay_one_way_even_through_deferred_imports(packages):
    """The config above the tasks and the trainer above both; the sweep file, metrics and the
    paper's numbers below the sweep and the report: no cycle even through function-level imports."""

    def inside(module: str) -> bool:
        return module.startswith(packages)

    graph = {m: {n for n in edges if inside(n)} for m, edges in import_graph(deferred=True).items() if inside(m)}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_task_classes_do_not_import_the_trainer():
    """The registry imports a task class by name when the config is checked or the trainer builds
    it, so no task module may need the trainer (or the registry would close a loop through it)."""
    from qkvlab.tasks import TASKS

    graph = {m: {n for n in e if n.startswith(("qkvlab.tasks", "qkvlab.train"))} for m, e in import_graph().items()}
    for target in TASKS.values():
        seen, todo = set(), [target.partition(":")[0]]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        assert "qkvlab.train.trainer" not in seen, f"{target} imports the trainer"


def third_party_imports() -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import-time import of another package."""
    out = []
    for path in module_files().values():
        for node in _import_statements(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                out += [(a.name, []) for a in node.names if a.name.split(".")[0] != PACKAGE]
            elif not node.level and node.module and node.module.split(".")[0] != PACKAGE:
                out.append((node.module, [a.name for a in node.names]))
    return out


#: Loads the third-party packages once, then imports each module in a forked child, the first
#: qkvlab module that child imports. A module whose optional dependency is missing passes.
_IMPORT_EACH = """
import importlib, json, os, sys
names, third_party = json.loads(sys.argv[1])
for module, attrs in third_party:
    try:
        loaded = importlib.import_module(module)
        for attr in attrs:
            getattr(loaded, attr, None)
    except Exception:
        pass
assert not any(m == "qkvlab" or m.startswith("qkvlab.") for m in sys.modules), "qkvlab loaded early"
failed, running = [], {}
for name in [*names, None]:
    while running and (name is None or len(running) >= (os.cpu_count() or 1)):
        pid, status = os.wait()
        if os.waitstatus_to_exitcode(status):
            failed.append(running[pid])
        del running[pid]
    if name is None:
        break
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "qkvlab").startswith("qkvlab"):
                print(f"{name}: {e!r}", flush=True)
                os._exit(1)
        except BaseException as e:
            print(f"{name}: {e!r}", flush=True)
            os._exit(1)
        os._exit(0)
    running[pid] = name
print("FAILED", json.dumps(sorted(failed)))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, with no qkvlab module loaded before it: what a user's first
    ``import`` does, and where an import cycle fails with "partially initialized module"."""
    names = [n for n in module_files() if not n.endswith("__main__")]  # those run the command line
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps([names, third_party_imports()])],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("FAILED []"), proc.stdout[-3000:]
