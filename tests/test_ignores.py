"""Every silenced check in the package says why, on its own line.

A ``# type: ignore[code]`` is followed by ``  # reason`` (or ``  - reason``), a ``# noqa: RULE`` by
`` - reason``. An ignore without a reason is a question the next maintainer cannot answer: is the
check wrong here, or was the error never looked at? Better still is no ignore: fix the types.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "agents", "broker")

_SILENCED = re.compile(r"type: ignore|noqa")
_EXPLAINED = re.compile(r"noqa: [A-Z0-9, ]+ +- |type: ignore\[[a-z, -]+\] +(#|- )")


def unexplained(line: str) -> bool:
    """Whether ``line`` silences a check without a reason beside it."""
    return _SILENCED.search(line) is not None and _EXPLAINED.search(line) is None


def _unexplained_in_tree() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if unexplained(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_the_tree_was_read() -> None:
    """Guard against a check of nothing: the packages hold ignores, each with its reason."""
    explained = sum(bool(_EXPLAINED.search(line))
                    for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                    for line in path.read_text().splitlines())
    assert explained >= 20


def test_no_ignore_without_a_reason_on_its_line() -> None:
    assert _unexplained_in_tree() == []


@pytest.mark.parametrize(("line", "flagged"), [
    ("    return raw  # type: ignore[no-any-return]", True),
    ("    x = f()  # type: ignore", True),
    ("    x = f()  # type: ignore  # no code named", True),
    ("    inner = client._client  # noqa: SLF001", True),
    ("    inner = client._client  # noqa", True),
    ("    inner = client._client  # noqa: SLF001 -", True),
    ("    return raw  # type: ignore[no-any-return]  # check() accepted it", False),
    ("    return raw  # type: ignore[no-any-return] - check() accepted it", False),
    ("    inner = client._client  # noqa: SLF001 - aiomqtt has no public name for it", False),
    ("    except Exception:  # noqa: BLE001, S110 - logged by the caller", False),
    ("    return raw", False),
])
def test_the_rule_itself(line: str, flagged: bool) -> None:
    """The check can fail: a bare ignore is told apart from one with its reason."""
    assert unexplained(line) is flagged
