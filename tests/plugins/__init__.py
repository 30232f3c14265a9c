"""Fixtures shared by every test directory, registered once in ``tests/conftest.py``."""
