"""Shared fixtures: a fresh PostgreSQL database per test run, bank directories on both databases."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

PG_ADMIN = os.environ.get("M2MPAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


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
    """A private Mosquitto for the test session on a free loopback port; its mqtt:// URL."""
    from m2mpay.broker.launcher import Mosquitto

    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker.url
