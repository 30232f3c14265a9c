"""The security tests use the shared bank fixtures (``tests/plugins/banks.py``), on both databases."""
