"""The shape of the code: library below orchestration, no import cycle, small files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("embeddings", "pipeline")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports, at module level or inside a function (a
    deferred import still ties the two modules in a circle)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def test_embeddings_imports_without_pipeline() -> None:
    code = ("import sys, embeddings, embeddings.store, embeddings.heads, embeddings.encoders, "
            "embeddings.encode, embeddings.index, embeddings.ingest\n"
            "bad = [m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_no_upward_import_and_no_cycle() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if m.startswith("embeddings") and t.startswith("pipeline")]
    assert not upward
    # A package's __init__ importing its own submodules is how registries fill; a cycle is
    # a submodule importing back a module that (transitively) imports it.
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if m.startswith(t + ".") and modules[t].name == "__init__.py":
                continue  # a submodule reaching its parent package: resolved via siblings
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t):], t] if t in stack else [m, t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_files_stay_small() -> None:
    big = {str(p.relative_to(REPO)): n for p in _modules().values()
           if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big


def test_faiss_stays_behind_the_index_package() -> None:
    """No stage imports FAISS (a second backend would touch one folder): only
    ``embeddings/index/`` does, at module level or inside a function."""
    leaks = []
    for name, path in _modules().items():
        if name.startswith("embeddings.index"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            leaks += [(name, n) for n in names if n == "faiss" or n.startswith("faiss.")]
    assert not leaks, leaks


def test_importing_the_index_package_costs_no_faiss() -> None:
    """The policy is plain Python; FAISS loads on first use (fast ``--help``)."""
    code = ("import sys\nfrom embeddings import index as ix\n"
            "ix.choose_index(10**6, 512, 2**32)\nassert 'faiss' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
