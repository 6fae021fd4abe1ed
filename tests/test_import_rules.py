"""The module boundaries of DESIGN.md, enforced: ncp never imports the store, the UI or the loop; the store never
imports torch, gradio or ncp; jobs never import gradio."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ncp": {"duckdb", "gradio", "feedback_store", "jobs", "app"},
    "feedback_store": {"torch", "gradio", "ncp", "jobs", "app", "diffusers", "transformers", "peft", "accelerate"},
    "jobs": {"gradio", "app"},
}


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
