"""Policy files: names that could never match are refused; nothing is unlimited unless written."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2mpay.agents.policy.config import PolicyConfig, PolicyError

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


@pytest.mark.parametrize(("table", "text", "name"), [
    ("vendors", '[vendors]\ndeny = ["Casino"]\n', "Casino"),
    ("vendors", '[vendors]\nallow = ["meter", "my meter"]\n', "my meter"),
    ("categories", '[categories]\nallow = ["EV"]\n', "EV"),
    ("categories", '[categories]\ndeny = [""]\n', ""),
    ("price", "[price]\nper_category = { Parking = 5 }\n", "Parking"),
    ("vendors", f'[vendors]\ndeny = ["{"a" * 33}"]\n', "a" * 33),
], ids=["capital", "space", "category-capital", "empty", "per-category", "too-long"])
def test_policy_names_validated(tmp_path: Path, table: str, text: str, name: str) -> None:
    """A name no certificate can carry (1-32 of a-z 0-9 - _ .) would never match: refused, named."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as refused:
        PolicyConfig.load(path)
    assert f"[{table}]" in str(refused.value) and repr(name) in str(refused.value)
    good = PolicyConfig.from_dict({"vendors": {"deny": ["casino-1", "shady.meter"]},
                                   "price": {"per_category": {"parking": 5, "ev_charging": 9}}})
    assert good.vendors.deny == ("casino-1", "shady.meter")


def test_unlimited_only_when_written() -> None:
    """A table or key left out takes the conservative default; ``"unlimited"`` must be written."""
    assert PolicyConfig.from_dict({}) == PolicyConfig()
    default = PolicyConfig()
    assert default.budget.per_hour is not None and default.price.max_per_unit is not None
    partial = PolicyConfig.from_dict({"budget": {"per_session": 5}})
    assert partial.budget.per_session == 5 and partial.budget.per_hour == default.budget.per_hour
    written = PolicyConfig.from_dict({"budget": {"per_hour": "unlimited"}, "price": {"max_per_unit": "unlimited"}})
    assert written.budget.per_hour is None and written.price.ceiling("parking") is None
    with pytest.raises(PolicyError):
        PolicyConfig.from_dict({"budget": {"per_hour": "lots"}})
    with pytest.raises(PolicyError):
        PolicyConfig.from_dict({"session": {"max_duration": "unlimited"}})  # a payment always ends


def test_shipped_default_policy_is_the_default() -> None:
    """``deploy/examples/policy.toml`` writes out exactly what applies when no policy is given."""
    assert PolicyConfig.load(EXAMPLES / "policy.toml") == PolicyConfig()
