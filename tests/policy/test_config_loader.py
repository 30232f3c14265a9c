"""The one strict loader: every refusal names the file, the table and the key; the budget's
refusal says what was spent; the refill cap's day ends at the device's local midnight."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2mpay.agents.config import ConfigError
from m2mpay.agents.policy.config import PolicyConfig, PolicyError
from m2mpay.agents.policy.engine import OfferView, PolicyEngine, Spend
from m2mpay.agents.user.run import RunConfig, day_start
from m2mpay.agents.vendor.config import Pricing, VendorConfig

USER = 'wallet = "w"\ncredentials = "c.json"\nbroker = "mqtt://127.0.0.1:1883"\n'

REFUSALS = [
    # (file name, text, the error's line after "PATH: ")
    ("user.toml", USER + "units = true\n", "units: must be a whole number (got true)"),
    ("user.toml", USER + 'units = "5"\n', "units: must be a whole number (got '5')"),
    ("user.toml", USER + "units = 0\n", "units: must be at least 1 (got 0)"),
    ("user.toml", USER + "interval = -1.0\n", "interval: must be at least 0 (got -1.0)"),
    ("user.toml", USER + 'walet = "typo"\n',
     "walet: unknown key (known here: broker, credentials, interval, policy, rounds, tls, units, vendors, wallet)"),
    ("user.toml", 'wallet = "w"\ncredentials = "c.json"\n', "broker: missing (this key must be written)"),
    ("user.toml", USER + '[policy.budget]\nper_hour = "lots"\n',
     '[policy.budget] per_hour: must be a whole number or "unlimited" (got \'lots\')'),
    ("user.toml", USER + "[policy.coins]\nstrategy = \"random\"\n",
     "[policy.coins] strategy: must be one of best_fit, drain_partial, largest_first, fresh_per_vendor (got 'random')"),
    ("policy.toml", '[vendors]\ndeny = ["Casino"]\n',
     "[vendors] deny: 'Casino' can never match a certificate name (1-32 characters of a-z 0-9 - _ .)"),
    ("policy.toml", "[refill]\ncoins = 0\n", "[refill] coins: must be at least 1 (got 0)"),
    ("policy.toml", '[session]\nmax_duration = "unlimited"\n', "[session] max_duration: must be a whole number (got "
                                                                   "'unlimited')"),
    ("policy.toml", "budget = 5\n", "[budget]: must be a table"),
    ("vendor.toml", "[pricing]\nprice = 0\n", "[pricing] price: must be at least 1 (got 0)"),
    ("vendor.toml", "[pricing]\nmeter_interval = 0\n",
     "[pricing] meter_interval: must be more than 0 seconds (got 0.0)"),
    ("vendor.toml", "[session]\nblock_window = 60\nsettle_margin = 60\n",
     "[session] settle_margin: must be less than block_window (60)"),
    ("vendor.toml", "[session]\nmin_remaining = 10\n",
     "[session] min_remaining: no longer a setting (it never had an effect: delete the line)"),
    ("vendor.toml", "coap_port = 70000\n", "coap_port: must be at most 65535 (got 70000)"),
    ("vendor.toml", "[pricing\n",
     "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 9)"),
]


def _load(path: Path) -> object:
    if path.name == "user.toml":
        return RunConfig.load(path)
    return PolicyConfig.load(path) if path.name == "policy.toml" else VendorConfig.load(path)


@pytest.mark.parametrize(("name", "text", "line"), REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_refusals_name_file_table_and_key(tmp_path: Path, name: str, text: str, line: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        _load(path)
    assert str(refused.value) == f"{path}: {line}"


def test_policy_errors_stay_policy_errors(tmp_path: Path) -> None:
    """``PolicyError`` is still what a bad policy raises (callers and exit codes rely on it)."""
    with pytest.raises(PolicyError) as refused:
        PolicyConfig.load(tmp_path)
    assert str(refused.value) == f"{tmp_path}: a directory, where a policy file was expected (name the file itself)"


def test_paths_are_relative_to_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "user.toml").write_text(USER + 'tls = "pki"\n')
    config = RunConfig.load(tmp_path / "user.toml")
    assert (config.wallet, config.credentials, config.tls) == (tmp_path / "w", tmp_path / "c.json", tmp_path / "pki")
    given = RunConfig.load(tmp_path / "user.toml", {"broker": "mqtts://elsewhere:8883", "wallet": Path("/x")})
    assert (given.broker, given.wallet) == ("mqtts://elsewhere:8883", Path("/x"))


def test_a_vendor_serves_only_its_category(tmp_path: Path) -> None:
    """The offer names the certificate's category: left out it is filled in, another is refused."""
    path = tmp_path / "vendor.toml"
    path.write_text('[pricing]\nservice = "ev"\nprice = 3\n')
    with pytest.raises(ConfigError) as refused:
        VendorConfig.load(path, "parking")
    assert str(refused.value) == (f"{path}: [pricing] service: 'ev', but the vendor is enrolled for 'parking' "
                                  '(write service = "parking", or enrol the vendor for ev)')
    assert VendorConfig.load(path, "ev").pricing.service == "ev"
    path.write_text("[pricing]\nprice = 3\n")
    assert VendorConfig.load(path, "parking").pricing == Pricing(service="parking", price=3)
    assert VendorConfig().for_category("ev", written=False).pricing.service == "ev"


NOW = 1_800_000_000


def test_budget_refusal_says_what_was_spent_and_the_limit() -> None:
    engine = PolicyEngine(PolicyConfig.from_dict({"budget": {"per_day": 25}}),
                          [Spend(NOW - 7200, "meter", "parking", 20)])
    view = OfferView(vendor="meter", category="parking", price=10, token_value=1, deadline=NOW + 600)
    decision = engine.check_offer(view, 1, NOW)
    assert (decision.allowed, decision.reason) == (False, "daily_budget")
    assert decision.message == "10 more would exceed the daily budget: 20 spent of 25 (minor units)"
    assert (decision.details["spent"], decision.details["limit"], decision.details["amount"]) == (20, 25, 10)
    session = engine.may_pay(view, 95, 10, NOW)
    assert session.message == "10 more would exceed the cap per session: 95 spent of 100 (minor units)"


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The device's local time is Berlin's (a zone with summer time), for this test only."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin")
def test_refill_cap_resets_at_local_midnight() -> None:
    """A simulated clock crosses midnight: the cap that held at 23:59 lets the next coin go at 00:00."""
    engine = PolicyEngine(PolicyConfig.from_dict({"refill": {"below": 500, "coins": 1, "daily_cap": 100}}))
    withdrawals = [(int(datetime.datetime(2027, 3, 27, 8, 0).timestamp()), 100)]  # one coin on the 27th

    def refill_at(clock: datetime.datetime) -> tuple[int, str]:
        now = int(clock.timestamp())
        today = sum(v for ts, v in withdrawals if ts >= day_start(now))
        count, decision = engine.refill(0, 100, True, today)
        return count, decision.reason

    assert refill_at(datetime.datetime(2027, 3, 27, 23, 59, 59)) == (0, "refill_cap")
    assert refill_at(datetime.datetime(2027, 3, 28, 0, 0, 0)) == (1, "refill")  # the night summer time begins
    midnight = int(datetime.datetime(2027, 3, 28, 0, 0).timestamp())
    assert day_start(midnight - 1) == int(datetime.datetime(2027, 3, 27, 0, 0).timestamp())
    assert day_start(midnight + 23 * 3600 - 1) == midnight  # a 23-hour day: 23:59:59 is still the 28th
