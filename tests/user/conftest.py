"""User tests reuse the bank world (a real bank on SQLite and PostgreSQL)."""

from tests.bank.conftest import db_url, world  # noqa: F401  (fixtures)
