"""The import graph keeps its layers: a test of the source tree, no imports executed.

- The core (``m2mpay.protocol``) imports nothing of the agents or the broker, and no I/O library:
  no sockets, event loops, databases, subprocesses, clocks to sleep on.
- The broker package (Mosquitto configuration and PKI) imports the core at most, never the agents.
- Nobody imports a private module (``_name``) of another package, nor a private name from one.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"protocol": "m2mpay.protocol", "agents": "m2mpay.agents", "broker": "m2mpay.broker"}

# Standard-library modules that do I/O or wait: the core takes time, randomness and bytes as input.
IO_MODULES = frozenset({
    "asyncio", "socket", "ssl", "select", "selectors", "subprocess", "threading", "multiprocessing",
    "sqlite3", "http", "urllib", "ftplib", "smtplib", "socketserver", "signal", "shutil", "tempfile",
    "logging", "time", "sched", "concurrent",
})
# Third-party libraries the core may use: pure computation on bytes.
CORE_THIRD_PARTY = frozenset({"cryptography", "cbor2", "gmpy2", "nacl"})  # nacl: libsodium's Ed25519 (cose)


@dataclass(frozen=True, slots=True)
class Import:
    module: str      # the importing module, e.g. m2mpay.agents.bank.admin
    target: str      # the imported module, absolute, e.g. m2mpay.protocol.messages._fields
    names: tuple[str, ...]  # names taken with ``from target import ...``
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def _module_name(path: Path) -> tuple[str, bool]:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    parts[0] = FOLDERS[parts[0]]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _imports() -> list[Import]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module, is_package = _module_name(path)
            package = module if is_package else module.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found += [Import(module, alias.name, (), node.lineno) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join([*anchor, base] if base else anchor)
                    names = tuple(alias.name for alias in node.names)
                    found.append(Import(module, base, names, node.lineno))
                    # ``from package import module`` imports a module too
                    found += [Import(module, f"{base}.{name}", (), node.lineno) for name in names
                              if (ROOT / _folder_path(f"{base}.{name}")).with_suffix(".py").exists()
                              or (ROOT / _folder_path(f"{base}.{name}") / "__init__.py").exists()]
    return found


def _folder_path(dotted: str) -> Path:
    for folder, name in FOLDERS.items():
        if dotted == name or dotted.startswith(name + "."):
            return Path(folder, *dotted[len(name) + 1:].split(".")) if dotted != name else Path(folder)
    return Path("/nonexistent")


IMPORTS = _imports()


def _top(target: str) -> str:
    return target.split(".")[0]


def test_the_graph_was_read() -> None:
    """Guard against a test of nothing: the tree has well over a hundred imports of the core."""
    assert sum(i.target.startswith("m2mpay.protocol") for i in IMPORTS) > 100


def _core_may_import(target: str) -> bool:
    top = _top(target)
    if target.startswith("m2mpay."):
        return target.startswith("m2mpay.protocol")
    if top in sys.stdlib_module_names or top == "__future__":
        return top not in IO_MODULES
    return top in CORE_THIRD_PARTY


def test_the_core_imports_no_agent_broker_or_io() -> None:
    wrong = [f"{i.where()} imports {i.target}" for i in IMPORTS
             if i.module.startswith("m2mpay.protocol") and not _core_may_import(i.target)]
    assert wrong == []


def test_the_broker_package_does_not_import_the_agents() -> None:
    wrong = [f"{i.where()} imports {i.target}" for i in IMPORTS
             if i.module.startswith("m2mpay.broker") and i.target.startswith("m2mpay.agents")]
    assert wrong == []


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def test_no_private_module_or_name_of_another_package() -> None:
    wrong = []
    for imp in IMPORTS:
        if not imp.target.startswith("m2mpay."):
            continue
        parts = imp.target.split(".")
        for depth, part in enumerate(parts):
            if _private(part):
                owner = ".".join(parts[:depth])  # the package the private module belongs to
                if not (imp.module == owner or imp.module.startswith(owner + ".")):
                    wrong.append(f"{imp.where()} imports private module {imp.target}")
                break
        else:
            owner = imp.target
            outside = not (imp.module == owner or imp.module.startswith(owner.rpartition(".")[0] + "."))
            wrong += [f"{imp.where()} imports private name {imp.target}.{name}"
                      for name in imp.names if _private(name) and outside]
    assert wrong == []


@pytest.mark.parametrize(("target", "allowed"), [
    ("asyncio", False), ("aiomqtt", False), ("m2mpay.agents.mqtt", False), ("m2mpay.broker.pki", False),
    ("hashlib", True), ("cbor2", True), ("m2mpay.protocol.cbor", True),
])
def test_the_core_rule_itself(target: str, allowed: bool) -> None:
    """The checker can fail: forbidden imports are told apart from allowed ones."""
    assert _core_may_import(target) is allowed
