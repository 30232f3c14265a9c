"""The bank's operations, one handler each, in one table keyed by the operation's topic name.

A handler gets a request whose signature is already verified (:class:`Call`) and yields the
transactions it needs (:mod:`m2mpay.agents.bank.ledger`). The stored answer for
``(signer, req_id)`` is looked up before any check that depends on the time, so an honest retry
always gets its first answer; the row a request changes (coin or account) is locked *before*
the stored answer is looked up again inside the transaction, so a duplicate arriving while its
twin is being applied waits and then finds the twin's answer.

A withdrawal's refusal is stored like an answer (a replay costs a lookup, never RSA work, and
the refusal is final for that request); the refusal of a block or settlement changes nothing
and is not stored, so a retry after the cause is gone (a lapse, a reconnect) may succeed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from m2mpay.protocol import cose, envelope
from m2mpay.protocol.certificates import CertificateCache
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import (
    BlockAnswer,
    BlockRequest,
    ErrorAnswer,
    Message,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawRequest,
)
from m2mpay.protocol.messages.exchange import ExchangeRequest, RestoreRequest
from m2mpay.protocol.rules import bank as rules
from m2mpay.protocol.rules.requests import BlockWindow, verify_block

from .keys import BankKeys
from .ledger import Atomic, Ledger, Rows, SignerKind, Steps, remembered
from .exchange import HashBudget, exchange
from .restore import SignatureBudget, restore
from .revocation import refuse_revoked
from .withdraw import withdraw

__all__ = ["OPERATIONS", "Call", "Context", "Operation", "book", "sweep"]

Q = TypeVar("Q", bound=Message)


@dataclass
class Context:
    """What the handlers share: the bank's keys, the blocking window, the certificate cache."""

    keys: BankKeys
    window: BlockWindow = field(default_factory=BlockWindow)
    new_session: Callable[[], bytes] = field(default=lambda: os.urandom(16))
    certificates: CertificateCache = field(init=False)
    exchanging: set[bytes] = field(default_factory=set, init=False)
    """Tips of the coins this process is exchanging now: one exchange per coin at a time."""
    restore_budget: SignatureBudget = field(default_factory=SignatureBudget, init=False)
    """Blind signatures this process may still spend on restores (anonymous, ~1 ms of RSA each)."""
    exchange_budget: HashBudget = field(default_factory=HashBudget, init=False)
    """Hashes this process may still spend on exchanges' chain checks (anonymous, up to ``n`` each)."""
    answer_key: cose.SigningKey = field(init=False)
    """The bank's answer key, prepared once: every request's answer is signed with it."""

    def __post_init__(self) -> None:
        self.certificates = CertificateCache(self.keys.keyring.ca_key, self.keys.bank)
        self.answer_key = cose.SigningKey.of(self.keys.answer_key)

    def sign(self, answer: Message, op: str, digest: bytes) -> bytes:
        """``answer`` signed by the bank over the request's digest."""
        return envelope.sign_answer(answer, self.answer_key, self.keys.bank, op, request_digest=digest)

    def refusal(self, op: str, code: ErrorCode, message: str, req_id: bytes | None, digest: bytes) -> bytes:
        """A signed :class:`ErrorAnswer`; under the context ``error`` when ``op`` is none of ours."""
        answer = ErrorAnswer(code=code.wire, message=message[:200], req_id=req_id)
        return self.sign(answer, op if op in OPERATIONS else "error", digest)


@dataclass(frozen=True, slots=True)
class Call(Generic[Q]):
    """A decoded request whose signature ``signer``'s key (raw: ``signer_key``) verified."""

    signed: cose.Sign1
    request: Q
    signer: str
    digest: bytes
    now: int
    signer_key: bytes | None = None
    data: bytes = b""
    """The request's exact bytes (an operation no account signs keeps its stored answer by them)."""


@dataclass(frozen=True, slots=True)
class Operation(Generic[Q]):
    """One row of the table: the request type, whose keys sign it, and its handler."""

    request: type[Q]
    signer: SignerKind | None
    """``None``: no account signs it (an exchange: the coin authorizes; a restore: it only reads);
    the request is plain CBOR."""
    handler: Callable[[Context, Call[Q]], Steps[bytes]]


def book(ledger: Ledger, outcome: rules.Outcome, *, new: bool, now: int) -> None:
    """Write what the rules decided: the coin's record and one journal row per credit."""
    ledger.put_coin(outcome.record, new=new)
    for credit in outcome.credits:
        ledger.transfer("outstanding", credit.account, credit.amount, f"credit:{credit.reason}", credit.tip, now)


def _block(ctx: Context, call: Call[BlockRequest]) -> Steps[bytes]:
    vendor, req_id, digest, now = call.signer, call.request.req_id, call.digest, call.now
    # The request's signature was verified with the vendor's enrolled key: verify_block checks it
    # again only if the certificate names another key.
    try:
        intent = verify_block(call.signed, ctx.keys.keyring, ctx.keys.sealing_key, now, ctx.window,
                              ctx.certificates, verified_key=call.signer_key, request=call.request)
    except RemoteProtocolError:
        # A retry gets its first answer even if the window, the certificate or the keyset would
        # now refuse it: the coin may be blocked under that answer. (Looked up only here: a
        # retry that passes the checks finds its answer in the booking transaction, and a new
        # request, nearly every one, costs one transaction instead of two.)
        stored: bytes | None = yield Atomic(lambda tx: remembered(tx, vendor, req_id, digest),
                                            Rows(answer=(vendor, req_id)))
        if stored is not None:
            return stored
        raise
    session = ctx.new_session()

    def block(tx: Ledger) -> bytes:
        record = tx.coin(intent.auth.tip)  # lock first: a concurrent twin waits here
        again = remembered(tx, vendor, req_id, digest)
        if again is not None:
            return again
        refuse_revoked(tx, vendor)  # read in this transaction: a revocation counts at once
        outcome = rules.apply_block(record, keyset=intent.keyset, auth=intent.auth, vendor=vendor,
                                    account=intent.cert.account, session=session, now=now)
        book(tx, outcome, new=record is None, now=now)
        rec = outcome.record
        answer = ctx.sign(BlockAnswer(req_id=req_id, session=session, tip=rec.tip, start=rec.start,
                                      position=rec.position, last=rec.last, remaining=rec.position * rec.token_value,
                                      deadline=rec.deadline), "block", digest)
        tx.put_answer(vendor, req_id, envelope.StoredAnswer(digest, answer), now)
        return answer

    answer: bytes = yield Atomic(block, Rows(coin=intent.auth.tip, answer=(vendor, req_id), vendor=vendor))
    return answer


def _settle(ctx: Context, call: Call[SettleRequest]) -> Steps[bytes]:
    vendor, request, digest, now = call.signer, call.request, call.digest, call.now

    def settle(tx: Ledger) -> bytes:
        record = tx.coin(request.tip)  # lock first: a concurrent twin waits here
        again = remembered(tx, vendor, request.req_id, digest)
        if again is not None:
            return again
        refuse_revoked(tx, vendor)  # read in this transaction: a revocation counts at once
        outcome = rules.apply_settle(record, vendor=vendor, session=request.session, index=request.index,
                                     token=request.token, keep_open=request.keep_open, now=now)
        book(tx, outcome, new=False, now=now)
        rec = outcome.record
        credited = sum(c.amount for c in outcome.credits if c.session == request.session)
        answer = ctx.sign(SettleAnswer(req_id=request.req_id, session=request.session, credited=credited,
                                       position=rec.position, spent=rec.spent,
                                       open=rec.status is rules.BlockStatus.OPEN), "settle", digest)
        tx.put_answer(vendor, request.req_id, envelope.StoredAnswer(digest, answer), now)
        return answer

    answer: bytes = yield Atomic(settle, Rows(coin=request.tip, answer=(vendor, request.req_id), vendor=vendor))
    return answer


def _status(ctx: Context, call: Call[StatusRequest]) -> Steps[bytes]:
    vendor, request, now = call.signer, call.request, call.now

    def status(tx: Ledger) -> bytes:
        record = tx.coin(request.tip)
        if record is not None:
            lapsed = rules.apply_lapse(record, now)
            if lapsed.credits or lapsed.record != record:
                book(tx, lapsed, new=False, now=now)
            record = lapsed.record
        if record is not None and record.vendor != vendor:
            # A vendor learns only about coins it blocked last: anything else would let any
            # vendor follow any coin's position and other vendors' deadlines. Such a coin is
            # answered exactly like one the bank has never seen.
            record = None
        state = rules.coin_state(record, now)
        return ctx.sign(StatusAnswer(
            req_id=request.req_id, tip=request.tip, known=record is not None,
            position=None if record is None else record.position, spent=state == "spent",
            blocked_until=record.deadline if record is not None and state == "blocked" else None,
            session=record.session if record is not None else None), "status", call.digest)

    answer: bytes = yield Atomic(status, Rows(coin=request.tip))
    return answer


OPERATIONS: dict[str, Operation[Any]] = {
    "withdraw": Operation(WithdrawRequest, "user", withdraw),
    "block": Operation(BlockRequest, "vendor", _block),
    "settle": Operation(SettleRequest, "vendor", _settle),
    "status": Operation(StatusRequest, "vendor", _status),
    "exchange": Operation(ExchangeRequest, None, exchange),
    "restore": Operation(RestoreRequest, None, restore),
}
"""Every operation the bank answers, by topic name (the same names as ``messages.OPS``)."""


SWEEP_BATCH = 500
"""Open blocks lapsed per batch: each batch is one read, then one transaction per coin."""
SWEEP_BATCHES = 20
"""Batches per sweep at most: a sweep that finds a full batch goes on to the next one, up to this."""


def sweep(now: int, batch: int = SWEEP_BATCH, batches: int = SWEEP_BATCHES) -> Steps[int]:
    """Lapse every open block past its deadline, crediting what the bank saw. Returns the count.

    Batch after batch while a batch comes back full, so a backlog of lapsed blocks is worked off
    in one sweep rather than ``batch`` per interval (at most ``batches`` batches: the next sweep
    goes on).
    """
    count = 0
    for _ in range(batches):
        tips: list[bytes] = yield Atomic(lambda tx: tx.due_to_lapse(now, batch))
        for tip in tips:
            def lapse(tx: Ledger, tip: bytes = tip) -> None:
                record = tx.coin(tip)
                if record is not None:
                    outcome = rules.apply_lapse(record, now)
                    if outcome.record != record:
                        book(tx, outcome, new=False, now=now)
            yield Atomic(lapse, Rows(coin=tip))
        count += len(tips)
        if len(tips) < batch:
            break
    return count
