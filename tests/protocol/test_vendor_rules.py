"""The vendor's session and outbox rules, with no I/O: every transition, the tables' totality, the
two-phase changes, and when an unanswered settlement is sent again (pure functions of time).

The vendor core runs back to back with the in-memory bank of :mod:`.world`; "the network" is a
function that delivers a request or loses it (or its answer).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from m2mpay.protocol import envelope, hashchain
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Pay, SettleAnswer, StatusAnswer
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.settlement import TRANSITIONS as ENTRY_TRANSITIONS
from m2mpay.protocol.rules.settlement import (
    NoAnswer,
    RetryPolicy,
    Settlement,
    SettlementEvent,
    SettlementState,
    after_status,
    retry_delay,
)
from m2mpay.protocol.rules.vendor import TRANSITIONS, Change, SessionEvent, SessionState, VendorSession

from .flows import T, authorize, block, make_offer, open_session, withdraw
from .world import BANK, NOW, LocalBank, Vendor

POLICY = RetryPolicy(first=1.0, cap=60.0, margin=60, urgent_cap=5.0, jitter=0.5)
Result = SettleAnswer | StatusAnswer | envelope.Refusal | NoAnswer


# --- a session without a bank ---------------------------------------------------------------

SEED = b"\x07" * 32


def token(i: int) -> bytes:
    return hashchain.iterate(SEED, i)


def restored(position: int = 90, *, settlements: tuple[Settlement, ...] = (), deadline: int = T) -> VendorSession:
    return VendorSession.restore("meter", session=b"s" * 16, tip=token(100), token_value=1, start=99,
                                 position=position, last=token(position), deadline=deadline, credited=0,
                                 last_paid=NOW, settlements=settlements)


def entry(session: VendorSession, *, keep_open: bool = False, deadline: int = T) -> Settlement:
    return Settlement(session.settlement_request(os.urandom(16), keep_open=keep_open), b"signed", deadline)


def answered(session: VendorSession, req_id: bytes, credited: int = 0) -> SettleAnswer:
    return SettleAnswer(req_id=req_id, session=session.session or b"", credited=credited,
                        position=session.position, spent=False, open=False)


def feed(session: VendorSession, req_id: bytes, result: Result, *, mono: float = 0.0, now: int = NOW,
         draw: float = 0.5) -> Change | None:
    return session.attempt_done(req_id, result, raw=b"answer", policy=POLICY, mono=mono, now=now, draw=draw)


def queue(session: VendorSession, *, keep_open: bool = False) -> Settlement:
    change = session.prepare_settlement(session.settlement_request(os.urandom(16), keep_open=keep_open), b"signed")
    session.commit(change)
    assert change.settlement is not None
    return change.settlement


# --- the tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("state", list(SettlementState), ids=lambda s: s.value)
@pytest.mark.parametrize("event", list(SettlementEvent), ids=lambda e: e.value)
def test_settlement_table_pairs_move_or_poison(state: SettlementState, event: SettlementEvent) -> None:
    item = entry(restored())
    item.state = state
    if (state, event) in ENTRY_TRANSITIONS:
        item.move(event)
        assert item.state is ENTRY_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(LocalProtocolError):
            item.move(event)
        assert item.state is SettlementState.ERROR  # poisoned: refuses further use
        with pytest.raises(LocalProtocolError):
            item.move(SettlementEvent.SEND)


def _reachable(table: dict[tuple[object, object], object], start: object) -> set[object]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for (state, _), nxt in table.items():
            if state == here and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_tables_reach_every_state_and_terminal_states_only_answer_closes() -> None:
    assert _reachable(TRANSITIONS, SessionState.OFFERED) == set(SessionState) - {SessionState.ERROR}  # type: ignore[arg-type]
    assert _reachable(ENTRY_TRANSITIONS, SettlementState.QUEUED) == set(SettlementState) - {SettlementState.ERROR}  # type: ignore[arg-type]
    for terminal in (SessionState.CLOSED, SessionState.FORFEITED):
        assert {e for (s, e) in TRANSITIONS if s is terminal} == {SessionEvent.CLOSE}
        assert TRANSITIONS[(terminal, SessionEvent.CLOSE)] is terminal  # a retried close: the same receipt
    for done in (SettlementState.ANSWERED, SettlementState.REFUSED, SettlementState.ERROR):
        assert not [e for (s, e) in ENTRY_TRANSITIONS if s is done]
    # the network never ends an entry: no answer always leads back to the queue (or to nothing new)
    for (state, event), nxt in ENTRY_TRANSITIONS.items():
        if event is SettlementEvent.NO_ANSWER:
            assert nxt in (SettlementState.QUEUED, SettlementState.SUPERSEDED)
            assert nxt in (state, SettlementState.QUEUED)


# --- two-phase changes ----------------------------------------------------------------------

def test_pay_is_two_phase_nothing_moves_until_commit() -> None:
    session = restored(90)
    change = session.prepare_pay(Pay(index=88, token=token(88)), NOW)
    assert isinstance(change, Change) and change.tokens == 2 and change.receipt is not None
    assert (session.position, session.last, session.paid) == (90, token(90), 9)  # not yet
    with pytest.raises(LocalProtocolError):
        session.prepare_pay(Pay(index=87, token=token(87)), NOW)  # one change at a time
    session.abort(change)  # the write failed
    assert (session.position, session.last, session.state) == (90, token(90), SessionState.OPEN)
    with pytest.raises(LocalProtocolError):
        session.commit(change)  # an aborted change never lands
    again = session.prepare_pay(Pay(index=88, token=token(88)), NOW + 5)  # the user's retry
    assert isinstance(again, Change)
    session.commit(again)
    assert (session.position, session.last, session.paid, session.last_paid) == (88, token(88), 11, NOW + 5)
    assert session.prepare_pay(Pay(index=88, token=token(88)), NOW) == again.receipt  # duplicate: nothing to write


def test_pay_refusals_leave_the_session_as_it_was() -> None:
    session = restored(90)
    for pay, now, code in [(Pay(index=89, token=os.urandom(32)), NOW, ErrorCode.CHAIN_MISMATCH),
                           (Pay(index=91, token=token(91)), NOW, ErrorCode.REPLAY),
                           (Pay(index=89, token=token(89)), T, ErrorCode.DEADLINE)]:
        with pytest.raises(RemoteProtocolError) as info:
            session.prepare_pay(pay, now)
        assert info.value.code is code
        assert (session.position, session.state) == (90, SessionState.OPEN)


def test_close_is_two_phase_and_queued_once() -> None:
    session = restored(90)
    checkpoint = queue(session, keep_open=True)
    request = session.settlement_request(os.urandom(16), keep_open=False)
    change = session.prepare_settlement(request, b"signed")
    assert change.queues and change.state is SessionState.CLOSING and change.superseded == (checkpoint,)
    assert session.state is SessionState.OPEN and session.final is None and checkpoint.live  # not yet
    session.abort(change)
    assert session.state is SessionState.OPEN and request.req_id not in session.settlements
    change = session.prepare_settlement(request, b"signed")
    session.commit(change)
    assert session.state is SessionState.CLOSING and session.final is change.settlement
    assert checkpoint.state is SettlementState.SUPERSEDED
    with pytest.raises(LocalProtocolError):  # the same request id is never queued twice
        session.prepare_settlement(request, b"signed")
    with pytest.raises(LocalProtocolError):  # nor a second final settlement
        session.prepare_settlement(session.settlement_request(os.urandom(16), keep_open=False), b"signed")
    receipt = session.close(NOW)  # the user's retried close: the same settlement, still pending
    assert receipt.pending and receipt.index == 90 and session.state is SessionState.CLOSING
    assert session.prepare_pay(Pay(index=90, token=token(90)), NOW).index == 90  # a retransmitted token
    with pytest.raises(RemoteProtocolError) as info:
        session.prepare_pay(Pay(index=89, token=token(89)), NOW)
    assert info.value.code is ErrorCode.SESSION_CLOSED


def test_outcome_is_two_phase() -> None:
    session = restored(90)
    final = queue(session)
    final.start(SettlementEvent.SEND)
    change = feed(session, final.req_id, answered(session, final.req_id, 9))
    assert change is not None and change.state is SessionState.CLOSED and change.answer == b"answer"
    assert session.state is SessionState.CLOSING and final.state is SettlementState.SENDING  # not yet
    session.abort(change)
    assert session.state is SessionState.CLOSING and final.state is SettlementState.SENDING
    session.commit(feed(session, final.req_id, answered(session, final.req_id, 9)))  # type: ignore[arg-type]
    assert session.state is SessionState.CLOSED and final.state is SettlementState.ANSWERED and session.done
    closed = session.close(NOW)
    assert closed.pending is None and closed.credited == 9


# --- transitions through the API, back to back with the bank ----------------------------------

def attempt(bank: LocalBank, vendor: Vendor, session: VendorSession, item: Settlement, event: SettlementEvent,
            now: int, *, mono: float = 0.0, lose: str | None = None) -> Change | None:
    """One attempt as the agent makes it; ``lose`` = "request" or "answer" drops that leg."""
    item.start(event)
    kind: type[SettleAnswer] | type[StatusAnswer] = SettleAnswer
    op, signed = "settle", item.signed
    if event is SettlementEvent.CHECK:
        op, signed, kind = "status", vendor.sign(session.status_request(os.urandom(16)), "status"), StatusAnswer
    result: Result
    raw = b""
    if lose == "request":
        result = NoAnswer("lost")
    else:
        raw = bank.handle(op, signed, now)
        if lose == "answer":
            result = NoAnswer("lost")
        else:
            try:
                result = envelope.open_answer(raw, bank.answer_key.public_key(), BANK, op, kind, request=signed)
            except envelope.Refusal as refusal:
                result = refusal
    return session.attempt_done(item.req_id, result, raw=raw, policy=POLICY, mono=mono, now=now, draw=0.5)


def close(vendor: Vendor, session: VendorSession) -> Settlement:
    request = session.settlement_request(os.urandom(16), keep_open=False)
    change = session.prepare_settlement(request, vendor.sign(request, "settle"))
    session.commit(change)
    assert change.settlement is not None
    return change.settlement


def paid(session: VendorSession, wc: wallet.WalletCoin, tokens: int, now: int = NOW) -> wallet.WalletCoin:
    wc, message = wallet.reveal(wc, tokens)
    session.pay(message, now)
    return wc


def test_open_refused_for_good_frees_the_offer(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session = VendorSession(make_offer(vendor, bank.keyring()), bank.keyring(), vendor.name)
    wc, request = authorize(bank, wc, session.offer)
    session.open(request, os.urandom(16), NOW)
    error = session.open_failed(envelope.Refusal("coin is spent", ErrorCode.COIN_SPENT))
    assert error.code is ErrorCode.COIN_SPENT and session.state is SessionState.CLOSED and session.offer_reusable


@pytest.mark.parametrize("result", [NoAnswer("timeout"), envelope.Refusal("db down", ErrorCode.INTERNAL),
                                    envelope.Refusal("busy", ErrorCode.UNAVAILABLE)], ids=["none", "internal", "busy"])
def test_open_unanswered_keeps_the_offer_used(bank: LocalBank, result: envelope.Refusal | NoAnswer) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session = VendorSession(make_offer(vendor, bank.keyring()), bank.keyring(), vendor.name)
    wc, request = authorize(bank, wc, session.offer)
    block(bank, vendor, session.open(request, os.urandom(16), NOW))  # blocked: only the answer was lost
    error = session.open_failed(result)
    assert error.code is ErrorCode.UNAVAILABLE and session.state is SessionState.CLOSED
    assert not session.offer_reusable  # the coin may be blocked under this offer


def test_settlement_survives_any_number_of_lost_attempts(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = paid(session, wc, 9)
    final = close(vendor, session)
    mono, waits = 0.0, []
    for n in range(12):  # requests and answers lost, the bank applying some of them
        assert final.next_event(mono, NOW) is SettlementEvent.SEND
        assert attempt(bank, vendor, session, final, SettlementEvent.SEND, NOW, mono=mono,
                       lose="answer" if n % 3 == 2 else "request") is None
        assert final.state is SettlementState.QUEUED and session.state is SessionState.CLOSING
        assert final.next_event(mono, NOW) is None  # not before its wait
        waits.append(final.due_at - mono)
        mono = final.due_at
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]  # doubling, capped (T is far)
    change = attempt(bank, vendor, session, final, SettlementEvent.SEND, NOW, mono=mono)
    assert change is not None and change.event is SessionEvent.SETTLED
    session.commit(change)
    assert session.closed(NOW).credited == 10 == bank.balances[vendor.account]  # once, whatever was lost


def test_final_refusal_forfeits_and_refused_checkpoint_goes_on(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = paid(session, wc, 4)
    checkpoint = queue_signed(vendor, session, keep_open=True)
    change = attempt(bank, vendor, session, checkpoint, SettlementEvent.SEND, NOW)
    assert change is not None and change.event is SessionEvent.CHECKPOINTED
    session.commit(change)
    assert session.credited == 5 and session.state is SessionState.OPEN
    again = queue_signed(vendor, session, keep_open=True)  # nothing new since: the bank refuses it
    change = attempt(bank, vendor, session, again, SettlementEvent.SEND, NOW)
    assert change is not None and change.event is SessionEvent.SETTLEMENT_REFUSED
    session.commit(change)
    assert again.state is SettlementState.REFUSED and session.state is SessionState.OPEN
    final = close(vendor, session)
    # another session took the coin meanwhile (as after a lapse): the bank refuses this one for good
    bank.coins[session.tip] = dataclasses.replace(bank.coins[session.tip], session=b"x" * 16)
    change = attempt(bank, vendor, session, final, SettlementEvent.SEND, NOW)
    assert change is not None and change.event is SessionEvent.FORFEIT
    assert change.settlement_state is SettlementState.REFUSED
    session.commit(change)
    assert session.state is SessionState.FORFEITED and session.done
    assert session.closed(NOW).pending is None


def queue_signed(vendor: Vendor, session: VendorSession, *, keep_open: bool) -> Settlement:
    request = session.settlement_request(os.urandom(16), keep_open=keep_open)
    change = session.prepare_settlement(request, vendor.sign(request, "settle"))
    session.commit(change)
    assert change.settlement is not None
    return change.settlement


def test_late_settlement_asks_the_status_first(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = paid(session, wc, 9)
    final = close(vendor, session)
    assert attempt(bank, vendor, session, final, SettlementEvent.SEND, NOW, lose="request") is None
    bank.sweep(T + 1)  # the block lapses: credited what the bank saw (the blocking token)
    assert bank.balances[vendor.account] == 1
    assert final.next_event(final.due_at, T + 1) is SettlementEvent.CHECK
    assert attempt(bank, vendor, session, final, SettlementEvent.CHECK, T + 1, mono=final.due_at) is None
    assert final.state is SettlementState.QUEUED and final.cleared  # still ours: send it
    assert final.next_event(final.due_at, T + 1) is SettlementEvent.SEND
    change = attempt(bank, vendor, session, final, SettlementEvent.SEND, T + 2)
    assert change is not None
    session.commit(change)
    assert session.closed(NOW).credited == 10 == bank.balances[vendor.account]


@pytest.mark.parametrize("sent", [False, True], ids=["never-sent", "maybe-sent"])
def test_late_settlement_after_another_block(bank: LocalBank, sent: bool) -> None:
    (wc,) = withdraw(bank)
    first, second = bank.enroll("meter", "parking"), bank.enroll("kiosk", "parking")
    wc, session = open_session(bank, first, wc)
    wc = paid(session, wc, 9)
    final = close(first, session)
    if sent:  # an attempt that may have reached the bank
        assert attempt(bank, first, session, final, SettlementEvent.SEND, NOW, lose="request") is None
    wc, _ = open_session(bank, second, wc.expire(T + 1), now=T + 1)  # the second vendor blocked since
    final.due_at = 0.0
    change = attempt(bank, first, session, final, SettlementEvent.CHECK, T + 2)
    if sent:  # only the same bytes could fetch a stored answer: one more send, refused for good
        assert change is None and final.next_event(0.0, T + 2) is SettlementEvent.SEND
        change = attempt(bank, first, session, final, SettlementEvent.SEND, T + 2)
    assert change is not None and change.event is SessionEvent.FORFEIT
    session.commit(change)
    assert session.state is SessionState.FORFEITED and bank.balances[first.account] == 1


def test_chain_attack_the_late_settlement_lands_before_the_next_vendor(bank: LocalBank) -> None:
    """The bank unreachable for A until after T, then the same wallet at B: A is credited what it
    delivered service for, B only for B's own tokens (the wallet never reveals A's again)."""
    (wc,) = withdraw(bank)
    a, b = bank.enroll("meter", "parking"), bank.enroll("kiosk", "parking")
    wc, session = open_session(bank, a, wc)
    wc = paid(session, wc, 10)
    final = close(a, session)
    mono = 0.0
    for now in (NOW, NOW + 300, T - 30, T - 1):  # every attempt before T lost
        assert attempt(bank, a, session, final, SettlementEvent.SEND, now, mono=mono, lose="request") is None
        mono = final.due_at
    bank.sweep(T + 1)
    assert attempt(bank, a, session, final, SettlementEvent.CHECK, T + 2, mono=mono) is None  # still A's
    change = attempt(bank, a, session, final, SettlementEvent.SEND, T + 2, mono=mono)
    assert change is not None
    session.commit(change)
    wc = wc.event(wallet.WalletEvent.CLOSED).expire(T + 3)
    wc, other = open_session(bank, b, wc, now=T + 3)
    wc = paid(other, wc, 5, T + 3)
    request = other.settle_request(os.urandom(16), keep_open=False)
    signed = b.sign(request, "settle")
    other.settled(envelope.open_answer(bank.handle("settle", signed, T + 4), bank.answer_key.public_key(), BANK,
                                       "settle", SettleAnswer, request=signed))
    assert bank.balances[a.account] == 11  # the blocking token and the 10 tokens A delivered for
    assert bank.balances[b.account] == 6  # B's own: its blocking token and 5
    bank.audit()


def test_restore_reads_sessions_back() -> None:
    closing = restored(80)
    final = entry(closing)
    again = restored(80, settlements=(Settlement(final.request, b"signed", T, sent=True),))
    assert again.state is SessionState.CLOSING and again.final is not None and again.final.sent
    assert again.closed(NOW).pending and again.close(NOW).index == 80
    assert again.due_attempts(0.0, NOW) == [(again.final, SettlementEvent.SEND)]
    assert again.due_attempts(0.0, T) == [(again.final, SettlementEvent.CHECK)]
    open_ = restored(80)
    assert open_.state is SessionState.OPEN and not open_.checkpoint_due(1)  # nothing new since restart
    assert open_.close_due(NOW, margin=60, idle=120) is False
    assert open_.close_due(NOW + 120, margin=60, idle=120) and open_.close_due(T - 60, margin=60, idle=10_000)
    with pytest.raises(LocalProtocolError):
        VendorSession.restore("meter", session=b"t" * 16, tip=b"", token_value=1, start=1, position=0, last=b"",
                              deadline=T, credited=0, last_paid=0, settlements=(final,))


# --- when to send again: pure functions of time ------------------------------------------------

def test_retry_delay_doubles_up_to_the_cap_when_the_deadline_is_far() -> None:
    far = NOW + 100_000
    waits = [retry_delay(POLICY, n, NOW, far, 0.5) for n in range(1, 10)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_retry_delay_is_urgent_near_and_after_the_deadline() -> None:
    assert retry_delay(POLICY, 8, T - 61, T, 0.5) == pytest.approx(30.5)  # half the time left
    assert retry_delay(POLICY, 8, T - 60, T, 0.5) == 5  # within the margin
    assert retry_delay(POLICY, 8, T - 4, T, 0.5) == 2  # never past T: half of what is left
    assert retry_delay(POLICY, 8, T - 1, T, 0.5) == 1  # but never below the first wait
    assert retry_delay(POLICY, 8, T + 3600, T, 0.5) == 5  # late: another block may come any time
    assert retry_delay(POLICY, 1, T + 3600, T, 0.5) == 1


def test_retry_delay_jitter_and_bad_input() -> None:
    assert retry_delay(POLICY, 3, NOW, NOW + 100_000, 0.0) == 3.0
    assert retry_delay(POLICY, 3, NOW, NOW + 100_000, 0.999) == pytest.approx(4.998)
    for failures, draw in [(0, 0.5), (1, 1.0), (1, -0.1)]:
        with pytest.raises(LocalProtocolError):
            retry_delay(POLICY, failures, NOW, T, draw)
    with pytest.raises(LocalProtocolError):
        RetryPolicy(first=0)


@given(failures=st.integers(1, 10_000), now=st.integers(NOW - 10**6, NOW + 10**6),
       draw=st.floats(0, 1, exclude_max=True))
def test_retry_delay_is_bounded_and_meets_the_deadline(failures: int, now: int, draw: float) -> None:
    wait = retry_delay(POLICY, failures, now, T, draw)
    assert 0 < wait <= POLICY.cap * (1 + POLICY.jitter / 2)
    if now < T:
        assert wait <= max(POLICY.first, (T - now) / 2) * (1 + POLICY.jitter / 2)
    if now >= T - POLICY.margin:
        assert wait <= POLICY.urgent_cap * (1 + POLICY.jitter / 2)


@given(st.lists(st.sampled_from(["none", "internal", "unavailable"]), min_size=1, max_size=40))
def test_no_answer_is_never_final(outcomes: list[str]) -> None:
    session = restored(90)
    final = queue(session)
    mono = 0.0
    for outcome in outcomes:
        event = final.next_event(mono, NOW)
        assert event is SettlementEvent.SEND
        final.start(event)
        result: Result = NoAnswer("lost") if outcome == "none" else envelope.Refusal(
            outcome, ErrorCode.INTERNAL if outcome == "internal" else ErrorCode.UNAVAILABLE)
        assert feed(session, final.req_id, result, mono=mono) is None
        assert final.state is SettlementState.QUEUED and final.due_at > mono
        mono = final.due_at
    assert session.state is SessionState.CLOSING and final.failures == len(outcomes)


def test_next_event_checks_only_final_settlements_past_t() -> None:
    session = restored(90)
    checkpoint = queue(session, keep_open=True)
    assert checkpoint.next_event(0.0, T + 5) is SettlementEvent.SEND  # the bank refuses it itself
    final = queue(session)
    assert final.next_event(0.0, T - 1) is SettlementEvent.SEND and final.next_event(0.0, T) is SettlementEvent.CHECK
    final.due_at = 10.0
    assert final.next_event(9.99, T) is None and final.next_event(10.0, T) is SettlementEvent.CHECK
    status = StatusAnswer(req_id=os.urandom(16), tip=token(100), known=True, position=90, session=b"s" * 16)
    assert after_status(status, b"s" * 16, sent=False) is SettlementEvent.LATE_OK
    other = StatusAnswer(req_id=os.urandom(16), tip=token(100), known=False)
    assert after_status(other, b"s" * 16, sent=False) is SettlementEvent.LATE_REFUSED
    assert after_status(other, b"s" * 16, sent=True) is SettlementEvent.LATE_OK


# --- the document draws the tables ------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
_STATES = re.compile(r"(<!-- vendor-states:begin -->\n)(.*?)(<!-- vendor-states:end -->)", re.S)


def _diagram(table: dict[tuple[Any, Any], Any]) -> str:
    lines = ["stateDiagram-v2"]
    for (state, event), nxt in table.items():
        lines.append(f"    {state.value} --> {nxt.value}: {event.value}")
    return "```mermaid\n" + "\n".join(lines) + "\n```\n"


def test_protocol_doc_draws_the_vendor_tables() -> None:
    """docs/PROTOCOL.md's state diagrams come from the tables; to redraw them after a change:
    ``M2MPAY_WRITE_DOCS=1 .venv/bin/python -m pytest tests/protocol/test_vendor_rules.py``."""
    drawn = ("A session:\n\n" + _diagram(TRANSITIONS)  # type: ignore[arg-type]
             + "\nAn outbox entry:\n\n" + _diagram(ENTRY_TRANSITIONS))  # type: ignore[arg-type]
    text = DOC.read_text()
    found = _STATES.search(text)
    assert found is not None, "docs/PROTOCOL.md has no vendor-states section"
    if os.environ.get("M2MPAY_WRITE_DOCS") == "1":
        DOC.write_text(text[:found.start(2)] + drawn + text[found.end(2):])
        return
    assert found.group(2) == drawn, "the vendor state diagrams in docs/PROTOCOL.md differ from the tables"
