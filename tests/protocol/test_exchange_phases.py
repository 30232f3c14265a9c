"""Keyset phases: what each allows, how dates and retirements move them, and that no announcement
moves them back or takes a promised redeem window away."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import KeysetInfo, keyset_id
from m2mpay.protocol.messages.exchange import KeysetPhase
from m2mpay.protocol.rules import exchange as rules
from m2mpay.protocol.rules.exchange import Phase, Use

W, S = 1_000, 2_000  # withdraw_until, spend_until


def _info(value: int = 8, n: int = 8, withdraw_until: int = W, spend_until: int = S) -> KeysetInfo:
    key = hashlib.sha256(f"{value}/{n}/{withdraw_until}".encode()).digest() * 7
    return KeysetInfo(id=keyset_id(value, n, "EUR", withdraw_until, spend_until, key), value=value, n=n,
                      currency="EUR", withdraw_until=withdraw_until, spend_until=spend_until, public_key=key)


INFO = _info()


def _record(phase: str = "active", withdraw_until: int = W, redeem_until: int = S + 500,
            retired: int | None = None, keyset: str = INFO.id) -> KeysetPhase:
    return KeysetPhase(keyset=keyset, phase=phase, withdraw_until=withdraw_until, redeem_until=redeem_until,
                       retired=retired)


def _code(call: object, *args: object) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.code


@pytest.mark.parametrize(("now", "record", "phase"), [
    (W, None, Phase.ACTIVE),
    (W + 1, None, Phase.SPEND_ONLY),
    (S, None, Phase.SPEND_ONLY),
    (S + 1, None, Phase.CLOSED),  # no record: closed right after spend_until, as before phases
    (S + 1, _record(), Phase.EXCHANGE_ONLY),
    (S + 500, _record(), Phase.EXCHANGE_ONLY),
    (S + 501, _record(), Phase.CLOSED),
    (10, _record("spend-only", withdraw_until=5, retired=5), Phase.SPEND_ONLY),  # retired: at once
    (10, _record(withdraw_until=5), Phase.SPEND_ONLY),  # dates run on without a new announcement
    (10, _record("closed"), Phase.CLOSED),
])
def test_phase_at(now: int, record: KeysetPhase | None, phase: Phase) -> None:
    assert rules.phase_at(INFO, record, now) is phase


def test_each_phase_allows_exactly_its_table_row() -> None:
    rows = {Phase.ACTIVE: set(Use), Phase.SPEND_ONLY: {Use.SPEND, Use.EXCHANGE},
            Phase.EXCHANGE_ONLY: {Use.EXCHANGE}, Phase.CLOSED: set()}
    records = {Phase.ACTIVE: _record(), Phase.SPEND_ONLY: _record("spend-only"),
               Phase.EXCHANGE_ONLY: _record("exchange-only"), Phase.CLOSED: _record("closed")}
    for phase, record in records.items():
        for use in Use:
            if use in rows[phase]:
                assert rules.require(INFO, record, 10, use) is phase
            else:
                assert _code(rules.require, INFO, record, 10, use) is ErrorCode.KEYSET_EXPIRED


@given(withdraw=st.integers(0, 50), retired=st.none() | st.integers(0, 3000), phase=st.sampled_from(
    ["active", "spend-only", "exchange-only", "closed"]), redeem=st.integers(0, 1000),
    times=st.lists(st.integers(0, 5000), min_size=2, max_size=6))
def test_phase_never_moves_back_in_time(withdraw: int, retired: int | None, phase: str, redeem: int,
                                        times: list[int]) -> None:
    record = _record(phase, withdraw_until=withdraw, redeem_until=S + redeem,
                     retired=None if retired is None else max(retired, withdraw))
    ranks = [rules.phase_at(INFO, record, t).rank for t in sorted(times)]
    assert ranks == sorted(ranks)


def test_retire() -> None:
    record = rules.retire(INFO, None, 600)
    assert record == KeysetPhase(keyset=INFO.id, phase="spend-only", withdraw_until=600,
                                 redeem_until=S + rules.REDEEM_GRACE, retired=600)
    assert rules.retire(INFO, record, 700) == record  # the first retirement stands
    late = rules.retire(INFO, None, S + 10)  # retired after spending ended: exchange-only
    assert (late.phase, late.withdraw_until) == ("exchange-only", W)
    assert _code(rules.retire, INFO, None, 600, S - 1) is ErrorCode.BAD_REQUEST  # exchanges before spending ends


def test_check_phase_fits_the_keyset() -> None:
    rules.check_phase(INFO, _record())
    assert _code(rules.check_phase, INFO, _record(withdraw_until=W + 1)) is ErrorCode.BAD_REQUEST
    assert _code(rules.check_phase, INFO, _record(redeem_until=S - 1)) is ErrorCode.BAD_REQUEST
    assert _code(rules.check_phase, INFO, _record(keyset="ks-other")) is ErrorCode.BAD_REQUEST


def test_follow_phase_refuses_every_rollback() -> None:
    old = _record("spend-only", withdraw_until=600, retired=600)
    assert rules.follow_phase(None, old) == old
    assert rules.follow_phase(old, _record("exchange-only", withdraw_until=600, redeem_until=S + 900)).phase == (
        "exchange-only")
    for new in (_record("active", withdraw_until=600), _record("spend-only", withdraw_until=600, redeem_until=S),
                _record("spend-only", withdraw_until=700)):
        assert _code(rules.follow_phase, old, new) is ErrorCode.PHASE_ROLLBACK


def test_follow_phases_over_an_announcement() -> None:
    other = _info(16, 16)
    known = {INFO.id: _record("spend-only", withdraw_until=600, retired=600)}
    rollback = _record("active")
    merged, refused = rules.follow_phases(known, [INFO, other], [rollback])
    assert merged == known and refused == (INFO.id,)  # kept, and reported
    merged, refused = rules.follow_phases(known, [INFO, other], [])
    assert merged == known and refused == ()  # no record: keep the last one
    fresh = KeysetPhase(keyset=other.id, phase="active", withdraw_until=W, redeem_until=S)
    merged, _ = rules.follow_phases({}, [INFO, other], [fresh])
    assert merged == {other.id: fresh}
    assert _code(rules.follow_phases, {}, [other], [rollback]) is ErrorCode.BAD_REQUEST  # unlisted keyset
    assert _code(rules.follow_phases, {}, [INFO], [rollback, rollback]) is ErrorCode.BAD_REQUEST  # twice
    assert _code(rules.follow_phases, {}, [INFO], [_record(redeem_until=S - 1)]) is ErrorCode.BAD_REQUEST
