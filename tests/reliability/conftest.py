"""Reliability runs. Each has a light size for every test run and a heavy one, marked ``heavy``,
deselected by default and run by ``make reliability`` (``pytest -m heavy``). The bank fixtures are
the shared ones (``tests/plugins/banks.py``)."""
