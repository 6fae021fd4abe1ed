"""The module boundaries of DESIGN.md, enforced: ncp never imports the store, the UI (app.py, ui/) or the loop; the
store never imports torch, gradio or ncp; jobs never import gradio or the UI; and no two modules of the project
import each other, directly or through others (an import cycle).

What counts as an import, for both rules: every `import` statement in a file, wherever it stands: at module level,
inside a function, or under `if TYPE_CHECKING:`. A function-level or type-only import still means the two modules
need each other (the circles this rule removed hid behind TYPE_CHECKING), so the cycle rule reads them all. A shared
type or setting that two modules need goes into a module of its own (`ncp/train_config.py`, `jobs/loop_config.py`).
The cycle rule covers the product and its benchmarks (app.py, ui/, ncp/, jobs/, feedback_store/, bench/, scripts/).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ncp": {"duckdb", "gradio", "feedback_store", "jobs", "app", "ui"},
    "feedback_store": {"torch", "gradio", "ncp", "jobs", "app", "ui", "diffusers", "transformers", "peft"}
    | {"accelerate"},
    "jobs": {"gradio", "app", "ui"},
}
PROJECT = ("app.py", "ui", "ncp", "jobs", "feedback_store", "bench", "scripts")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rules(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    violations = [
        f"{f.relative_to(ROOT)} imports {bad}" for f in files for bad in imported_roots(f) & FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)


def test_checker_detects_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import duckdb\nfrom gradio import Blocks\n")
    assert imported_roots(bad) == {"duckdb", "gradio"}


# ------------------------------------------------------------------------------------------------ import cycles


def module_files(root: Path, tops: tuple[str, ...] = PROJECT) -> dict[str, Path]:
    """Dotted module name -> file, for the project's Python files under `root`."""
    files: dict[str, Path] = {}
    for top in tops:
        path = root / top
        for f in [path] if path.is_file() else sorted(path.rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = f
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import name` is an edge to `pkg.name` when that is a
    module, else to `pkg`); relative imports are resolved against the importing module's package."""

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in files:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph(module_files(ROOT))
    read = {"ncp.trainer", "jobs.loop", "feedback_store", "ui.arena"}
    assert read <= set(graph), "the module map did not read the project"
    found = cycles(graph)
    assert not found, "import cycles (move what both sides need into a module of its own):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_cycle_checker_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
