"""A budget refusal as a user meets it: one line giving what was spent and the limit, in money, exit 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.commands import m2mpay
from tests.town import first_payment, town

pytestmark = pytest.mark.network

VENDOR = "[pricing]\nprice = 10\nmeter_interval = 0.05\n[session]\nblock_window = 60\nsettle_margin = 30\n"
"""10 minor units a unit; no ``service``: the meter serves the category it is enrolled for (parking)."""


def test_budget_refusal_gives_spent_and_limit(tmp_path: Path) -> None:
    with town(tmp_path, VENDOR) as t:
        m2mpay("user", "withdraw", "--wallet", t.wallet, "--credentials", t.credentials, "--broker", t.broker,
               "--coins", "1")
        paid = first_payment(t, 2)  # 20 of the coin's 100 leave the wallet today
        assert paid.returncode == 0, paid.stdout + paid.stderr
        policy = tmp_path / "policy.toml"
        policy.write_text("[budget]\nper_day = 25\n")
        refused = m2mpay("user", "pay", "--wallet", t.wallet, t.vendor, "--units", "1", "--policy", policy,
                         check=False)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines == ["m2mpay: refused by policy: daily_budget: 10 more would exceed the daily budget: 20 spent of 25 "
                     "(minor units)"], refused.stderr
