"""Vendor tests use the shared bank world (``tests/plugins/banks.py``): a real bank on SQLite and
PostgreSQL."""
