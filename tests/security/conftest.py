"""The bank fixtures of ``tests/bank``, shared with the security tests (both databases)."""

from __future__ import annotations

from tests.bank.conftest import db_url, world

__all__ = ["db_url", "world"]
