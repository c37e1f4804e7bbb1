"""The layout holds: read from the source (AST), nothing is imported or run.

No import cycle between modules of ``src/diffprune`` (function-level imports count), no import from ``adapters/``
into the layers above it (io, prune, train, sampling, ...), hashlib only in ``_hashing``, no function over 60 lines
(the CLI's ``add_parser`` flag tables exempt), no file over 500 lines, and the adapter looked up again outside
``adapters/`` in at most a few public entry points. ``DIFFPRUNE_SRC`` points the check at another tree (that is how
it was seen to fail on the tree before the redesign)."""
import ast
import os
from pathlib import Path

import pytest

SRC = Path(os.environ.get("DIFFPRUNE_SRC", Path(__file__).resolve().parents[1] / "src"))
PKG = SRC / "diffprune"
MAX_FUNCTION_LINES, MAX_FILE_LINES, MAX_ADAPTER_LOOKUPS = 60, 500, 8
# what adapters/ may import from the rest of diffprune: the ground it stands on
ADAPTER_GROUND = {"diffprune.errors", "diffprune.registry", "diffprune._torch", "diffprune._hashing"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The diffprune modules ``name`` imports, anywhere in the file (a package's own submodules excluded)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t != "diffprune" and not (is_pkg and t.startswith(name + ".")) \
                    and not name.startswith(t + "."):
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


def test_adapters_import_only_the_ground():
    bad = {name: sorted(t for t in targets if not t.startswith("diffprune.adapters") and t not in ADAPTER_GROUND)
           for name, targets in GRAPH.items() if name.startswith("diffprune.adapters")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_only_the_hashing_module_hashes():
    assert [n for n, p in MODULES.items() if "hashlib" in p.read_text(encoding="utf-8")] == ["diffprune._hashing"]


def test_functions_and_files_are_short():
    long_functions, long_files = [], []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "add_parser":
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", n))
    assert (long_functions, long_files) == ([], [])


def test_the_adapter_is_handed_down():
    lookups = {n: p.read_text(encoding="utf-8").count("adapter_for(") for n, p in MODULES.items()
               if not n.startswith("diffprune.adapters")}
    assert sum(lookups.values()) <= MAX_ADAPTER_LOOKUPS, {n: c for n, c in lookups.items() if c}


@pytest.mark.parametrize("module", ["diffprune.layout", "diffprune._cache", "diffprune._fs", "diffprune.assets"])
def test_ground_modules_import_no_verb(module):
    verbs = {"diffprune.prune", "diffprune.train", "diffprune.evaluate", "diffprune.sampling", "diffprune.pipeline",
             "diffprune.io", "diffprune.cli"}
    assert {t for t in GRAPH[module] if any(t == v or t.startswith(v + ".") for v in verbs)} == set()
