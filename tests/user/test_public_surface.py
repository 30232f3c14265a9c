"""What callers outside the agent use instead of its private parts: recording a decision."""

from __future__ import annotations

import json
from pathlib import Path

from m2mpay.agents.policy.engine import Decision
from m2mpay.agents.user.agent import UserAgent


def test_record_decision_appends_to_the_decision_log(tmp_path: Path) -> None:
    """``run`` and the demo log their refill and offer choices through the public method."""
    agent = UserAgent(tmp_path / "wallet", clock=lambda: 1_800_000_123.9)
    try:
        refill = Decision(True, "refill", "below the threshold", {"coins": 2})
        agent.record_decision("refill", refill)
        agent.record_decision("choose", Decision(False, "no_offer", "no vendor answered"))
    finally:
        agent.close()
    lines = (tmp_path / "wallet" / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"ts": 1_800_000_123, "action": "refill", "allowed": True, "reason": "refill",
         "message": "below the threshold", "coins": 2},
        {"ts": 1_800_000_123, "action": "choose", "allowed": False, "reason": "no_offer",
         "message": "no vendor answered"},
    ]
    assert (tmp_path / "wallet" / "decisions.jsonl").stat().st_mode & 0o777 == 0o600
