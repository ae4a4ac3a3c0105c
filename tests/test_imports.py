"""The shape of the library: imret's import graph has no cycle and never reaches up into the launchers.

Every ``import`` counts, including those inside functions (a late import hides a cycle
at run time, not from the reader), and so does every ``"imret.module:function"``
string a registry resolves later (losses, cluster methods, pipeline stages).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imret"
TARGET_STRING = re.compile(r"^(imret(?:\.\w+)+)(?::\w+)?$")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, modules: set[str]) -> tuple[set[str], set[str]]:
    """(imret modules, other top-level packages) that a module's code names, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET_STRING.match(node.value):
            found.add(TARGET_STRING.match(node.value).group(1))
    return {name for name in found if name in modules}, {name.split(".")[0] for name in found}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, tops = {}, {}
    for name, path in files.items():
        inner, outer = imported(ast.parse(path.read_text()), set(files))
        edges[name], tops[name] = inner - {name}, outer
    return edges, tops


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each is a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from imret.x import y\nT = 'imret.z:fn'\n")
    assert imported(tree, {"imret.x", "imret.z", "imret.w"})[0] == {"imret.x", "imret.z"}


def test_imret_has_no_import_cycle():
    edges, _ = import_graph()
    assert len(edges) > 40  # the walk saw the whole package
    assert strongly_connected(edges) == []


def test_the_config_is_the_ground_floor():
    edges, _ = import_graph()
    config = {m for m in edges if m == "imret.config" or m.startswith("imret.config.")}
    assert config
    for module in config:
        assert edges[module] <= config, f"{module} imports {sorted(edges[module] - config)}"


def test_the_library_never_imports_the_launchers():
    _, tops = import_graph()
    for module, names in tops.items():
        assert not names & {"launch", "slurm", "tools", "bench", "submitit"}, f"{module} imports {names}"


def test_no_module_is_too_long_without_saying_why():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one concern" in doc, f"{path.relative_to(ROOT)} has {lines} lines and no reason given"
