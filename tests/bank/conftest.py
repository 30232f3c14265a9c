"""Bank tests use the shared bank fixtures (``tests/plugins/banks.py``): ``world`` on SQLite and on
PostgreSQL, each test with its own bank id."""
