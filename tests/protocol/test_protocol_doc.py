"""docs/PROTOCOL.md carries the CDDL of every message, generated from the code: it cannot drift.

To bring the document up to date after changing a message:
``M2MPAY_WRITE_DOCS=1 .venv/bin/python -m pytest tests/protocol/test_protocol_doc.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import m2mpay.protocol.messages as messages
from m2mpay.protocol.messages import cddl

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
_SECTION = re.compile(r"(<!-- cddl:begin -->\n)(.*?)(<!-- cddl:end -->)", re.S)


def test_protocol_doc_cddl_section_is_generated_from_the_code() -> None:
    text = DOC.read_text()
    found = _SECTION.search(text)
    assert found is not None, "docs/PROTOCOL.md has no <!-- cddl:begin --> ... <!-- cddl:end --> section"
    generated = cddl.render()
    if os.environ.get("M2MPAY_WRITE_DOCS") == "1":
        DOC.write_text(text[:found.start(2)] + generated + text[found.end(2):])
        return
    assert found.group(2) == generated, ("the CDDL in docs/PROTOCOL.md differs from the messages: see this "
                                         "module's docstring to regenerate it")


def test_every_message_is_in_the_schema() -> None:
    """A new message cannot be left out of the document."""
    listed = {cls for _, group in cddl.MESSAGES for cls in group}
    public = {obj for name in messages.__all__ if isinstance(obj := getattr(messages, name), type)
              and issubclass(obj, messages.Message) and obj is not messages.Message}
    assert public == listed
