"""The layers of DESIGN.md hold, also for imports by name that no static analysis sees.

``lint-imports`` (``make lint``) checks the import statements against the contract in
``pyproject.toml``. A module can still be loaded by a string (``importlib.import_module
("exporters.serve")``, as the core once did for every command), so this test also reads every
string in each library's code and fails on one that names a package the library must not load.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What each library must not load, statically or by name.
FORBIDDEN = {
    "telemetry": ("inference", "exporters", "dashboards", "wantel"),
    "inference": ("exporters", "dashboards", "wantel"),
    "exporters": ("inference", "dashboards", "wantel"),
    "dashboards": ("inference", "exporters", "wantel"),
}


def _module_names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every module an import statement names, and every string in code (not a docstring)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and _loads_by_name(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and "." in node.value and id(node) not in docstrings):
            yield node.lineno, node.value  # a dotted name, wherever it is passed


def _loads_by_name(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in {"import_module", "__import__", "find_spec"}


def _is_module(name: str) -> bool:
    """Whether ``name`` is one of the project's modules (a logger named ``wantel.engine`` is
    only a name)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in _module_names(tree):
            if name.split(".", 1)[0] in FORBIDDEN[package] and _is_module(name):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_loads_no_package_above_or_beside_it(package: str) -> None:
    """No library imports, or names for loading, a package its layer must not depend on."""
    assert [] == _violations(package)


def test_the_check_sees_a_load_by_name() -> None:
    """A string naming a forbidden module is caught: the check can fail."""
    tree = ast.parse('import importlib\nimportlib.import_module("exporters.server")\n'
                     'name = "wantel.cli"\n')
    names = list(_module_names(tree))
    assert (2, "exporters.server") in names
    assert (3, "wantel.cli") in names
    assert _is_module("wantel.cli")
    assert not _is_module("wantel.engine")  # a logger's name, not a module
