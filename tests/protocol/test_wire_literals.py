"""No wire name is written outside :mod:`m2mpay.protocol.wire`: a rename there is a rename everywhere.

The source of ``protocol/``, ``agents/`` and ``broker/`` is parsed, and every string or bytes literal
(docstrings aside: they describe, they do not build) is searched for the topic root, the shared
subscription, the CoAP resource paths and types and the signing contexts; a content format written
as a number is searched for where content formats go. The needles come from the wire module itself.
"""

from __future__ import annotations

import ast
from pathlib import Path


from m2mpay.protocol import wire

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("protocol", "agents", "broker")
HOME = "protocol/wire.py"



def _format_slot(name: str) -> bool:
    """Whether a name holds a content format: ``content_format``, ``ct``, ``CBOR``, ``CONTENT_FORMAT_CBOR``."""
    lowered = name.lower()
    return lowered == "ct" or "content_format" in lowered or "cbor" in lowered


def _needles() -> tuple[str, ...]:
    return (
        f"{wire.TOPIC_ROOT}/",  # every topic and every signing context starts with it
        wire.shared_request_filter("x").split("/", 1)[0],  # "$share"
        wire.path_text(wire.WELL_KNOWN_CORE_PATH),
        wire.path_text(wire.OFFER_PATH),
        wire.path_text(wire.SESSIONS_PATH),
        wire.RT_OFFER,
        wire.RT_SESSIONS,
    )


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of string constants that stand alone as statements: docstrings, attribute docs."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _format_numbers(tree: ast.AST) -> list[int]:
    """Lines where the CBOR content format is written as a number: a keyword, an assignment or a
    comparison naming a content format."""
    lines = []
    for node in ast.walk(tree):
        slots: list[tuple[str, ast.AST]] = []
        if isinstance(node, ast.keyword) and node.arg:
            slots.append((node.arg, node.value))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if node.value is not None:
                    slots.append((name, node.value))
        elif isinstance(node, ast.Compare):
            names = [getattr(side, "attr", getattr(side, "id", "")) for side in (node.left, *node.comparators)]
            slots += [(name, side) for name in names for side in (node.left, *node.comparators)]
        lines += [getattr(value, "lineno", 0) for name, value in slots
                  if _format_slot(name) and isinstance(value, ast.Constant)
                  and value.value == wire.CONTENT_FORMAT_CBOR and not isinstance(value.value, bool)]
    return lines


def stray_wire_names(source: str, rel: str) -> list[str]:
    """``file:line: literal`` for each wire name written in ``source`` (the file ``rel``)."""
    tree = ast.parse(source, rel)
    skip = _docstrings(tree)
    needles = _needles()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in skip:
            continue
        value = node.value
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if isinstance(text, str) and any(needle in text for needle in needles):
            found.append(f"{rel}:{node.lineno}: {text[:60]!r}")
    found += [f"{rel}:{line}: content format {wire.CONTENT_FORMAT_CBOR}" for line in _format_numbers(tree)]
    return found


def _sources() -> list[Path]:
    return sorted(path for root in SCANNED for path in (REPO / root).rglob("*.py"))


def test_no_wire_name_outside_the_wire_module() -> None:
    scanned = {path.relative_to(REPO).as_posix(): path for path in _sources()}
    assert HOME in scanned and len(scanned) > 50  # the tree is where the scan looks for it
    stray = [hit for rel, path in scanned.items() if rel != HOME
             for hit in stray_wire_names(path.read_text(), rel)]
    assert stray == []


def test_the_wire_module_itself_is_found() -> None:
    """Scanned like any other file, the wire module shows every kind of name the scan looks for."""
    hits = stray_wire_names((REPO / HOME).read_text(), HOME)
    for start, literal in (("_SHARE = ", "'$share'"), ("RT_OFFER = ", "'m2mpay.offer'"),
                           ("RT_SESSIONS = ", "'m2mpay.sessions'"), ("AAD_RECEIPT = ", "'m2mpay/receipt/1'"),
                           ("_REQUEST_CONTEXT = ", "'m2mpay/req/1'")):
        assert f"{HOME}:{_line_of(start)}: {literal}" in hits
    assert f"{HOME}:{_line_of('CONTENT_FORMAT_CBOR = ')}: content format 60" in hits


def _line_of(start: str) -> int:
    lines = (REPO / HOME).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(start))


def test_the_scan_finds_what_it_looks_for() -> None:
    """The scan is not vacuous: each kind of literal, written the ways the code used to, is found."""
    source = '''"""m2mpay/{bank}/keys in a docstring is fine."""
import aiocoap
TOPIC = f"m2mpay/{bank}/keys"
SHARED = f"$share/{bank}-workers/x"
AAD = b"m2mpay/receipt/1"
PATH = base + "/sessions"
RT = "m2mpay.offer"
CBOR = 60
message = aiocoap.Message(content_format=60)
ok = request.opt.content_format != 60
'''
    hits = stray_wire_names(source, "agents/probe.py")
    assert sorted(int(hit.split(":")[1]) for hit in hits) == [3, 4, 5, 6, 7, 8, 9, 10]
