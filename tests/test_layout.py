"""The package's shape as docs/design.md describes it: small files, short functions, few modules
at the top (its layers are import-linter's, in `make test`)."""

import ast
from pathlib import Path

import vitscale

PACKAGE = Path(vitscale.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_no_function_is_over_80_lines():
    long = [f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for p in MODULES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long


def test_at_most_twelve_modules_sit_at_the_top():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top
