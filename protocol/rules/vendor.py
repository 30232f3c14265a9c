"""A vendor's payment session as a pure state machine: offer → open → pay* → close.

The vendor agent feeds it what arrives (an open request, the bank's answer, tokens, a close)
with the current time, and sends what it returns. The table :data:`TRANSITIONS` is the whole
life of a session; any other (state, event) pair raises and leaves the session in ``ERROR``
(h11's rule: after a protocol error the session refuses further use, except ``pay`` and
``open``, whose refusals concern only the peer's input and leave the session as it was).
"""

from __future__ import annotations

import enum
import hmac

from .. import hashchain
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages import (
    BlockAnswer,
    BlockRequest,
    Closed,
    Due,
    Offer,
    OpenSession,
    Pay,
    Receipt,
    SessionOpened,
    SettleAnswer,
    SettleRequest,
)
from .keyring import Keyring

__all__ = ["TRANSITIONS", "SessionEvent", "SessionState", "VendorSession"]


class SessionState(enum.Enum):
    """The states of a vendor's session."""

    OFFERED = "offered"
    OPENING = "opening"  # block sent to the bank, answer awaited
    OPEN = "open"
    CLOSING = "closing"  # final settlement sent
    CLOSED = "closed"
    ERROR = "error"


class SessionEvent(enum.Enum):
    """What moves a session."""

    OPEN_REQUEST = "open_request"
    BLOCKED = "blocked"
    REFUSED = "refused"
    DUE = "due"
    PAY = "pay"
    CHECKPOINT = "checkpoint"
    CHECKPOINTED = "checkpointed"
    CLOSE = "close"
    SETTLED = "settled"


S, E = SessionState, SessionEvent
TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.OFFERED, E.OPEN_REQUEST): S.OPENING,
    (S.OPENING, E.BLOCKED): S.OPEN,
    (S.OPENING, E.REFUSED): S.CLOSED,
    (S.OPEN, E.DUE): S.OPEN,
    (S.OPEN, E.PAY): S.OPEN,
    (S.OPEN, E.CHECKPOINT): S.OPEN,
    (S.OPEN, E.CHECKPOINTED): S.OPEN,
    (S.OPEN, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.PAY): S.CLOSING,  # a retransmitted token still gets its receipt
    (S.CLOSING, E.CLOSE): S.CLOSING,  # a retried close resends the same settlement
    (S.CLOSING, E.SETTLED): S.CLOSED,
}


class VendorSession:
    """One payment session at a vendor. Not thread-safe; one per coin being paid with."""

    def __init__(self, offer: Offer, keyring: Keyring, vendor: str) -> None:
        self.offer = offer
        self.keyring = keyring
        self.vendor = vendor
        self.state = SessionState.OFFERED
        self.request: BlockRequest | None = None
        self.session: bytes | None = None
        self.tip = b""
        self.token_value = 0
        self.start = 0
        self.position = 0
        self.last = b""
        self.requested = 0
        self.seq = 0
        self.settlement: SettleRequest | None = None
        self.credited = 0

    def _move(self, event: SessionEvent) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            previous, self.state = self.state, SessionState.ERROR
            raise LocalProtocolError(f"{event.value} not allowed in state {previous.value}")
        self.state = nxt

    @property
    def paid(self) -> int:
        """Tokens received in this session, the blocking token included."""
        return self.start - self.position

    @property
    def owed(self) -> int:
        """Tokens requested through ``due`` and not yet paid."""
        return max(0, self.requested - (self.paid - 1))

    def open(self, request: OpenSession, req_id: bytes, now: int) -> BlockRequest:
        """Check an open request against the offer and the coin; return the block to relay."""
        if request.deadline != self.offer.deadline or not hmac.compare_digest(request.nonce, self.offer.nonce):
            raise RemoteProtocolError("deadline or nonce differ from the offer", ErrorCode.BAD_REQUEST)
        if now >= self.offer.deadline:
            raise RemoteProtocolError("offer expired", ErrorCode.DEADLINE)
        if request.coin.keyset not in self.offer.keysets:
            raise RemoteProtocolError("keyset not accepted here", ErrorCode.UNKNOWN_KEYSET)
        info = self.keyring.verify_coin(request.coin, now)
        self._move(SessionEvent.OPEN_REQUEST)
        self.tip, self.token_value = request.coin.tip, info.token_value
        self.request = BlockRequest(cert=self.offer.cert, coin=request.coin, sealed=request.sealed,
                                    deadline=request.deadline, nonce=request.nonce, req_id=req_id)
        return self.request

    def blocked(self, answer: BlockAnswer) -> SessionOpened:
        """The bank blocked the coin for us: the session is open."""
        if self.request is None or answer.req_id != self.request.req_id or answer.tip != self.tip:
            raise LocalProtocolError("block answer for another request")
        self._move(SessionEvent.BLOCKED)
        self.session, self.start = answer.session, answer.start
        self.position, self.last = answer.position, answer.last
        return SessionOpened(session=answer.session, position=answer.position,
                             remaining=answer.remaining, deadline=answer.deadline)

    def refused(self) -> None:
        """The bank refused the block."""
        self._move(SessionEvent.REFUSED)

    def due(self, tokens: int, reason: str) -> Due:
        """The meter asks for ``tokens`` more; returns the Observe notification."""
        self._move(SessionEvent.DUE)
        self.requested += tokens
        self.seq += 1
        return Due(seq=self.seq, tokens=self.owed, reason=reason)

    def pay(self, pay: Pay, now: int) -> Receipt:
        """Take one payment: ``H^(position-index)(token) == last``; a duplicate gets its receipt."""
        if self.state not in (SessionState.OPEN, SessionState.CLOSING) or self.session is None:
            raise RemoteProtocolError("session not open", ErrorCode.SESSION_CLOSED)
        if pay.index == self.position and hmac.compare_digest(pay.token, self.last):
            return self._receipt()
        if self.state is SessionState.CLOSING:
            raise RemoteProtocolError("session closing", ErrorCode.SESSION_CLOSED)
        if now >= self.offer.deadline:
            raise RemoteProtocolError("session past its deadline", ErrorCode.DEADLINE)
        if pay.index >= self.position:
            raise RemoteProtocolError("token already paid", ErrorCode.REPLAY)
        hashchain.verify_span(pay.token, self.position - pay.index, self.last)
        self._move(SessionEvent.PAY)
        self.position, self.last = pay.index, pay.token
        return self._receipt()

    def _session_id(self) -> bytes:
        if self.session is None:
            raise LocalProtocolError("session not open yet")
        return self.session

    def _receipt(self) -> Receipt:
        return Receipt(session=self._session_id(), index=self.position, paid=self.paid)

    def settle_request(self, req_id: bytes, *, keep_open: bool) -> SettleRequest:
        """The settlement (or checkpoint) for what we hold. A retried close resends the same one."""
        if not keep_open and self.settlement is not None and not self.settlement.keep_open:
            self._move(SessionEvent.CLOSE)
            return self.settlement
        self._move(SessionEvent.CHECKPOINT if keep_open else SessionEvent.CLOSE)
        self.settlement = SettleRequest(tip=self.tip, session=self._session_id(), index=self.position,
                                        token=self.last, keep_open=keep_open, req_id=req_id)
        return self.settlement

    def settled(self, answer: SettleAnswer) -> Closed | None:
        """The bank settled; a checkpoint keeps the session open and returns ``None``."""
        if self.settlement is None or answer.req_id != self.settlement.req_id:
            raise LocalProtocolError("settle answer for another request")
        self.credited += answer.credited
        if self.settlement.keep_open:
            self._move(SessionEvent.CHECKPOINTED)
            self.settlement = None
            return None
        self._move(SessionEvent.SETTLED)
        return Closed(session=self._session_id(), credited=self.credited, index=answer.position)

