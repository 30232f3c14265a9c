"""A vendor's payment session as a pure state machine: offer → open → pay* → close → settled.

The vendor agent feeds it what arrives (an open request, the bank's answers, tokens, a close)
with the current time, writes what it hands back, and sends what it returns. :data:`TRANSITIONS`
is the whole life of a session; any other (state, event) pair raises and leaves the session in
``ERROR`` (h11's rule: after a protocol error the session refuses further use, except ``pay`` and
``open``, whose refusals concern only the peer's input and leave the session as it was).

Changes that must survive a crash are **two-phase**. ``prepare_*`` checks and returns a
:class:`Change` without moving anything; the agent writes it; :meth:`VendorSession.commit`
applies it (or :meth:`VendorSession.abort` drops it when the write failed, and the session is as
it was: no state to restore). Only one change is pending at a time. Which changes those are:

- a token paid (``PAY``): on disk before its receipt leaves;
- a settlement queued (``CLOSE``, ``CHECKPOINT``): its signed bytes in the outbox before they are
  sent, the session ``closing`` in the same write; the checkpoints a final settlement covers are
  superseded in it;
- a settlement's outcome (``CHECKPOINTED``, ``SETTLED``, ``SETTLEMENT_REFUSED``, ``FORFEIT``).

Every settlement is an outbox entry (:class:`~m2mpay.protocol.rules.settlement.Settlement`) sent until
the bank answers it or refuses it for good; the network's failures are never final. Ending a
session needs no answer from the bank: once the final settlement is written the session is
``CLOSING`` (the tokens are the vendor's), and its receipt says ``pending`` until the bank answers.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from .. import hashchain
from ..envelope import Refusal
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages import (
    BlockAnswer,
    BlockRequest,
    Due,
    FinalReceipt,
    Offer,
    OpenSession,
    Pay,
    Receipt,
    SessionOpened,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
)
from .keyring import Keyring
from .pricing import tokens_owed, units_paid
from .settlement import NoAnswer, RetryPolicy, Settlement, SettlementEvent, SettlementState, after_status

__all__ = ["TRANSITIONS", "Change", "SessionEvent", "SessionState", "VendorSession"]


class SessionState(enum.Enum):
    """The states of a vendor's session."""

    OFFERED = "offered"
    OPENING = "opening"  # block sent to the bank, answer awaited
    OPEN = "open"
    CLOSING = "closing"  # final settlement in the outbox, unanswered: the tokens are ours
    CLOSED = "closed"  # settled (or never opened)
    FORFEITED = "forfeited"  # the bank refused the final settlement for good
    ERROR = "error"


class SessionEvent(enum.Enum):
    """What moves a session."""

    OPEN_REQUEST = "open_request"
    BLOCKED = "blocked"
    REFUSED = "refused"  # the bank refused the block (final): nothing is blocked
    UNANSWERED = "unanswered"  # no answer to the block: the coin may be blocked
    DUE = "due"
    PAY = "pay"
    CHECKPOINT = "checkpoint"
    CHECKPOINTED = "checkpointed"
    CLOSE = "close"
    SETTLED = "settled"
    SETTLEMENT_REFUSED = "settlement_refused"  # one entry refused; the session goes on
    FORFEIT = "forfeit"


S, E = SessionState, SessionEvent
TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.OFFERED, E.OPEN_REQUEST): S.OPENING,
    (S.OPENING, E.BLOCKED): S.OPEN,
    (S.OPENING, E.REFUSED): S.CLOSED,
    (S.OPENING, E.UNANSWERED): S.CLOSED,
    (S.OPEN, E.DUE): S.OPEN,
    (S.OPEN, E.PAY): S.OPEN,
    (S.OPEN, E.CHECKPOINT): S.OPEN,
    (S.OPEN, E.CHECKPOINTED): S.OPEN,
    (S.OPEN, E.SETTLEMENT_REFUSED): S.OPEN,  # a checkpoint refused
    (S.OPEN, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.PAY): S.CLOSING,  # a retransmitted token still gets its receipt
    (S.CLOSING, E.CLOSE): S.CLOSING,  # a retried close: the same settlement, still pending
    (S.CLOSING, E.CHECKPOINTED): S.CLOSING,  # entries read back from disk: a checkpoint the close
    (S.CLOSING, E.SETTLEMENT_REFUSED): S.CLOSING,  # did not supersede, or one of several finals
    (S.CLOSING, E.SETTLED): S.CLOSED,
    (S.CLOSING, E.FORFEIT): S.FORFEITED,
    (S.CLOSED, E.CLOSE): S.CLOSED,  # a retried close: the same receipt
    (S.FORFEITED, E.CLOSE): S.FORFEITED,
}

@dataclass(frozen=True, slots=True)
class Change:
    """A change the core has decided; the agent writes it, then :meth:`VendorSession.commit`.

    What to write: for ``PAY`` the token (``position``, ``last``, at ``at``); otherwise the
    session's ``state`` and ``credited``, the ``settlement`` entry (new for ``CLOSE`` and
    ``CHECKPOINT``, finished as ``settlement_state`` with the bank's ``answer`` bytes otherwise)
    and the ``superseded`` entries.
    """

    event: SessionEvent
    state: SessionState
    position: int
    last: bytes
    credited: int
    at: int = 0
    tokens: int = 0
    """Tokens newly paid (``PAY``)."""
    receipt: Receipt | None = None
    settlement: Settlement | None = None
    settlement_event: SettlementEvent | None = None
    settlement_state: SettlementState | None = None
    answer: bytes | None = None
    superseded: tuple[Settlement, ...] = ()

    @property
    def queues(self) -> bool:
        """Whether this change writes a new outbox entry."""
        return self.event in (SessionEvent.CLOSE, SessionEvent.CHECKPOINT)


class VendorSession:
    """One payment session at a vendor. Not thread-safe; one per coin being paid with."""

    def __init__(self, offer: Offer, keyring: Keyring, vendor: str) -> None:
        self._blank(vendor)
        self._offer: Offer | None = offer
        self._keyring: Keyring | None = keyring
        self.deadline = offer.deadline
        self.price = offer.price

    def _blank(self, vendor: str) -> None:
        self.vendor = vendor
        self.state = SessionState.OFFERED
        self.request: BlockRequest | None = None
        self.session: bytes | None = None
        self.tip = b""
        self.token_value = 0
        self.start = 0
        self.position = 0
        self.last = b""
        self.deadline = 0
        self.price = 0
        """Money per unit (the offer's); 0 for a session read back from disk, which is never metered."""
        self.metered = 0
        """Units of service the meter has counted."""
        self.seq = 0
        self.credited = 0
        self.last_paid = 0
        self.checkpointed = 0
        """``paid`` when the last checkpoint was queued."""
        self.settlements: dict[bytes, Settlement] = {}
        self.final: Settlement | None = None
        self.offer_reusable = False
        """After the bank refused the block: nothing was blocked under the offer."""
        self._pending: Change | None = None
        self._offer = None
        self._keyring = None

    @property
    def offer(self) -> Offer:
        """The offer this session was opened under (a session read back from disk has none)."""
        if self._offer is None:
            raise LocalProtocolError("a session read back from disk has no offer")
        return self._offer

    @classmethod
    def restore(cls, vendor: str, *, session: bytes, tip: bytes, token_value: int, start: int, position: int,
                last: bytes, deadline: int, credited: int, last_paid: int,
                settlements: Iterable[Settlement] = ()) -> VendorSession:
        """A session read back after a restart, with its unanswered outbox entries (oldest first).

        With a final settlement among them it is ``CLOSING``; otherwise ``OPEN``.
        """
        s = cls.__new__(cls)
        s._blank(vendor)  # noqa: SLF001 - the class's own alternate constructor
        s.session, s.tip, s.token_value, s.start = session, tip, token_value, start
        s.position, s.last, s.deadline, s.credited, s.last_paid = position, last, deadline, credited, last_paid
        s.checkpointed = s.paid
        for entry in settlements:
            if entry.request.session != session:
                raise LocalProtocolError("settlement of another session")
            s.settlements[entry.req_id] = entry
            if not entry.keep_open:
                s.final = entry  # the newest; older ones (written by earlier versions) are still sent
        s.state = SessionState.CLOSING if s.final is not None else SessionState.OPEN
        return s

    # --- the table -------------------------------------------------------------------------
    def _after(self, event: SessionEvent) -> SessionState:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            previous, self.state = self.state, SessionState.ERROR
            raise LocalProtocolError(f"{event.value} not allowed in state {previous.value}")
        return nxt

    def _move(self, event: SessionEvent) -> None:
        self.state = self._after(event)

    def _propose(self, change: Change) -> Change:
        if self._pending is not None:
            raise LocalProtocolError(f"a {self._pending.event.value} is still being written")
        self._pending = change
        return change

    def commit(self, change: Change) -> None:
        """Apply ``change`` once the agent has written it."""
        if change is not self._pending:
            raise LocalProtocolError("commit of a change that is not pending")
        self._pending = None
        self._move(change.event)
        if self.state is not change.state:
            raise LocalProtocolError("change decided in another state")
        self.position, self.last, self.credited = change.position, change.last, change.credited
        if change.event is SessionEvent.PAY:
            self.last_paid = max(self.last_paid, change.at)
        entry = change.settlement
        if entry is not None and change.queues:
            self.settlements[entry.req_id] = entry
            if entry.keep_open:
                self.checkpointed = self.paid
            else:
                self.final = entry
        elif entry is not None and change.settlement_event is not None:
            entry.move(change.settlement_event)
        for covered in change.superseded:
            covered.move(SettlementEvent.SUPERSEDE)

    def abort(self, change: Change) -> None:
        """Drop ``change``: it could not be written, and the session stays as it was."""
        if change is self._pending:
            self._pending = None

    # --- reading ---------------------------------------------------------------------------
    @property
    def paid(self) -> int:
        """Tokens received in this session, the blocking token included."""
        return self.start - self.position

    @property
    def owed(self) -> int:
        """Tokens owed for the units metered so far and not yet paid; the blocking token paid the first.

        Never more than the coin has left: that is all a wallet could pay (and keeps ``Due`` in range).
        """
        if self.metered == 0:
            return 0
        return min(self.position, max(0, tokens_owed(self.metered, self.price, self.token_value) - self.paid))

    @property
    def units_paid(self) -> int:
        """Whole units of service the tokens received pay for: what the session has earned."""
        return units_paid(self.paid, self.price, self.token_value) if self.price else 0

    @property
    def done(self) -> bool:
        """Settled or forfeited, nothing left in the outbox: the agent may forget it."""
        return self.state in (SessionState.CLOSED, SessionState.FORFEITED) and not self.live()

    def live(self) -> list[Settlement]:
        """Outbox entries still waiting for the bank."""
        return [e for e in self.settlements.values() if e.live]

    @property
    def session_id(self) -> bytes:
        """The session id the bank gave; only once the coin is blocked."""
        if self.session is None:
            raise LocalProtocolError("session not open yet")
        return self.session

    def receipt(self, index: int | None = None) -> Receipt:
        """The receipt for what the session holds (at ``index`` when given)."""
        index = self.position if index is None else index
        return Receipt(session=self.session_id, index=index, tokens=self.start - index)

    def closed(self, now: int) -> FinalReceipt:
        """The close's receipt, to be signed: ``pending`` while the final settlement is unanswered."""
        index = self.final.request.index if self.final is not None else self.position
        return FinalReceipt(session=self.session_id, tip=self.tip, index=index, tokens=self.start - index,
                            credited=self.credited, pending=True if self.state is SessionState.CLOSING else None,
                            vendor=self.vendor, ts=now)

    # --- opening ---------------------------------------------------------------------------
    def open(self, request: OpenSession, req_id: bytes, now: int) -> BlockRequest:
        """Check an open request against the offer and the coin; return the block to relay."""
        offer, keyring = self.offer, self._keyring
        if keyring is None:
            raise LocalProtocolError("a session read back from disk cannot be opened")
        if request.deadline != offer.deadline or not hmac.compare_digest(request.nonce, offer.nonce):
            raise RemoteProtocolError("deadline or nonce differ from the offer", ErrorCode.BAD_REQUEST)
        if now >= offer.deadline:
            raise RemoteProtocolError("offer expired", ErrorCode.DEADLINE)
        if request.coin.keyset not in offer.keysets:
            raise RemoteProtocolError("keyset not accepted here", ErrorCode.UNKNOWN_KEYSET)
        info = keyring.verify_coin(request.coin, now)
        self._move(SessionEvent.OPEN_REQUEST)
        self.tip, self.token_value = request.coin.tip, info.token_value
        self.request = BlockRequest(cert=offer.cert, coin=request.coin, sealed=request.sealed,
                                    deadline=request.deadline, nonce=request.nonce, req_id=req_id)
        return self.request

    def blocked(self, answer: BlockAnswer, now: int = 0) -> SessionOpened:
        """The bank blocked the coin for us: the session is open.

        Nothing to write first: until the agent has stored the session and made it reachable,
        no token can arrive for it.
        """
        if self.request is None or answer.req_id != self.request.req_id or answer.tip != self.tip:
            raise LocalProtocolError("block answer for another request")
        self._move(SessionEvent.BLOCKED)
        self.session, self.start = answer.session, answer.start
        self.position, self.last, self.deadline = answer.position, answer.last, answer.deadline
        self.last_paid = now
        return SessionOpened(session=answer.session, position=answer.position,
                             remaining=answer.remaining, deadline=answer.deadline)

    def open_failed(self, result: Refusal | NoAnswer) -> RemoteProtocolError:
        """The block got no answer, or a refusal; returns the error to give the user.

        Only a final refusal says nothing was blocked (:attr:`offer_reusable`). Otherwise the coin
        may be blocked for us until ``T``, and the user should treat it so.
        """
        if isinstance(result, Refusal) and result.final:
            self._move(SessionEvent.REFUSED)
            self.offer_reusable = True
            return result
        self._move(SessionEvent.UNANSWERED)
        return RemoteProtocolError("the bank did not answer; the coin may be blocked until T", ErrorCode.UNAVAILABLE)

    # --- paying ----------------------------------------------------------------------------
    def due(self, units: int, reason: str) -> Due:
        """The meter counted ``units`` more units of service; returns the Observe notification.

        It asks for ``tokens_owed(units so far) − tokens paid`` (:mod:`m2mpay.protocol.rules.pricing`).
        """
        if units < 0:
            raise LocalProtocolError("units of service are not negative")
        if self.price == 0:
            raise LocalProtocolError("a session read back from disk is not metered")
        self._move(SessionEvent.DUE)
        self.metered += units
        self.seq += 1
        return Due(seq=self.seq, tokens=self.owed, reason=reason)

    def prepare_pay(self, pay: Pay, now: int) -> Receipt | Change:
        """Check one payment, ``H^(position-index)(token) == last``.

        A duplicate gets its receipt (nothing to write); a new token a :class:`Change` to write.
        """
        if self.state not in (SessionState.OPEN, SessionState.CLOSING) or self.session is None:
            raise RemoteProtocolError("session not open", ErrorCode.SESSION_CLOSED)
        if pay.index == self.position and hmac.compare_digest(pay.token, self.last):
            return self.receipt()
        if self.state is SessionState.CLOSING:
            raise RemoteProtocolError("session closing", ErrorCode.SESSION_CLOSED)
        if now >= self.deadline:
            raise RemoteProtocolError("session past its deadline", ErrorCode.DEADLINE)
        if pay.index >= self.position:
            raise RemoteProtocolError("token already paid", ErrorCode.REPLAY)
        hashchain.verify_span(pay.token, self.position - pay.index, self.last)
        state = self._after(SessionEvent.PAY)
        return self._propose(Change(event=SessionEvent.PAY, state=state, position=pay.index, last=pay.token,
                                    credited=self.credited, at=now, tokens=self.position - pay.index,
                                    receipt=self.receipt(pay.index)))

    def pay(self, pay: Pay, now: int) -> Receipt:
        """:meth:`prepare_pay` and :meth:`commit` at once, for callers that keep nothing."""
        result = self.prepare_pay(pay, now)
        if isinstance(result, Receipt):
            return result
        self.commit(result)
        if result.receipt is None:
            raise LocalProtocolError("a payment without a receipt")
        return result.receipt

    # --- settling --------------------------------------------------------------------------
    def settlement_request(self, req_id: bytes, *, keep_open: bool) -> SettleRequest:
        """The settlement (or checkpoint) of what we hold, to be signed."""
        return SettleRequest(tip=self.tip, session=self.session_id, index=self.position, token=self.last,
                             keep_open=keep_open, req_id=req_id)

    def status_request(self, req_id: bytes) -> StatusRequest:
        """Ask the bank where the coin stands (past ``T``, before a late settlement)."""
        return StatusRequest(tip=self.tip, req_id=req_id)

    def prepare_settlement(self, request: SettleRequest, signed: bytes) -> Change:
        """Queue a signed settlement: final (``CLOSE``) or a checkpoint (``CHECKPOINT``).

        A final settlement supersedes the live checkpoints: it credits everything they would.
        A session has one final settlement: a retried close needs no new one (see :meth:`close`).
        """
        if request.session != self.session or request.index != self.position or request.tip != self.tip:
            raise LocalProtocolError("settlement of another session or position")
        if request.req_id in self.settlements:
            raise LocalProtocolError("request id already in the outbox")
        event = SessionEvent.CHECKPOINT if request.keep_open else SessionEvent.CLOSE
        if event is SessionEvent.CLOSE and self.final is not None:
            raise LocalProtocolError("the session already has its final settlement")
        state = self._after(event)
        entry = Settlement(request, signed, self.deadline)
        covered = () if request.keep_open else tuple(e for e in self.live() if e.keep_open)
        return self._propose(Change(event=event, state=state, position=self.position, last=self.last,
                                    credited=self.credited, settlement=entry, superseded=covered))

    def close(self, now: int) -> FinalReceipt:
        """A close of a session that already has its final settlement: its receipt as of ``now``."""
        if self.final is None:
            raise LocalProtocolError("close needs a final settlement first")
        self._move(SessionEvent.CLOSE)
        return self.closed(now)

    def settle_request(self, req_id: bytes, *, keep_open: bool) -> SettleRequest:
        """Queue a settlement at once, for callers that keep nothing; a retried close gets the same."""
        if not keep_open and self.final is not None:
            self._move(SessionEvent.CLOSE)
            return self.final.request
        request = self.settlement_request(req_id, keep_open=keep_open)
        self.commit(self.prepare_settlement(request, b""))
        return request

    def settled(self, answer: SettleAnswer) -> None:
        """The bank's answer to a settlement sent by a caller that keeps nothing."""
        entry = self.settlements.get(answer.req_id)
        if entry is None or not entry.live:
            raise LocalProtocolError("settle answer for another request")
        if entry.state is SettlementState.QUEUED:
            entry.start(SettlementEvent.SEND)
        change = self.attempt_done(answer.req_id, answer, raw=b"", policy=RetryPolicy(), mono=0.0, now=0, draw=0.0)
        if change is None:
            raise LocalProtocolError("an answer always changes the session")
        self.commit(change)

    # --- the outbox ------------------------------------------------------------------------
    def close_due(self, now: int, *, margin: int, idle: int) -> bool:
        """Whether the vendor should close now: ``T`` within ``margin``, or nobody paid for ``idle``."""
        return self.state is SessionState.OPEN and (now >= self.deadline - margin or now - self.last_paid >= idle)

    def checkpoint_due(self, every: int) -> bool:
        """Whether ``every`` tokens arrived since the last checkpoint and none is waiting."""
        return (self.state is SessionState.OPEN and self.paid - self.checkpointed >= every
                and not any(e.keep_open for e in self.live()))

    def due_attempts(self, mono: float, now: int) -> list[tuple[Settlement, SettlementEvent]]:
        """Entries whose next attempt is due, each with ``SEND`` or ``CHECK``."""
        due = []
        for entry in self.settlements.values():
            event = entry.next_event(mono, now)
            if event is not None:
                due.append((entry, event))
        return due

    def next_due(self) -> float | None:
        """The earliest ``mono`` at which a queued entry is due, if any."""
        times = [e.due_at for e in self.settlements.values() if e.state is SettlementState.QUEUED]
        return min(times) if times else None

    def attempt_done(self, req_id: bytes, result: SettleAnswer | StatusAnswer | Refusal | NoAnswer, *,
                     raw: bytes, policy: RetryPolicy, mono: float, now: int, draw: float) -> Change | None:
        """Feed the outcome of one attempt (``raw``: the bank's signed bytes, kept with the entry).

        No answer — a transport failure, an answer that did not verify, the bank's own trouble — and
        a status that clears a late send change nothing durable: they are applied at once and
        ``None`` is returned. A signed answer or a final refusal returns the :class:`Change` to
        write and commit.
        """
        entry = self.settlements.get(req_id)
        if entry is None:
            raise LocalProtocolError("outcome of a settlement this session does not have")
        if isinstance(result, NoAnswer) or (isinstance(result, Refusal) and not result.final):
            entry.unanswered(policy, mono, now, draw)
            return None
        if entry.state is SettlementState.SUPERSEDED:
            return None  # covered by the final settlement; what it says changes nothing
        if entry.state is SettlementState.CHECKING:
            if isinstance(result, SettleAnswer):
                raise LocalProtocolError("a settle answer to a status query")
            # A final refusal of the status query itself: let the settlement speak for itself.
            event = (after_status(result, self.session_id, sent=entry.sent) if isinstance(result, StatusAnswer)
                     else SettlementEvent.LATE_OK)
            if event is SettlementEvent.LATE_OK:
                entry.late_ok(mono)
                return None
            return self._finished(entry, event, None)
        if isinstance(result, StatusAnswer):
            raise LocalProtocolError("a status answer to a settlement")
        if isinstance(result, Refusal):
            return self._finished(entry, SettlementEvent.REFUSAL, raw)
        if result.req_id != req_id or result.session != self.session:
            raise LocalProtocolError("settle answer for another request")
        return self._finished(entry, SettlementEvent.ANSWER, raw, result)

    def _finished(self, entry: Settlement, event: SettlementEvent, raw: bytes | None,
                  answer: SettleAnswer | None = None) -> Change:
        entry_state = entry.after(event)
        others = [e for e in self.live() if e is not entry]
        credited = self.credited
        superseded: tuple[Settlement, ...] = ()
        if answer is not None and entry.keep_open:
            session_event, credited = SessionEvent.CHECKPOINTED, self.credited + answer.credited
        elif answer is not None:
            # Settled at j: the rules credit this session every token from its start down to j,
            # exactly once, however they were split (checkpoints, a lapse at T, this settlement).
            session_event, credited = SessionEvent.SETTLED, (self.start - entry.request.index) * self.token_value
            superseded = tuple(others)
        elif entry.keep_open or any(not e.keep_open for e in others):
            session_event = SessionEvent.SETTLEMENT_REFUSED
        else:
            session_event, superseded = SessionEvent.FORFEIT, tuple(others)
        state = self._after(session_event)
        return self._propose(Change(event=session_event, state=state, position=self.position, last=self.last,
                                    credited=credited, settlement=entry, settlement_event=event,
                                    settlement_state=entry_state, answer=raw, superseded=superseded))
