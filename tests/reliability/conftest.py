"""Reliability runs. Each has a light size for every test run and a heavy one, marked ``heavy``,
deselected by default and run by ``make reliability`` (``pytest -m heavy``)."""

from __future__ import annotations

from tests.bank.conftest import db_url, world  # noqa: F401  (fixtures)
