"""The bank fixtures of ``tests/bank``, for commands that need a real bank."""

from __future__ import annotations

from tests.bank.conftest import db_url, world

__all__ = ["db_url", "world"]
