"""Configuration as commands meet it: discovery (command line > M2MPAY_* > the role's file),
``m2mpay config show``, and one line with exit status 2 for every file that cannot be used.

Every command runs as a subprocess with its own environment: no M2MPAY_* variable of the caller,
``XDG_CONFIG_HOME`` and ``HOME`` in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import m2mpay as m2mpay_checked
from tests.commands import one_line

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2MPAY_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"), **extra)
    return env


def m2mpay(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=env)


def _xdg(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "xdg" / "m2mpay" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _decisions(wallet: Path, line: str) -> Path:
    wallet.mkdir(parents=True)
    (wallet / "decisions.jsonl").write_text(line + "\n")
    return wallet


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    """``user decisions`` reads the wallet that wins: each wallet's log says which one it is."""
    _xdg(tmp_path, "user.toml", 'wallet = "from-file"\n')
    _decisions(tmp_path / "xdg" / "m2mpay" / "from-file", "file")
    env_wallet = _decisions(tmp_path / "from-env", "env")
    cli_wallet = _decisions(tmp_path / "from-cli", "cli")

    assert m2mpay(_env(tmp_path), "user", "decisions").stdout == "file\n"
    assert m2mpay(_env(tmp_path, M2MPAY_WALLET=str(env_wallet)), "user", "decisions").stdout == "env\n"
    both = m2mpay(_env(tmp_path, M2MPAY_WALLET=str(env_wallet)), "user", "decisions", "--wallet", cli_wallet)
    assert both.stdout == "cli\n"


def test_a_missing_setting_says_every_way_to_give_it(tmp_path: Path) -> None:
    result = m2mpay(_env(tmp_path), "user", "wallet")
    assert result.returncode == 2
    assert one_line(result) == ("m2mpay: user: --wallet: missing (give --wallet, set M2MPAY_WALLET, or write wallet "
                                 "in user.toml)")


def test_config_show_prints_value_and_source(tmp_path: Path) -> None:
    user = _xdg(tmp_path, "user.toml", 'wallet = "w"\ncredentials = "alice.json"\nbroker = "mqtt://file:1883"\n')
    system_wide = EXAMPLES / "policy.toml"
    env = _env(tmp_path, M2MPAY_BROKER="mqtt://env:1883", M2MPAY_POLICY=str(system_wide), M2MPAY_COAP_PORT="5999")
    shown = m2mpay(env, "config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["setting"]: (r["value"], r["source"]) for r in json.loads(shown.stdout)}
    assert rows["user.file"] == (str(user), "found")
    assert rows["user.wallet"] == (str(user.parent / "w"), f"file {user}")
    assert rows["user.broker"] == ("mqtt://env:1883", "env M2MPAY_BROKER")
    assert rows["policy.file"] == (str(system_wide), "env M2MPAY_POLICY")
    assert rows["vendor.coap_port"] == (5999, "env M2MPAY_COAP_PORT")
    assert rows["vendor.coap_host"] == ("::1", "default")
    assert rows["bank.metrics_port"] == (None, "unset")
    text = m2mpay(env, "config", "show").stdout.splitlines()
    assert f"user.wallet          {user.parent / 'w'}" in next(line for line in text if line.startswith("user.wallet"))
    assert text[[line.split()[0] for line in text].index("user.broker")].endswith("env M2MPAY_BROKER")


def test_config_show_never_prints_a_secret(tmp_path: Path) -> None:
    """Settings name files; what is in a credentials file (a private key) is never read here."""
    secret = "a1" * 32
    (tmp_path / "alice.json").write_text(json.dumps({"account": "alice", "key": secret}))
    _xdg(tmp_path, "user.toml", f'wallet = "w"\ncredentials = "{tmp_path / "alice.json"}"\nbroker = "mqtt://h:1"\n')
    shown = m2mpay(_env(tmp_path), "config", "show")
    assert shown.returncode == 0 and secret not in shown.stdout and str(tmp_path / "alice.json") in shown.stdout


def test_a_bad_file_in_force_stops_every_command_naming_it(tmp_path: Path) -> None:
    user = _xdg(tmp_path, "user.toml", 'wallet = "w"\nunits = true\n')
    for args in (("config", "show"), ("user", "wallet")):
        result = m2mpay(_env(tmp_path), *args)
        assert result.returncode == 2
        assert one_line(result) == f"m2mpay: {args[0]}: {user}: units: must be a whole number (got true)"


def test_user_run_toml_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "user.toml"
    config.write_text('wallet = "w"\n[policy\n')
    result = m2mpay(_env(tmp_path), "user", "run", "--config", config)
    assert result.returncode == 2
    assert one_line(result) == (f"m2mpay: {config}: not valid TOML: Expected ']' at the end of a table declaration "
                                 "(at line 2, column 8)")


def test_policy_naming_a_directory(tmp_path: Path) -> None:
    """``--policy`` (or M2MPAY_POLICY) naming a directory: one line, exit 2, before any vendor is asked."""
    expected = f"m2mpay: {tmp_path}: a directory, where a policy file was expected (name the file itself)"
    pay = ("user", "pay", "--wallet", tmp_path / "wallet", "coap://[::1]:9")
    given = m2mpay(_env(tmp_path), *pay, "--policy", tmp_path)
    assert given.returncode == 2 and one_line(given) == expected
    named = m2mpay(_env(tmp_path, M2MPAY_POLICY=str(tmp_path)), *pay)
    assert named.returncode == 2 and one_line(named) == expected


def test_credentials_that_are_not_json_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "alice.json"
    bad.write_text("{not json")
    result = m2mpay(_env(tmp_path), "user", "withdraw", "--wallet", tmp_path / "w", "--credentials", bad,
                    "--broker", "mqtt://127.0.0.1:9", "--coins", "1")
    assert result.returncode == 2
    assert one_line(result) == (f"m2mpay: {bad}: not valid JSON: Expecting property name enclosed in double quotes "
                                 "at line 1 column 2")
    vendor = m2mpay(_env(tmp_path), "vendor", "serve", "--credentials", bad, "--broker", "mqtt://127.0.0.1:9",
                    "--data", tmp_path / "v", "--coap-port", "0")
    assert vendor.returncode == 2
    assert one_line(vendor) == (f"m2mpay: vendor: {bad}: not valid JSON: Expecting property name enclosed in double "
                                 "quotes at line 1 column 2")


def test_an_environment_number_that_is_not_one(tmp_path: Path) -> None:
    result = m2mpay(_env(tmp_path, M2MPAY_COAP_PORT="five"), "vendor", "serve", "--credentials", tmp_path / "v.json",
                    "--broker", "mqtt://127.0.0.1:9")
    assert result.returncode == 2
    assert one_line(result) == "m2mpay: vendor: M2MPAY_COAP_PORT: must be a whole number (got 'five')"


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank and the credentials of ``meter``, enrolled for parking."""
    tmp = tmp_path_factory.mktemp("enrolled")
    m2mpay_checked("bank", "init", "--data", tmp / "bank", "--bank", "bank-c")
    m2mpay_checked("bank", "vendor", "enroll", "--data", tmp / "bank", "meter", "--category", "parking",
                   "--out", tmp / "meter.json")
    return tmp / "meter.json"


def test_vendor_enrolled_for_parking_cannot_serve_ev(tmp_path: Path, enrolled: Path) -> None:
    """A vendor whose file names another category is refused at start, before it connects anywhere."""
    config = tmp_path / "vendor.toml"
    config.write_text('[pricing]\nservice = "ev"\nprice = 2\n')
    # the broker's port is closed: a start that got past the check would say "unreachable" (5), not 2
    result = m2mpay(_env(tmp_path), "vendor", "serve", "--credentials", enrolled, "--broker", "mqtt://127.0.0.1:9",
                    "--config", config, "--data", tmp_path / "v", "--coap-port", "0")
    assert result.returncode == 2
    assert one_line(result) == (f"m2mpay: vendor: {config}: [pricing] service: 'ev', but the vendor is enrolled for "
                                 "'parking' (write service = \"parking\", or enrol the vendor for ev)")


def test_vendor_settings_from_its_discovered_file(tmp_path: Path, enrolled: Path) -> None:
    """The same refusal when everything comes from ``$XDG_CONFIG_HOME/m2mpay/vendor.toml`` and the environment."""
    config = _xdg(tmp_path, "vendor.toml", f'credentials = "{enrolled}"\ndata = "v"\ncoap_port = 0\n'
                                           '[pricing]\nservice = "ev"\n')
    result = m2mpay(_env(tmp_path, M2MPAY_BROKER="mqtt://127.0.0.1:9"), "vendor", "serve")
    assert result.returncode == 2
    assert one_line(result) == (f"m2mpay: vendor: {config}: [pricing] service: 'ev', but the vendor is enrolled for "
                                 "'parking' (write service = \"parking\", or enrol the vendor for ev)")


def test_the_first_file_found_is_the_only_one_read(tmp_path: Path) -> None:
    """``$XDG_CONFIG_HOME/m2mpay`` before the system directory, ``~/.config`` when the variable is
    empty; the file found first is read whole, never merged with another."""
    from m2mpay.agents.settings import Discovery

    system = tmp_path / "etc"
    system.mkdir()
    (system / "user.toml").write_text('wallet = "/srv/wallet"\nbroker = "mqtt://etc:1"\n')
    user = _xdg(tmp_path, "user.toml", 'wallet = "mine"\n')

    def resolve(env: dict[str, str], name: str) -> tuple[object, str]:
        r = Discovery(env, system_dir=system).setting(name)
        return r.value, r.source

    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert resolve(xdg, "user.wallet") == (user.parent / "mine", f"file {user}")
    assert resolve(xdg, "user.broker") == (None, "unset")  # /etc's broker is not merged in
    nowhere = {"XDG_CONFIG_HOME": str(tmp_path / "empty")}
    assert resolve(nowhere, "user.broker") == ("mqtt://etc:1", f"file {system / 'user.toml'}")
    home = {"XDG_CONFIG_HOME": "", "HOME": str(tmp_path / "home")}
    (tmp_path / "home" / ".config" / "m2mpay").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "m2mpay" / "user.toml").write_text('broker = "mqtt://home:1"\n')
    assert resolve(home, "user.broker") == ("mqtt://home:1", f"file {tmp_path / 'home/.config/m2mpay/user.toml'}")
    assert resolve({**xdg, "M2MPAY_BROKER": ""}, "user.broker") == (None, "unset")  # empty: unset


def test_config_show_checks_the_policy_in_force(tmp_path: Path) -> None:
    policy = _xdg(tmp_path, "policy.toml", "[budget]\nper_day = -5\n")
    result = m2mpay(_env(tmp_path), "config", "show")
    assert result.returncode == 2
    assert one_line(result) == f"m2mpay: config: {policy}: [budget] per_day: must be at least 0 (got -5)"
