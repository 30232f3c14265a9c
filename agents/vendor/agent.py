"""The vendor's logic between CoAP and the bank: offers, sessions, tokens, settlements.

The rules are the core's (:mod:`m2mpay.protocol.rules.vendor`, :mod:`m2mpay.protocol.rules.settlement`): the
agent moves bytes, writes what the core hands it before committing it, and starts the attempts
the core says are due. Transports stay outside: the CoAP resources call :class:`VendorAgent` with
decoded messages; the agent talks to the bank through a :class:`~m2mpay.agents.mqtt.BankClient`, which
raises only our :class:`~m2mpay.agents.mqtt.TransportError`. :meth:`VendorAgent._exchange` is where an
exchange's outcome becomes the core's input: the bank's verified answer, its signed refusal, or
:class:`~m2mpay.protocol.rules.settlement.NoAnswer` (a transport failure, or an answer that does not
verify) — never final.

Settlements run in the background (:meth:`VendorAgent.tend`, called by the settler): a close
writes the final settlement to the outbox, starts its first attempt and waits at most
``close_wait`` for it; the user gets the final receipt signed by the vendor's certified key
(:mod:`m2mpay.protocol.receipts`), ``pending`` while the bank has not answered.
After a restart :meth:`VendorAgent.restore` reads back the sessions still open or closing; those
left open are closed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import envelope
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import (
    BlockAnswer,
    Due,
    FinalReceipt,
    Message,
    Offer,
    OpenSession,
    Pay,
    Receipt,
    SessionOpened,
    SettleAnswer,
    StatusAnswer,
)
from m2mpay.protocol.receipts import sign_receipt
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.settlement import NoAnswer, RetryPolicy, Settlement, SettlementEvent, SettlementState
from m2mpay.protocol.rules.vendor import Change, SessionEvent, SessionState, VendorSession

from ..mqtt import BankClient, TransportError
from .config import VendorConfig
from .offers import OfferBook, Terms, offer_secret
from .store import OutboxEntry, StoredSession, VendorStore

__all__ = ["Credentials", "VendorAgent"]

log = logging.getLogger(__name__)
A = TypeVar("A", BlockAnswer, SettleAnswer, StatusAnswer)


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
    """The service itself: called with a session id and the units of service just paid for."""
    sessions: dict[bytes, VendorSession] = field(default_factory=dict)
    """Sessions open, or closing until the bank answers their settlement."""
    due_listeners: list[Callable[[bytes, Due], None]] = field(default_factory=list)
    """Each is called with a session id and what it owes, whenever the meter asks for more."""
    closed_listeners: list[Callable[[bytes], None]] = field(default_factory=list)
    """Each is called when a session stops taking tokens (closed or closing): its observers are let go."""
    monotonic: Callable[[], float] = time.monotonic
    """The clock retries are scheduled on (``clock`` is protocol time, in which ``T`` is)."""
    draw: Callable[[], float] = random.random
    """Spreads retries in time (see :class:`~m2mpay.protocol.rules.settlement.RetryPolicy`)."""
    unanswered: int = 0
    """Settlement attempts (and status queries) that got no usable answer, since start."""
    offers: OfferBook = field(init=False, repr=False)
    """Offers are stateless (a MAC in the nonce); only opened ones are remembered, until they expire."""
    _flights: dict[bytes, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    """The attempt in flight of each outbox entry, by req_id."""
    _finished: int = field(default=0, init=False, repr=False)
    _keys_issued: int = field(default=0, init=False, repr=False)
    """``issued`` of the last announcement taken by :meth:`take_keys`: an older one is not taken."""

    def __post_init__(self) -> None:
        pricing = self.config.pricing
        terms = Terms(cert=self.credentials.cert, service=pricing.service, unit=pricing.unit, price=pricing.price,
                      block_window=self.config.session.block_window, bank=self.credentials.bank,
                      keysets=tuple(sorted(self.keyring.keysets)))
        self.offers = OfferBook(offer_secret(self.credentials.key), terms)

    @property
    def retry(self) -> RetryPolicy:
        """When unanswered settlements are sent again."""
        s = self.config.settlement
        return RetryPolicy(first=s.retry_first, cap=s.retry_cap, margin=self.config.session.settle_margin,
                           urgent_cap=s.urgent_cap)

    def now(self) -> int:
        """Protocol time, Unix seconds."""
        return int(self.clock())

    def take_keys(self, announcement: bytes) -> bool:
        """Take a new keys announcement of the bank (a revocation, keysets added or retired).

        Phase records are followed, never moved back (a retired keyset's coins are still taken
        until its ``spend_until``; a rollback is logged and the earlier record kept).

        A listener for :attr:`BankClient.keys_listeners <m2mpay.agents.mqtt.BankClient.keys_listeners>`.
        Verified against the CA fingerprint the vendor was provisioned with, it replaces the
        keyring new sessions are checked with, and the keysets fresh offers list (an offer issued
        under other keysets no longer opens: the wallet fetches a new one). Sessions already open
        keep the keys they were opened with. One that does not verify, names another bank or is
        older than the keys in use changes nothing. Whether the keys were taken.
        """
        try:
            verified = verify_announcement(announcement, self.credentials.ca_fingerprint, self.now())
            keyring, refused = Keyring.following(verified, self.keyring.phases)
        except (ProtocolError, ValueError) as exc:
            log.warning("keys announcement not taken: %s", exc)
            return False
        if verified.bank != self.credentials.bank or verified.issued < self._keys_issued:
            log.warning("keys announcement not taken: of bank %r, issued %d", verified.bank, verified.issued)
            return False
        if refused:
            # The bank signed a phase moved back (or a redeem window shortened): the records held
            # stay, the rest of the announcement is taken.
            log.error("keys announcement moves keyset phases back (%s): kept the earlier ones (%s)",
                      ", ".join(refused), ErrorCode.PHASE_ROLLBACK.wire)
        self._keys_issued, self.keyring = verified.issued, keyring
        keysets = tuple(sorted(keyring.keysets))
        if keysets != self.offers.terms.keysets:
            self.offers.terms = dataclasses.replace(self.offers.terms, keysets=keysets)
        if self.credentials.vendor in keyring.revoked:
            log.error("the bank revoked this vendor (%s): wallets will not pay it", self.credentials.vendor)
        return True

    # --- the bank --------------------------------------------------------------------------
    def _sign(self, message: Message, op: str) -> bytes:
        return envelope.sign_request(message, self.credentials.key, self.credentials.vendor, self.credentials.bank, op)

    async def _exchange(self, op: str, signed: bytes, kind: type[A]) -> tuple[A | envelope.Refusal | NoAnswer, bytes]:
        """One request to the bank and what came of it, with the bank's signed bytes."""
        try:
            raw = await self.bank.request(op, signed)
        except TransportError as exc:
            return NoAnswer(f"{exc} ({type(exc.__cause__ or exc).__name__})"), b""
        try:
            return envelope.open_answer(raw, self.keyring.answer_key, self.credentials.bank, op, kind,
                                        request=signed), raw
        except envelope.Refusal as refusal:
            return refusal, raw
        except RemoteProtocolError as exc:
            # Not the bank's answer to these bytes (forged, corrupt, another request's): the
            # request is still unanswered, and only the same bytes can fetch the real answer.
            return NoAnswer(f"an answer that does not verify ({exc.code.wire})"), b""

    # --- offers and opening ----------------------------------------------------------------
    def offer(self) -> Offer:
        """A fresh offer: its nonce (a MAC over its terms) names the session the user will open."""
        return self.offers.issue(self.now())

    async def open(self, request: OpenSession) -> SessionOpened:
        """Check the offer and the coin, block the coin at the bank, and start the session."""
        offer = self.offers.admit(request.nonce, request.deadline, self.now())
        session = VendorSession(offer, self.keyring, self.credentials.vendor)
        block = session.open(request, os.urandom(16), self.now())
        self.offers.claim(offer, self.now())  # no await since admit: a concurrent twin is a replay
        result, _ = await self._exchange("block", self._sign(block, "block"), BlockAnswer)
        if not isinstance(result, BlockAnswer):
            error = session.open_failed(result)
            if session.offer_reusable:
                self.offers.release(offer)  # refused for good: nothing was blocked under this offer
            raise error
        opened = session.blocked(result, self.now())
        self.store.open_session(StoredSession(
            session=result.session, tip=result.tip, token_value=session.token_value, start=result.start,
            position=result.position, last=result.last, deadline=result.deadline, state="open", opened=self.now(),
            last_paid=self.now(), credited=0))
        self.sessions[result.session] = session  # reachable (and payable) only once on disk
        if session.units_paid:
            self.deliver(result.session, session.units_paid)  # what the blocking token pays for
        return opened

    # --- paying ----------------------------------------------------------------------------
    def _session(self, sid: bytes) -> VendorSession:
        session = self.sessions.get(sid)
        if session is None:
            raise RemoteProtocolError("unknown session", ErrorCode.UNKNOWN_SESSION)
        return session

    def due(self, sid: bytes, units: int = 1, reason: str = "metered") -> Due:
        """The meter counted ``units`` more; observers of ``/due`` are told what is owed now."""
        session = self._session(sid)
        due = session.due(units, reason)
        for listener in self.due_listeners:
            self._tell(functools.partial(listener, sid, due))
        return due

    def current_due(self, sid: bytes) -> Due:
        """What an open session owes now (a closing one owes nothing more: ``session_closed``)."""
        session = self._session(sid)
        if session.state is not SessionState.OPEN:
            raise RemoteProtocolError("session closed", ErrorCode.SESSION_CLOSED)
        return Due(seq=session.seq, tokens=session.owed, reason="metered")

    def pay(self, sid: bytes, pay: Pay) -> Receipt:
        """Check a token, keep it durably, then acknowledge it."""
        session = self._session(sid)
        result = session.prepare_pay(pay, self.now())
        if isinstance(result, Receipt):
            return result  # a retransmission: already on disk
        before = session.units_paid
        self._apply(session, result)  # on disk before the receipt
        if session.units_paid > before:
            self.deliver(sid, session.units_paid - before)
        return session.receipt()

    # --- writing what the core decided -----------------------------------------------------
    def _apply(self, session: VendorSession, change: Change) -> None:
        """Write ``change``, then commit it; a failed write leaves the session as it was."""
        try:
            self._write(session, change)
        except BaseException:
            session.abort(change)
            raise
        session.commit(change)

    def _write(self, session: VendorSession, change: Change) -> None:
        sid = session.session_id
        if change.event is SessionEvent.PAY:
            self.store.record_token(sid, change.position, change.last, change.at)
            return
        entry, queued = change.settlement, None
        if entry is not None and change.queues:
            queued = OutboxEntry(req_id=entry.req_id, session=sid, keep_open=entry.keep_open, request=entry.signed,
                                 answer=None)
        finished: list[tuple[bytes, str, bytes | None]] = [
            (e.req_id, SettlementState.SUPERSEDED.value, None) for e in change.superseded]
        if entry is not None and change.settlement_state is not None:
            finished.append((entry.req_id, change.settlement_state.value, change.answer))
        self.store.write(sid, state=change.state.value, credited=change.credited, queued=queued, finished=finished,
                         now=self.now())

    def _queue(self, session: VendorSession, *, keep_open: bool) -> Settlement:
        request = session.settlement_request(os.urandom(16), keep_open=keep_open)
        change = session.prepare_settlement(request, self._sign(request, "settle"))
        self._apply(session, change)
        if change.settlement is None:
            raise RuntimeError("a queued settlement without its entry")  # the core's contract
        if not keep_open:
            sid = session.session_id
            for listener in self.closed_listeners:  # nothing more is due: let its observers go
                self._tell(functools.partial(listener, sid))
            log.info("closing session %s at %d: %d token(s)", sid.hex()[:8], request.index, session.paid)
        return change.settlement

    @staticmethod
    def _tell(notify: Callable[[], None]) -> None:
        """Tell the session's observers; a notification the network loses is not the session's loss."""
        try:
            notify()
        except TransportError as exc:
            log.warning("notification not sent: %s", exc)

    # --- settling --------------------------------------------------------------------------
    async def close(self, sid: bytes) -> bytes:
        """Settle what the session holds and end it: the signed final receipt, ``pending`` until
        the bank answers.

        A close of a session that already has its final settlement (the user's retry) queues
        nothing new; a close of one settled before, even before a restart, gets its receipt again.
        """
        session = self.sessions.get(sid)
        if session is None:
            return self._signed_receipt(self._closed_before(sid))
        if session.final is None:
            final = self._queue(session, keep_open=False)
        else:
            session.close(self.now())
            final = session.final
        await self._wait(final, self.config.settlement.close_wait)
        receipt = session.closed(self.now())
        self._forget(sid)
        return self._signed_receipt(receipt)

    def _signed_receipt(self, receipt: FinalReceipt) -> bytes:
        return sign_receipt(receipt, self.credentials.key)

    def _closed_before(self, sid: bytes) -> FinalReceipt:
        held = self.store.session(sid)
        if held is None or held.state not in (SessionState.CLOSED.value, SessionState.FORFEITED.value):
            raise RemoteProtocolError("unknown session", ErrorCode.UNKNOWN_SESSION)
        return FinalReceipt(session=sid, tip=held.tip, index=held.position, tokens=held.start - held.position,
                            credited=held.credited, vendor=self.credentials.vendor, ts=self.now())

    async def _wait(self, entry: Settlement, timeout: float) -> None:
        """Until the bank answered ``entry`` (or refused it for good), at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while entry.live:
            task = self._flights.get(entry.req_id)
            if task is None:
                self.kick()
                task = self._flights.get(entry.req_id)
            left = deadline - loop.time()
            if task is None or left <= 0:
                return  # its next attempt is not due yet: the settler sends it
            await asyncio.wait({task}, timeout=left)

    def _forget(self, sid: bytes) -> None:
        session = self.sessions.get(sid)
        if session is not None and session.done:
            del self.sessions[sid]

    def kick(self) -> int:
        """Start an attempt for each outbox entry that is due and not in flight; returns how many."""
        mono, now, started = self.monotonic(), self.now(), 0
        for session in list(self.sessions.values()):
            for entry, event in session.due_attempts(mono, now):
                if len(self._flights) >= self.config.settlement.in_flight:
                    return started
                entry.start(event)
                task = asyncio.create_task(self._attempt(session, entry, event),
                                           name=f"vendor-{event.value}-{entry.req_id.hex()[:8]}")
                self._flights[entry.req_id] = task
                task.add_done_callback(_log_failure)
                started += 1
        return started

    async def _attempt(self, session: VendorSession, entry: Settlement, event: SettlementEvent) -> None:
        """One attempt (a send, or a status query past ``T``), and its outcome fed to the core."""
        try:
            result: SettleAnswer | StatusAnswer | envelope.Refusal | NoAnswer
            try:
                if event is SettlementEvent.SEND:
                    result, raw = await self._exchange("settle", entry.signed, SettleAnswer)
                else:
                    ask = session.status_request(os.urandom(16))
                    result, raw = await self._exchange("status", self._sign(ask, "status"), StatusAnswer)
            except BaseException:
                # Stopping (or a bug, logged by the task's callback): the entry stays queued, and
                # on disk, to be sent again.
                session.attempt_done(entry.req_id, NoAnswer("attempt interrupted"), raw=b"", policy=self.retry,
                                     mono=self.monotonic(), now=self.now(), draw=self.draw())
                raise
            self._outcome(session, entry, result, raw)
        finally:
            self._flights.pop(entry.req_id, None)

    def _outcome(self, session: VendorSession, entry: Settlement,
                 result: SettleAnswer | StatusAnswer | envelope.Refusal | NoAnswer, raw: bytes) -> None:
        sid, failures = session.session_id, entry.failures
        change = session.attempt_done(entry.req_id, result, raw=raw, policy=self.retry, mono=self.monotonic(),
                                      now=self.now(), draw=self.draw())
        if change is None:
            if entry.failures > failures:
                self.unanswered += 1
                reason = result.reason if isinstance(result, NoAnswer) else f"the bank: {_why(result)}"
                log.warning("settlement %s of %s unanswered (%s); again in %.1f s (attempt %d)",
                            entry.req_id.hex()[:8], sid.hex()[:8], reason, entry.due_at - self.monotonic(),
                            entry.failures)
            elif entry.cleared and entry.state is SettlementState.QUEUED:
                log.info("session %s past T and still ours at the bank: settling late", sid.hex()[:8])
            return
        try:
            self._apply(session, change)
        except BaseException:
            # Not written, so not known: the same bytes fetch the same answer again.
            session.attempt_done(entry.req_id, NoAnswer("outcome not written"), raw=b"", policy=self.retry,
                                 mono=self.monotonic(), now=self.now(), draw=self.draw())
            raise
        self._finished += 1
        if change.event is SessionEvent.FORFEIT:
            log.error("settlement of %s refused for good (%s): %d token(s) held, %d credited", sid.hex()[:8],
                      _why(result), session.paid, session.credited)
        elif change.event is SessionEvent.SETTLEMENT_REFUSED:
            log.warning("settlement %s of %s refused (%s)", entry.req_id.hex()[:8], sid.hex()[:8], _why(result))
        else:
            log.info("%s %s: %d credited", "checkpointed" if entry.keep_open else "settled", sid.hex()[:8],
                     session.credited)
        self._forget(sid)

    def tend(self) -> None:
        """The settler's round: close sessions that are idle or near ``T``, checkpoint, send what is due."""
        policy, now = self.config.session, self.now()
        for sid, session in list(self.sessions.items()):
            try:
                if session.close_due(now, margin=policy.settle_margin, idle=policy.idle_timeout):
                    self._queue(session, keep_open=False)
                elif session.checkpoint_due(policy.checkpoint_every):
                    self._queue(session, keep_open=True)
            except ProtocolError as exc:
                log.error("session %s: %s", sid.hex()[:8], exc)
        self.kick()

    def next_due(self) -> float | None:
        """When (monotonic) the next queued attempt is due, if any."""
        times = [t for s in self.sessions.values() if (t := s.next_due()) is not None]
        return min(times) if times else None

    async def retry_pending(self) -> int:
        """Send every settlement that is due and not in flight, and wait for the outcomes.

        Returns how many got the bank's answer (or a refusal for good) meanwhile.
        """
        before = self._finished
        while self.kick():
            while self._flights:
                await asyncio.wait(set(self._flights.values()))
        return self._finished - before

    def restore(self) -> int:
        """After a restart: read back the sessions still open or closing, with their queued outbox
        entries; close those left open (their watchers are gone). Returns how many."""
        queued: dict[bytes, list[Settlement]] = {}
        held_sessions = {h.session: h for h in self.store.sessions("open", "closing")}
        for row in self.store.pending():
            held = held_sessions.get(row.session)
            if held is None:
                log.error("outbox entry %s of a session that is not open: left alone", row.req_id.hex()[:8])
                continue
            queued.setdefault(row.session, []).append(Settlement.read_back(row.request, held.deadline))
        restored = 0
        for sid, held in held_sessions.items():
            if sid in self.sessions:
                continue
            session = VendorSession.restore(
                self.credentials.vendor, session=sid, tip=held.tip, token_value=held.token_value, start=held.start,
                position=held.position, last=held.last, deadline=held.deadline, credited=held.credited,
                last_paid=held.last_paid, settlements=queued.get(sid, ()))
            self.sessions[sid] = session
            restored += 1
            if session.state is SessionState.OPEN:
                self._queue(session, keep_open=False)  # settle what a crash left open
        return restored

    async def recover(self) -> int:
        """:meth:`restore`, then send what is due and wait; returns how many settlements got answered."""
        self.restore()
        return await self.retry_pending()

    async def aclose(self) -> None:
        """Stop the attempts in flight (their entries stay queued on disk)."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _why(result: object) -> str:
    return result.code.wire if isinstance(result, envelope.Refusal) else type(result).__name__


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
