"""User tests use the shared bank fixtures (``tests/plugins/banks.py``): ``world``, a real bank on
SQLite and PostgreSQL, and ``served``, the findings' bank: SQLite only, with two keysets whose
tokens are worth different amounts (1 and 10), serving over Mosquitto."""
