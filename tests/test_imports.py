"""Import layering: every module of the package imports first in a fresh interpreter, and no two
subpackages import each other (directly, or around a cycle through other modules), whatever the import
style (module-level, function-local or ``TYPE_CHECKING`` imports all count)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "modeconn"
MODULES = sorted(
    ".".join(("modeconn", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    for p in ROOT.rglob("*.py"))


# Each module is imported first with no modeconn module loaded (all of them dropped from sys.modules in
# between), in one interpreter: an import cycle inside modeconn fails exactly as in a fresh interpreter,
# while torch, scipy and hydra are imported once instead of once per module.
_IMPORT_EACH_FIRST = """
import importlib, json, sys, traceback
import torch, scipy.optimize, omegaconf, hydra  # third-party imports once; they cannot hide a cycle in modeconn
errors = {}
for module in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "modeconn" or m.startswith("modeconn.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except BaseException:
        errors[module] = traceback.format_exc()[-2000:]
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *MODULES], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first_in_a_fresh_interpreter(module, import_errors):
    assert module not in import_errors, import_errors.get(module)


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to: ``modeconn.paths.noise`` -> ``paths``."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(path: Path, module: str) -> set[str]:
    """Every ``modeconn`` module a file imports, anywhere in it (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "modeconn" or m.startswith("modeconn.")}


def part_graph() -> dict[str, set[str]]:
    """Top-level part -> the other parts it imports (subpackages and top-level modules alike)."""
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    graph: dict[str, set[str]] = {p: set() for p in parts}
    for path in ROOT.rglob("*.py"):
        module = ".".join(("modeconn", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        src = _part(module)
        for target in _imports(path, module):
            dst = _part(target)
            if src in graph and dst in parts and dst != src:
                graph[src].add(dst)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _subpackage_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles that pass through a subpackage (a cycle of top-level modules only is not this test's)."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    return [c for c in _cycles(graph) if packages & set(c)]


def test_no_import_cycle_between_subpackages():
    graph = part_graph()
    assert {"paths", "stability", "kuditipudi"} <= set(graph)
    cycles = _subpackage_cycles(graph)
    assert cycles == [], {p: sorted(graph[p]) for c in cycles for p in c}


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
