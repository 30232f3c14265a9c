"""The real servers tests talk to: one private Mosquitto per test run, throwaway PostgreSQL databases.

Every fixture named in :data:`SERVER_FIXTURES` starts or reaches a server; a test that uses one,
directly or through another fixture, is marked ``network`` (``tests/conftest.py``). A missing
server fails the test loudly: it does not skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

__all__ = ["PG_ADMIN", "SERVER_FIXTURES", "mosquitto", "pg_database", "pg_server"]

PG_ADMIN = os.environ.get("M2MPAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
"""An administrator's URL for the PostgreSQL the tests create their databases in."""

SERVER_FIXTURES = frozenset({"mosquitto", "pg_server", "pg_database", "ctx"})
"""Fixtures that start or reach a server, or open a CoAP socket (``ctx``, in ``tests/plugins/vendors.py``):
whoever uses one is a ``network`` test."""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A URL prefix for creating throwaway databases; fails loudly when PostgreSQL is missing."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed for the bank tests ({PG_ADMIN}): {exc}")
    yield PG_ADMIN.rsplit("/", 1)[0]


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    import psycopg

    name = f"m2mpay_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Mosquitto for the test session on a free loopback port; its mqtt:// URL.

    Tests share it: each keeps to its own bank's topics (the ``bank_id`` fixture)."""
    from m2mpay.broker.launcher import Mosquitto

    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker.url
