"""The broker's ACL is generated from the wire module's names: exactly its filters, and a rename follows."""

from __future__ import annotations

import pytest

from m2mpay.broker.config import REQUEST_OPS, render_acl
from m2mpay.protocol import wire
from m2mpay.protocol.messages import OPS


def _rules(acl: str) -> list[str]:
    return [line for line in acl.splitlines() if line and not line.startswith("#")]


def test_acl_lines_are_the_wire_filters() -> None:
    bank = "b1"
    expected = [
        *(f"pattern write {wire.request_topic(bank, op)}" for op in OPS),
        f"pattern read {wire.response_prefix(bank)}%u",
        f"pattern read {wire.keys_topic(bank)}",
    ]
    for user in ("bank", "bank-2"):
        expected += [
            f"user {user}",
            f"topic read {wire.request_filter(bank)}",
            f"topic read {wire.shared_request_filter(bank)}",
            f"topic write {wire.response_filter(bank)}",
            f"topic readwrite {wire.keys_topic(bank)}",
        ]
    assert _rules(render_acl(bank, ("bank", "bank-2"))) == expected
    assert REQUEST_OPS == tuple(OPS) == ("withdraw", "block", "settle", "status", "exchange", "restore")


def test_acl_as_deployed_for_one_bank() -> None:
    """The same, spelled out once: what Mosquitto reads for bank ``b1`` (a change here is a change of
    what devices may do)."""
    assert _rules(render_acl("b1", ("bank",))) == [
        "pattern write m2mpay/b1/req/withdraw", "pattern write m2mpay/b1/req/block",
        "pattern write m2mpay/b1/req/settle", "pattern write m2mpay/b1/req/status",
        "pattern write m2mpay/b1/req/exchange", "pattern write m2mpay/b1/req/restore",
        "pattern read m2mpay/b1/resp/%u", "pattern read m2mpay/b1/keys",
        "user bank", "topic read m2mpay/b1/req/+", "topic read $share/b1-workers/m2mpay/b1/req/+",
        "topic write m2mpay/b1/resp/+", "topic readwrite m2mpay/b1/keys",
    ]


def test_renamed_topics_rename_the_acl(monkeypatch: pytest.MonkeyPatch) -> None:
    """No topic is written in the broker's config: renaming the root in the wire module renames every line."""
    monkeypatch.setattr(wire, "TOPIC_ROOT", "m2pay2")
    rules = _rules(render_acl("b1", ("bank",)))
    assert rules[0] == "pattern write m2pay2/b1/req/withdraw"
    assert "topic read $share/b1-workers/m2pay2/b1/req/+" in rules
    assert not [rule for rule in rules if "m2mpay" in rule]


@pytest.mark.parametrize("bank", ["b+", "b#", "b/c", "B1", "", "b\nuser evil"])
def test_acl_refuses_a_bank_that_is_not_a_name(bank: str) -> None:
    """A wildcard, level or newline in the bank id would widen the ACL or add lines to it."""
    with pytest.raises(ValueError, match="is not a name"):
        render_acl(bank, ("bank",))
