"""The layout rules: small units, small folders, test modules that stand alone."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 120
MAX_MODULES_PER_FOLDER = 10


def _sources(folder: Path) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(folder.rglob("*.py"))]


def _is_declaration(node: ast.ClassDef) -> bool:
    """A class of field declarations only (no methods): data, not code."""
    return not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)


def test_functions_and_classes_are_small():
    too_long = []
    for path, tree in _sources(ROOT / "src"):
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES \
                    and not _is_declaration(node):
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not too_long


def test_no_folder_holds_more_than_ten_modules():
    folders = {p.parent for p in (ROOT / "src").rglob("*.py")}
    crowded = {str(f.relative_to(ROOT)): n for f in folders
               if (n := len(list(f.glob("*.py")))) > MAX_MODULES_PER_FOLDER}
    assert not crowded


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    imports = []
    for path, tree in _sources(ROOT / "tests"):
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.name} imports {n}" for n in names if n.split(".")[0] in tests]
    assert not imports


def test_the_checks_see_what_they_check():
    """Guards against a check that passes by reading nothing."""
    sources = _sources(ROOT / "src")
    assert len(sources) > 40
    assert any(p.name == "validate.py" for p, _ in sources)
    long_example = ast.parse("def f():\n" + "    x = 1\n" * 60)
    node = long_example.body[0]
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
