"""The bank's request handling: signed bytes in, signed answer bytes out, never an exception.

Per request: decode and verify outside any transaction (signatures, certificate, coin, sealed
authorization — and the blind signatures of a withdrawal, which are only released if the
debit commits); then, in one transaction: the stored answer for ``(signer, req_id)`` if there is
one, else the pure rules, the journal, and the answer stored under that key. The row that the
request changes (coin or account) is locked *before* the stored answer is looked up, so a
duplicate arriving while its twin is being applied waits and then finds the twin's answer. A refusal changes
nothing and is not stored, so a retry after the cause is gone may succeed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, envelope
from protocol.certificates import CertificateCache
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.messages import (
    OPS,
    BlockAnswer,
    ErrorAnswer,
    Message,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawAnswer,
    WithdrawRequest,
)
from protocol.rules import bank as rules
from protocol.rules.requests import BlockWindow, verify_block, verify_signed

from .keys import BankKeys
from .metrics import BankMetrics
from .store import Store, Tx

__all__ = ["BankService"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_DEFER_SYNC: ContextVar[bool] = ContextVar("defer_sync", default=False)


@dataclass
class BankService:
    """Answers the operations of DESIGN.md §3-§4 for one bank."""

    keys: BankKeys
    store: Store
    window: BlockWindow = field(default_factory=BlockWindow)
    clock: Callable[[], float] = time.time
    _account_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    _vendor_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    _certificates: CertificateCache | None = None
    metrics: BankMetrics | None = None

    def __post_init__(self) -> None:
        self._certificates = CertificateCache(self.keys.keyring.ca_key, self.keys.bank)

    async def handle(self, op: str, data: bytes, *, defer_sync: bool = False) -> bytes:
        """The signed answer to one request (an :class:`ErrorAnswer` for any refusal).

        With ``defer_sync`` the answer may rest on commits not yet on disk: the caller must
        call ``store.flush()`` before sending it (see :meth:`Store.run`).
        """
        start = time.perf_counter()
        token = _DEFER_SYNC.set(defer_sync)
        try:
            answer, result = await self._handle(op, data)
        finally:
            _DEFER_SYNC.reset(token)
        if self.metrics is not None:
            self.metrics.observe(op, result, time.perf_counter() - start)
        return answer

    async def _handle(self, op: str, data: bytes) -> tuple[bytes, str]:
        """The answer and its result label (``ok`` or the refusal's code)."""
        req_id: bytes | None = None
        try:
            if op not in OPS:
                raise RemoteProtocolError(f"unknown operation {op[:32]!r}", ErrorCode.UNKNOWN_OP)
            signed = cose.decode_sign1(data, max_size=OPS[op][0].MAX_SIZE)
            request = OPS[op][0].decode(signed.payload)
            req_id = getattr(request, "req_id", None)
            answer = await self._dispatch(op, signed, request, envelope.request_digest(data), int(self.clock()))
            return answer, "ok"
        except RemoteProtocolError as exc:
            log.info("refused %s: %s (%s)", op[:32], exc.code.wire, exc.message)
            return self._error(op, exc.code, exc.message, req_id), exc.code.wire
        except Exception:
            log.exception("internal error handling %s", op[:32])
            return self._error(op, ErrorCode.INTERNAL, "internal error", req_id), ErrorCode.INTERNAL.wire

    def _error(self, op: str, code: ErrorCode, message: str, req_id: bytes | None) -> bytes:
        answer = ErrorAnswer(code=code.wire, message=message[:200], req_id=req_id)
        return envelope.sign_answer(answer, self.keys.answer_key, self.keys.bank, op if op in OPS else "error")

    def _sign(self, answer: Message, op: str) -> bytes:
        return envelope.sign_answer(answer, self.keys.answer_key, self.keys.bank, op)

    async def _key(self, table: str, name: str, cache: dict[str, Ed25519PublicKey]) -> Ed25519PublicKey | None:
        if name not in cache:
            sql = ("SELECT public_key FROM accounts WHERE name = ? AND kind = 'user'" if table == "accounts"
                   else "SELECT public_key FROM vendors WHERE vendor = ?")
            row = await self._run(lambda tx: tx.one(sql, (name,)))
            if row is None or row[0] is None:
                return None
            cache[name] = Ed25519PublicKey.from_public_bytes(bytes(row[0]))
        return cache[name]

    async def _verify(self, signed: cose.Sign1, op: str, table: str, cache: dict[str, Ed25519PublicKey]) -> str:
        signer = signed.kid.decode("ascii", "replace")
        key = await self._key(table, signer, cache)
        return verify_signed(signed, self.keys.bank, op, lambda _name: key)

    async def _run(self, fn: Callable[[Tx], T]) -> T:
        return await self.store.run(fn, defer_sync=_DEFER_SYNC.get())

    def _remembered(self, tx: Tx, signer: str, req_id: bytes, digest: bytes) -> bytes | None:
        return envelope.check_replay(tx.answer(signer, req_id), digest)

    async def _dispatch(self, op: str, signed: cose.Sign1, request: Message, digest: bytes, now: int) -> bytes:
        if isinstance(request, WithdrawRequest):
            return await self._withdraw(signed, request, digest, now)
        if isinstance(request, SettleRequest):
            return await self._settle(signed, request, digest, now)
        if isinstance(request, StatusRequest):
            return await self._status(signed, request, now)
        return await self._block(signed, digest, now)

    async def _withdraw(self, signed: cose.Sign1, request: WithdrawRequest, digest: bytes, now: int) -> bytes:
        signer = await self._verify(signed, "withdraw", "accounts", self._account_keys)
        if signer != request.account:
            raise RemoteProtocolError("request signed by another account", ErrorCode.BAD_SIGNATURE)
        stored = await self._run(lambda tx: self._remembered(tx, signer, request.req_id, digest))
        if stored is not None:
            return stored
        info = self.keys.keyring.withdrawable(request.keyset, now)
        signer_key = self.keys.signers[info.id]
        blind_sigs = tuple(signer_key.sign(m) for m in request.blinded)  # released only if the debit commits

        def debit(tx: Tx) -> bytes:
            account = tx.account(signer, lock=True)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, signer, request.req_id, digest)
            if again is not None:
                return again
            if account is None:
                raise RemoteProtocolError("unknown account", ErrorCode.UNKNOWN_ACCOUNT)
            balance = rules.apply_withdraw(account[2], info, len(blind_sigs))
            tx.transfer(signer, "outstanding", account[2] - balance, "withdraw", request.req_id, now,
                        running=(signer,))
            answer = self._sign(WithdrawAnswer(req_id=request.req_id, keyset=info.id, blind_sigs=blind_sigs,
                                               balance=balance), "withdraw")
            tx.put_answer(signer, request.req_id, envelope.StoredAnswer(digest, answer), now)
            return answer

        return await self._run(debit)

    def _book(self, tx: Tx, outcome: rules.Outcome, *, new: bool, now: int) -> None:
        tx.put_coin(outcome.record, new=new)
        for credit in outcome.credits:
            tx.transfer("outstanding", credit.account, credit.amount, f"credit:{credit.reason}", credit.tip, now)

    async def _block(self, signed: cose.Sign1, digest: bytes, now: int) -> bytes:
        intent = verify_block(signed, self.keys.keyring, self.keys.sealing_key, now, self.window, self._certificates)
        vendor, request = intent.cert.vendor, intent.request
        session = os.urandom(16)

        def block(tx: Tx) -> bytes:
            record = tx.coin(intent.auth.tip)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, vendor, request.req_id, digest)
            if again is not None:
                return again
            outcome = rules.apply_block(record, keyset=intent.keyset, auth=intent.auth, vendor=vendor,
                                        account=intent.cert.account, session=session, now=now)
            self._book(tx, outcome, new=record is None, now=now)
            rec = outcome.record
            answer = self._sign(BlockAnswer(req_id=request.req_id, session=session, tip=rec.tip, start=rec.start,
                                            position=rec.position, last=rec.last,
                                            remaining=rec.position * rec.token_value, deadline=rec.deadline),
                                "block")
            tx.put_answer(vendor, request.req_id, envelope.StoredAnswer(digest, answer), now)
            return answer

        return await self._run(block)

    async def _settle(self, signed: cose.Sign1, request: SettleRequest, digest: bytes, now: int) -> bytes:
        vendor = await self._verify(signed, "settle", "vendors", self._vendor_keys)

        def settle(tx: Tx) -> bytes:
            record = tx.coin(request.tip)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, vendor, request.req_id, digest)
            if again is not None:
                return again
            outcome = rules.apply_settle(record, vendor=vendor, session=request.session,
                                         index=request.index, token=request.token, keep_open=request.keep_open,
                                         now=now)
            self._book(tx, outcome, new=False, now=now)
            rec = outcome.record
            credited = sum(c.amount for c in outcome.credits if c.session == request.session)
            answer = self._sign(SettleAnswer(req_id=request.req_id, session=request.session, credited=credited,
                                             position=rec.position, spent=rec.spent,
                                             open=rec.status is rules.BlockStatus.OPEN), "settle")
            tx.put_answer(vendor, request.req_id, envelope.StoredAnswer(digest, answer), now)
            return answer

        return await self._run(settle)

    async def _status(self, signed: cose.Sign1, request: StatusRequest, now: int) -> bytes:
        vendor = await self._verify(signed, "status", "vendors", self._vendor_keys)

        def status(tx: Tx) -> bytes:
            record = tx.coin(request.tip)
            if record is not None:
                lapsed = rules.apply_lapse(record, now)
                if lapsed.credits or lapsed.record != record:
                    self._book(tx, lapsed, new=False, now=now)
                record = lapsed.record
            state = rules.coin_state(record, now)
            mine = record is not None and record.vendor == vendor and state == "blocked"
            return self._sign(StatusAnswer(
                req_id=request.req_id, tip=request.tip, known=record is not None,
                position=None if record is None else record.position, spent=state == "spent",
                blocked_until=record.deadline if record is not None and state == "blocked" else None,
                session=record.session if mine and record is not None else None), "status")

        return await self._run(status)

    async def sweep(self) -> int:
        """Lapse every open block past its deadline, crediting what the bank saw. Returns the count."""
        now = int(self.clock())
        tips = await self.store.run(lambda tx: tx.due_to_lapse(now))
        for tip in tips:
            def lapse(tx: Tx, tip: bytes = tip) -> None:
                record = tx.coin(tip)
                if record is not None:
                    outcome = rules.apply_lapse(record, now)
                    if outcome.record != record:
                        self._book(tx, outcome, new=False, now=now)
            await self.store.run(lapse)
        return len(tips)
