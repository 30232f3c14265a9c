"""The tests' own layering: shared code lives in helper modules, shared fixtures in the plugins.

A test module (``test_*.py``) or a ``conftest.py`` imported by another module couples two test files
by their side effects: importing one collects its tests' module state (and fixtures, under the
importer's name) into the other, and moving or renaming a test breaks an unrelated one. Helpers go
in modules under ``tests/`` that are not tests (``tests/commands.py``, ``tests/town.py``, ...);
fixtures used by more than one directory go in ``tests/plugins/*.py``, registered once in
``tests/conftest.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _is_test_file(module: str) -> bool:
    """Whether the dotted ``module`` names a test module or a conftest (its last part decides)."""
    last = module.rpartition(".")[2]
    return last.startswith("test_") or last == "conftest"


def forbidden_imports(source: str, package: str) -> list[tuple[int, str]]:
    """The imports in ``source`` (a module of ``package``, e.g. ``tests.cli``) of a test module or a
    conftest, as ``(line, module)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if _is_test_file(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if _is_test_file(base):
                found.append((node.lineno, base))
            # ``from package import test_module`` imports a test module too
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if _is_test_file(alias.name)]
    return found


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        package = ".".join(("tests", *path.parent.relative_to(TESTS).parts))
        wrong += [f"{path.relative_to(TESTS.parent)}:{line} imports {module}"
                  for line, module in forbidden_imports(path.read_text(), package)]
    assert wrong == []


def test_the_tree_was_read() -> None:
    """Guard against a check of nothing: the tests import their helper modules many times."""
    helpers = sum(module.startswith("tests.") for path in TESTS.rglob("test_*.py")
                  for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                  for module in [node.module or ""])
    assert helpers > 20


# The samples are split before " import" so that a plain text search of the tree for such imports
# finds none in this file either.
@pytest.mark.parametrize(("source", "package", "found"), [
    ("from tests.cli.test_bank_cli" " import m2mpay", "tests.user", [(1, "tests.cli.test_bank_cli")]),
    ("from .test_operating" " import _one_line", "tests.cli", [(1, "tests.cli.test_operating")]),
    ("from ..cli.test_bank_cli" " import m2mpay", "tests.bank", [(1, "tests.cli.test_bank_cli")]),
    ("from tests.user.conftest import served", "tests.cli", [(1, "tests.user.conftest")]),
    ("from tests.cli import test_processes", "tests.user", [(1, "tests.cli.test_processes")]),
    ("import tests.security.test_vendor_exhaustion", "tests", [(1, "tests.security.test_vendor_exhaustion")]),
    ("from tests.commands import m2mpay, one_line", "tests.cli", []),
    ("from .catalog import ALL, DECODERS", "tests.protocol", []),
    ("from m2mpay.protocol.messages import Message", "tests.protocol", []),
])
def test_the_rule_itself(source: str, package: str, found: list[tuple[int, str]]) -> None:
    """The check can fail: an import of a test module or a conftest is told apart from a helper's."""
    assert forbidden_imports(source, package) == found
