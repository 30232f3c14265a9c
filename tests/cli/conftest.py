"""Commands that need a real bank use the shared ``world`` fixture (``tests/plugins/banks.py``)."""
