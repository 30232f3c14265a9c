"""m2mpay: anonymous, coupon-based, semi-offline micropayments for machine-to-machine commerce.

The installed packages are :mod:`m2mpay.protocol` (the sans-I/O core), :mod:`m2mpay.agents` (the
bank, vendor, user and policy agents and the CLI) and :mod:`m2mpay.broker` (Mosquitto
configuration and PKI). In the repository they live in the top-level folders ``protocol/``,
``agents/`` and ``broker/``; ``m2mpay/`` links to them so that tools reading the source tree (mypy,
the tests) see the installed names.
"""

__version__ = "0.1.0"
