"""The vendor's logic between CoAP and the bank: offers, sessions, tokens, settlements.

Transports stay outside: the CoAP resources call :class:`VendorAgent` with decoded messages;
the agent talks to the bank through a :class:`~agents.mqtt.BankClient`. Durable state lives in
:class:`~agents.vendor.store.VendorStore`; on start the agent sends every unanswered settlement
again (same bytes, same ``req_id``) and settles the sessions a crash left open.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import envelope
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages import (
    BlockAnswer,
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
from protocol.rules.keyring import Keyring
from protocol.rules.vendor import VendorSession

from ..mqtt import BankClient, TransportError
from .config import VendorConfig
from .offers import OfferBook, Terms, offer_secret
from .store import OutboxEntry, StoredSession, VendorStore

__all__ = ["Credentials", "VendorAgent"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """What ``bank vendor enroll`` wrote: who we are, our key and certificate."""

    vendor: str
    account: str
    key: Ed25519PrivateKey
    cert: bytes
    bank: str
    ca_fingerprint: str


@dataclass
class VendorAgent:
    """One vendor device's payment logic."""

    credentials: Credentials
    keyring: Keyring
    bank: BankClient
    store: VendorStore
    config: VendorConfig = field(default_factory=VendorConfig)
    clock: Callable[[], float] = time.time
    deliver: Callable[[bytes, int], None] = lambda session, units: None
    """The service itself: called with a session id and the units just paid for."""
    sessions: dict[bytes, VendorSession] = field(default_factory=dict)
    on_due: Callable[[bytes, Due], None] = lambda session, due: None
    on_closed: Callable[[bytes], None] = lambda session: None
    """Called when a session ends (closed, or settled on recovery): its observers are let go."""
    offers: OfferBook = field(init=False, repr=False)
    """Offers are stateless (a MAC in the nonce); only opened ones are remembered, until they expire."""
    _settling: set[bytes] = field(default_factory=set, init=False, repr=False)
    """req_ids of settlements whose answer a close or checkpoint is waiting for."""

    def __post_init__(self) -> None:
        pricing = self.config.pricing
        terms = Terms(cert=self.credentials.cert, service=pricing.service, unit=pricing.unit, price=pricing.price,
                      block_window=self.config.session.block_window, bank=self.credentials.bank,
                      keysets=tuple(sorted(self.keyring.keysets)))
        self.offers = OfferBook(offer_secret(self.credentials.key), terms)

    def now(self) -> int:
        return int(self.clock())

    # --- offers and opening ----------------------------------------------------------------
    def offer(self) -> Offer:
        """A fresh offer: its nonce (a MAC over its terms) names the session the user will open."""
        return self.offers.issue(self.now())

    def _sign(self, message: SettleRequest | object, op: str) -> bytes:
        return envelope.sign_request(message, self.credentials.key, self.credentials.vendor,  # type: ignore[arg-type]
                                     self.credentials.bank, op)

    async def _ask(self, op: str, data: bytes, kind: type[BlockAnswer] | type[SettleAnswer]) -> BlockAnswer | SettleAnswer:
        try:
            raw = await self.bank.request(op, data)
        except TransportError as exc:
            raise RemoteProtocolError("bank unreachable", ErrorCode.UNAVAILABLE) from exc
        return envelope.open_answer(raw, self.keyring.answer_key, self.credentials.bank, op, kind, request=data)

    async def open(self, request: OpenSession) -> SessionOpened:
        """Check the offer and the coin, block the coin at the bank, and start the session."""
        offer = self.offers.admit(request.nonce, request.deadline, self.now())
        session = VendorSession(offer, self.keyring, self.credentials.vendor)
        block = session.open(request, os.urandom(16), self.now())
        self.offers.claim(offer, self.now())  # no await since admit: a concurrent twin is a replay
        try:
            answer = await self._ask("block", self._sign(block, "block"), BlockAnswer)
        except RemoteProtocolError as exc:
            session.refused()
            if exc.code is not ErrorCode.UNAVAILABLE:
                # Refused by the bank: nothing was blocked under this offer. Unanswered, the coin
                # may be blocked, and the offer stays used.
                self.offers.release(offer)
            raise
        assert isinstance(answer, BlockAnswer)
        opened = session.blocked(answer)
        self.store.open_session(StoredSession(
            session=answer.session, tip=answer.tip, token_value=session.token_value, start=answer.start, position=answer.position,
            last=answer.last, deadline=answer.deadline, state="open", opened=self.now(), last_paid=self.now(),
            credited=0))
        self.sessions[answer.session] = session
        return opened

    # --- paying ----------------------------------------------------------------------------
    def _session(self, sid: bytes) -> VendorSession:
        session = self.sessions.get(sid)
        if session is None:
            raise RemoteProtocolError("unknown session", ErrorCode.UNKNOWN_SESSION)
        return session

    def due(self, sid: bytes, units: int = 1, reason: str = "metered") -> Due:
        """The meter asks for ``units`` more; observers of ``/due`` are told."""
        session = self._session(sid)
        due = session.due(units * self.config.pricing.price, reason)
        self.on_due(sid, due)
        return due

    def current_due(self, sid: bytes) -> Due:
        session = self._session(sid)
        return Due(seq=session.seq, tokens=session.owed, reason="metered")

    def pay(self, sid: bytes, pay: Pay) -> Receipt:
        """Check a token, keep it durably, then acknowledge it."""
        session = self._session(sid)
        before = dict(vars(session))
        receipt = session.pay(pay, self.now())
        if session.position != before["position"]:
            try:
                self.store.record_token(sid, session.position, session.last, self.now())  # before the receipt
            except BaseException:
                # Not on disk, so not held: forget it, or the user's retry would get a receipt
                # for a token that a crash would lose.
                vars(session).update(before)
                raise
            self.deliver(sid, (before["position"] - session.position) // self.config.pricing.price)
        return receipt

    # --- settling --------------------------------------------------------------------------
    async def _settle(self, entry: OutboxEntry) -> SettleAnswer:
        self._settling.add(entry.req_id)
        try:
            answer = await self._ask("settle", entry.request, SettleAnswer)
        finally:
            self._settling.discard(entry.req_id)
        assert isinstance(answer, SettleAnswer)
        self.store.answered(entry.req_id, answer.encode())
        return answer

    async def close(self, sid: bytes) -> Closed:
        """Settle what the session holds and end it."""
        session = self._session(sid)
        request = session.settle_request(os.urandom(16), keep_open=False)
        entry = OutboxEntry(req_id=request.req_id, session=sid, keep_open=False,
                            request=self._sign(request, "settle"), answer=None)
        if not any(e.req_id == entry.req_id for e in self.store.pending()):
            self.store.enqueue(entry, self.now())
        answer = await self._settle(entry)
        closed = session.settled(answer)
        assert closed is not None
        self.store.set_state(sid, "closed", credited=closed.credited)
        del self.sessions[sid]
        self.on_closed(sid)
        return closed

    async def checkpoint(self, sid: bytes) -> int:
        """Settle what the session holds and keep it open (the coin stays blocked). Returns the credit."""
        session = self._session(sid)
        request = session.settle_request(os.urandom(16), keep_open=True)
        entry = OutboxEntry(req_id=request.req_id, session=sid, keep_open=True,
                            request=self._sign(request, "settle"), answer=None)
        self.store.enqueue(entry, self.now())
        answer = await self._settle(entry)
        session.settled(answer)
        self.store.set_state(sid, "open", credited=session.credited)
        return answer.credited

    async def retry_pending(self) -> int:
        """Send every unanswered settlement again, same bytes; returns how many got an answer."""
        done = 0
        for entry in self.store.pending():
            if entry.req_id in self._settling:
                continue  # a close or checkpoint is waiting for this very answer and applies it
            try:
                answer = await self._settle(entry)
            except RemoteProtocolError as exc:
                log.warning("settlement %s refused on recovery: %s", entry.req_id.hex()[:8], exc.code.wire)
                self.store.answered(entry.req_id, b"")
                continue
            session = self.sessions.pop(entry.session, None) if not entry.keep_open else None
            if session is not None:
                session.settled(answer)
                self.on_closed(entry.session)
            if not entry.keep_open:
                held = self.store.session(entry.session)
                self.store.set_state(entry.session, "closed",
                                     credited=answer.credited + (held.credited if held else 0))
            done += 1
        return done

    async def recover(self) -> int:
        """After a restart: resend unanswered settlements, settle sessions left open. Returns the count."""
        done = await self.retry_pending()
        for held in self.store.sessions("open"):
            if held.session in self.sessions:
                continue
            request = SettleRequest(tip=held.tip, session=held.session, index=held.position, token=held.last,
                                    keep_open=False, req_id=os.urandom(16))
            entry = OutboxEntry(req_id=request.req_id, session=held.session, keep_open=False,
                                request=self._sign(request, "settle"), answer=None)
            self.store.enqueue(entry, self.now())
            try:
                answer = await self._settle(entry)
            except RemoteProtocolError as exc:
                log.warning("recovered session %s not settled: %s", held.session.hex()[:8], exc.code.wire)
                continue
            self.store.set_state(held.session, "closed", credited=answer.credited)
            done += 1
        return done

