"""The package's structure: every module imports first in a fresh interpreter; no import cycle between any
two modules (module-level, function-local and ``TYPE_CHECKING`` imports all count); every import follows
the stage layer rule of docs/architecture.md (a module imports its own folder or a lower stage, never a
higher one or a sibling of the same rank); no module over 400 lines and no function over 120."""
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


#: stage folder -> rank; a module may import its own folder and folders of a strictly lower rank
#: (docs/architecture.md draws the same table)
LAYERS = {
    "io": 0,
    "data": 1, "models": 1, "units": 1,
    "params": 2,
    "training": 3, "evaluation": 3, "align": 3,
    "kuditipudi": 4,
    "paths": 5,
    "stability": 6,
    "reporting": 7,
    "landscape": 8,
    "run": 9,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 120


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(("modeconn", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modeconn modules a file imports, anywhere in it: ``from a.b import c`` is ``a.b.c`` when that is a
    module, else ``a.b`` (an import runs the named module, not its parents' ``__init__`` re-exports)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != module}


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: imports_of(p, m, set(files)) for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def _folder(module: str) -> str:
    """The stage folder of a module: ``modeconn.paths.noise`` -> ``paths``; a top-level module is its own."""
    return module.split(".")[1] if "." in module else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up or sideways in the stage layout, and top-level modules outside any stage."""
    bad = []
    for src, targets in graph.items():
        a = _folder(src)
        if src != "modeconn" and a not in LAYERS:
            bad.append(f"{src} is in no stage folder")
            continue
        for dst in targets:
            b = _folder(dst)
            if dst == "modeconn" or a == b or src == "modeconn":
                continue
            if b not in LAYERS or LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} ({a}, rank {LAYERS[a]}) imports {dst} ({b}, rank {LAYERS.get(b)})")
    return sorted(bad)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (and methods) longer than ``limit`` lines, decorators and docstring included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - start + 1 > limit:
                out.append(f"{path}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    return out


def test_no_import_cycle_between_any_two_modules():
    graph = module_graph()
    assert {"modeconn.paths.curves", "modeconn.units.infer", "modeconn.data.dataset"} <= set(graph)
    cycles = _cycles(graph)
    assert cycles == [], {m: sorted(graph[m] & set(c)) for c in cycles for m in c}


def test_every_import_follows_the_layer_rule():
    assert layer_violations(module_graph()) == []


def test_stage_folders_are_the_layer_table():
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders <= set(LAYERS), folders - set(LAYERS)
    assert [p.name for p in ROOT.glob("*.py")] == ["__init__.py"]


def test_small_modules_and_functions():
    big = [f"{p.relative_to(ROOT.parent)} ({n} lines)" for p in sorted(ROOT.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert big == []
    assert [f for p in sorted(ROOT.rglob("*.py")) for f in long_functions(p)] == []


def test_the_checks_find_what_they_look_for(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert layer_violations({"modeconn.data.x": {"modeconn.paths.y"}, "modeconn.paths.y": {"modeconn.data.x"},
                             "modeconn.training.a": {"modeconn.evaluation.b"}, "modeconn.evaluation.b": set()}) == [
        "modeconn.data.x (data, rank 1) imports modeconn.paths.y (paths, rank 5)",
        "modeconn.training.a (training, rank 3) imports modeconn.evaluation.b (evaluation, rank 3)"]
    pkg = tmp_path / "modeconn"
    (pkg / "units").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "units" / "__init__.py").write_text("from modeconn.units.infer import infer\n")
    (pkg / "units" / "infer.py").write_text("from modeconn.units import groups\ndef infer():\n    pass\n")
    (pkg / "units" / "groups.py").write_text("def fail():\n    from modeconn.units.infer import infer\n")
    assert _cycles(module_graph(pkg)) == [["modeconn.units.groups", "modeconn.units.infer"]]
    (pkg / "units" / "long.py").write_text("def f():\n" + "    x = 1\n" * 130)
    assert len(long_functions(pkg / "units" / "long.py")) == 1


def test_the_public_short_names_still_import():
    done = subprocess.run([sys.executable, "-c", (
        "import sys, modeconn\n"
        "assert 'torch' not in sys.modules  # import modeconn stays cheap\n"
        "from modeconn import align, data, evaluate, models, paths, plots, stability, train, units\n"
        "assert evaluate.evaluate_path and train.train and train.TrainConfig and plots.plot_paths\n"
        "assert paths.linear and paths.fit_curve and data.load and units.infer and align.weight_matching\n"
        "assert modeconn.evaluate is evaluate and modeconn.train is train\n")], capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
