"""Imports of the project's own modules inside functions are only there to keep start-up light,
and each says so: a comment on its first line, or on the line above its run of imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("appliance", "rag", "security", "monitoring", "installer", "appliance_dev")


def _is_own(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.ImportFrom):
        return stmt.level > 0 or (stmt.module or "").split(".")[0] in PACKAGES
    if isinstance(stmt, ast.Import):
        return any(alias.name.split(".")[0] in PACKAGES for alias in stmt.names)
    return False


def unexplained_imports(path: Path) -> list[int]:
    """Lines of imports of project modules inside functions that no comment explains."""
    lines = path.read_text().splitlines()
    bad = []
    for func in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for block in ast.walk(func):
            body = getattr(block, "body", None)
            if not isinstance(body, list) or (block is not func and isinstance(block, type(func))):
                continue
            run_start = None  # the first line of the current run of imports
            for stmt in body:
                if not isinstance(stmt, ast.Import | ast.ImportFrom):
                    run_start = None
                    continue
                run_start = run_start or stmt.lineno
                if not _is_own(stmt):
                    continue
                own_line = "#" in lines[stmt.lineno - 1]
                above = lines[run_start - 2].strip().startswith("#")
                if not (own_line or above):
                    bad.append(stmt.lineno)
    return sorted(set(bad))


def test_every_import_inside_a_function_says_why():
    unexplained = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in unexplained_imports(path)
    ]
    assert not unexplained, "\n".join(unexplained)
