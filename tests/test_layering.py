"""One-way layering: core (models, tokenizer, preprocess, checkpoint I/O) -> data -> losses ->
evaluate -> train -> launch -> cli. Imports point only down that order, and nothing imports in
circles, so the model library can be used (and read) without the trainer behind it."""

from __future__ import annotations

import ast
import subprocess
import sys

import grimp
from importlinter import cli as importlinter_cli

from conftest import REPO

PACKAGE = REPO / "rsclip_jax"


def test_layers_contract_in_pyproject_holds():
    assert importlinter_cli.lint_imports(config_filename=str(REPO / "pyproject.toml")) == 0


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), each one an import cycle."""
    modules = sorted(graph.modules)
    edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles_between_modules():
    # grimp sees imports inside functions too, so a cycle cannot hide behind a lazy import.
    assert _cycles(grimp.build_graph("rsclip_jax")) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_model_library_imports_no_higher_layer():
    code = ("import sys, rsclip_jax.models, rsclip_jax.checkpoint, rsclip_jax.tokenizer, rsclip_jax.preprocess; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('rsclip_jax.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    loaded = set(eval(out))
    assert not loaded & {"data", "losses", "evaluate", "train", "apps", "launch", "cli"}, loaded


def _function_imports(path) -> list[tuple[int, str, str]]:
    """(line, imported module, the line and the one above it) of each import inside a function."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                context = "\n".join(lines[max(0, node.lineno - 2): node.lineno])
                found.append((node.lineno, module or "", context))
    return found


def test_imports_inside_functions_are_only_commented_optional_dependencies():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, module, context in _function_imports(path):
            # Cycles and upward imports are caught above even when lazy; what remains is deferring
            # a heavy optional dependency (e.g. tensorflow_datasets), which must say so.
            if "#" not in context:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {module} inside a function without a "
                           "comment saying why (import it at the top unless it is a heavy optional dependency)")
    assert bad == [], "\n".join(bad)
