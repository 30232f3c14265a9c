"""Logging for the serving commands: readable lines, or JSON lines with ``--log-json``.

Policy: INFO for what an operator follows (a session settled, a broker lost and regained),
WARNING for what deserves a look (a refused settlement, a retry), ERROR only with a traceback for
our own faults. Messages never carry keys, seeds, tokens or whole requests.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["JsonFormatter", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(json_lines: bool = False, level: int = logging.INFO) -> None:
    """Configure the root logger once, for a serving process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
