"""The bank's request handling: signed bytes in, signed answer bytes out, never an exception.

Per request: decode and verify the signer's signature; the stored answer for ``(signer, req_id)``
if there is one (before any check that depends on the time, so an honest retry always gets its
first answer); then the remaining checks outside any transaction (certificate, coin, sealed
authorization); then, in one transaction: the stored answer again, else the pure rules, the
journal, and the answer stored under that key. Every answer is signed over the request's digest.
The row that the request changes (coin or account) is locked *before* the stored answer is looked
up, so a duplicate arriving while its twin is being applied waits and then finds the twin's answer.

A withdrawal's refusal is stored like an answer (a replay costs a lookup, never RSA work, and the
refusal is final for that request); the refusal of a block or settlement changes nothing and is
not stored, so a retry after the cause is gone (a lapse, a reconnect) may succeed. Withdrawals
sign their blinded messages only after the debit is committed (see :meth:`BankService._withdraw`).
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

from m2mpay.protocol import cose, envelope
from m2mpay.protocol.certificates import CertificateCache
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import (
    OPS,
    BlockAnswer,
    BlockRequest,
    ErrorAnswer,
    Message,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawAnswer,
    WithdrawRequest,
)
from m2mpay.protocol.rules import bank as rules
from m2mpay.protocol.rules.requests import BlockWindow, verify_block, verify_signed

from .keys import BankKeys
from .metrics import BankMetrics
from .revocation import refuse_revoked
from .store import Rows, Store, Tx

__all__ = ["BankService", "Reply"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_DEFER_SYNC: ContextVar[bool] = ContextVar("defer_sync", default=False)
_SIGNER_TABLE = {"withdraw": "accounts", "block": "vendors", "settle": "vendors", "status": "vendors"}
"""Whose keys sign each operation: user accounts withdraw, vendors do everything else."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A signed answer and who it is for: the verified signer, or ``None`` when the request was
    refused before its signature could be verified (it then goes back where it came from)."""

    answer: bytes
    signer: str | None


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
        return (await self.reply(op, data, defer_sync=defer_sync)).answer

    async def reply(self, op: str, data: bytes, *, defer_sync: bool = False) -> Reply:
        """:meth:`handle`, with the verified signer the answer is for. Never raises for any input."""
        start = time.perf_counter()
        token = _DEFER_SYNC.set(defer_sync)
        try:
            answer, result, signer = await self._handle(op, data)
        finally:
            _DEFER_SYNC.reset(token)
        if self.metrics is not None:
            self.metrics.observe(op, result, time.perf_counter() - start)
        return Reply(answer, signer)

    async def _handle(self, op: str, data: bytes) -> tuple[bytes, str, str | None]:
        """The answer, its result label (``ok`` or the refusal's code) and the verified signer."""
        req_id: bytes | None = None
        signer: str | None = None
        digest = envelope.request_digest(data)
        try:
            if op not in OPS:
                raise RemoteProtocolError(f"unknown operation {op[:32]!r}", ErrorCode.UNKNOWN_OP)
            signed = cose.decode_sign1(data, max_size=OPS[op][0].MAX_SIZE)
            request = OPS[op][0].decode(signed.payload)
            req_id = getattr(request, "req_id", None)
            table = _SIGNER_TABLE[op]
            signer = await self._verify(signed, op, table, self._account_keys if table == "accounts"
                                        else self._vendor_keys)
            answer = await self._dispatch(signed, request, signer, digest, int(self.clock()))
            return answer, "ok", signer
        except RemoteProtocolError as exc:
            log.info("refused %s: %s (%s)", op[:32], exc.code.wire, exc.message)
            return self._error(op, exc.code, exc.message, req_id, digest), exc.code.wire, signer
        except Exception:
            log.exception("internal error handling %s", op[:32])
            return (self._error(op, ErrorCode.INTERNAL, "internal error", req_id, digest), ErrorCode.INTERNAL.wire,
                    signer)

    def _error(self, op: str, code: ErrorCode, message: str, req_id: bytes | None, digest: bytes) -> bytes:
        answer = ErrorAnswer(code=code.wire, message=message[:200], req_id=req_id)
        return envelope.sign_answer(answer, self.keys.answer_key, self.keys.bank, op if op in OPS else "error",
                                    request_digest=digest)

    def _sign(self, answer: Message, op: str, digest: bytes) -> bytes:
        return envelope.sign_answer(answer, self.keys.answer_key, self.keys.bank, op, request_digest=digest)

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

    async def _run(self, fn: Callable[[Tx], T], rows: Rows | None = None) -> T:
        """``fn`` in one transaction; ``rows``, when given, are what it reads first (see :meth:`Store.run`)."""
        return await self.store.run(fn, defer_sync=_DEFER_SYNC.get(), rows=rows)

    def _remembered(self, tx: Tx, signer: str, req_id: bytes, digest: bytes) -> bytes | None:
        return envelope.check_replay(tx.answer(signer, req_id), digest)

    async def _dispatch(self, signed: cose.Sign1, request: Message, signer: str, digest: bytes, now: int) -> bytes:
        """The answer of the operation ``request`` belongs to, ``signer``'s signature verified."""
        if isinstance(request, WithdrawRequest):
            return await self._withdraw(signer, request, digest, now)
        if isinstance(request, SettleRequest):
            return await self._settle(signer, request, digest, now)
        if isinstance(request, StatusRequest):
            return await self._status(signer, request, digest, now)
        if isinstance(request, BlockRequest):
            return await self._block(signed, signer, request, digest, now)
        raise RemoteProtocolError(f"no handler for {type(request).__name__}", ErrorCode.UNKNOWN_OP)

    async def _withdraw(self, signer: str, request: WithdrawRequest, digest: bytes, now: int) -> bytes:
        if signer != request.account:
            raise RemoteProtocolError("request signed by another account", ErrorCode.BAD_SIGNATURE)
        # Blind signing costs ~0.7 ms of RSA per coin, so it comes last and outside any transaction,
        # in two phases. The first transaction decides, under the account's lock: the stored
        # answer; or the checks (keyset, blinded messages, balance), whose refusal is signed and
        # stored under (signer, req_id) at once, so that replaying a refused request costs one
        # lookup; or the debit, with its issuance record and an empty "pending" answer under the
        # key. Only then are the blinded messages signed, and a second transaction puts the answer
        # in place of the pending one. So a refused request never costs a signature, concurrent
        # withdrawals of one account cost only the signatures that were paid for, and no lock (on
        # SQLite: the whole bank's write lock) is held during the RSA work. A crash between the
        # two leaves a paid, pending withdrawal: the honest retry (same bytes) completes it, and
        # since RSA signing is deterministic, whoever completes it produces the same answer.
        stored = await self._run(lambda tx: self._remembered(tx, signer, request.req_id, digest))
        if stored:  # empty: pending, the retry completes it below
            return stored

        def reserve(tx: Tx) -> tuple[bytes | None, int, RemoteProtocolError | None]:
            """The answer already stored; or ``None`` and the balance to report; or the refusal."""
            account = tx.account(signer, lock=True)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, signer, request.req_id, digest)
            if again:
                return again, 0, None
            if again is not None:
                return None, tx.issued_balance(signer, request.req_id), None
            if account is None:
                raise RemoteProtocolError("unknown account", ErrorCode.UNKNOWN_ACCOUNT)
            try:
                info = self.keys.keyring.withdrawable(request.keyset, now)
                signer_key = self.keys.signers[info.id]
                modulus = signer_key.public_key.n
                if any(len(m) != signer_key.size or int.from_bytes(m, "big") >= modulus for m in request.blinded):
                    raise RemoteProtocolError("a blinded message does not fit the keyset's key")
                balance = rules.apply_withdraw(account[2], info, len(request.blinded))
            except RemoteProtocolError as exc:
                refusal = self._error("withdraw", exc.code, exc.message, request.req_id, digest)
                tx.put_answer(signer, request.req_id, envelope.StoredAnswer(digest, refusal), now)
                return None, 0, exc
            tx.transfer(signer, "outstanding", account[2] - balance, "withdraw", request.req_id, now,
                        running=(signer,))
            tx.issue(signer, request.req_id, info.id, len(request.blinded), account[2] - balance, balance, now)
            tx.put_answer(signer, request.req_id, envelope.StoredAnswer(digest, b""), now)
            return None, balance, None

        answer, balance, refused = await self._run(reserve)
        if refused is not None:
            # Stored; raised so the refusal is counted as one. The answer built from it is the
            # stored one, byte for byte: the same ErrorAnswer under a deterministic Ed25519 signature.
            raise refused
        if answer is not None:
            return answer
        signer_key = self.keys.signers[request.keyset]  # not re-checked: the debit is made
        blind_sigs = tuple(signer_key.sign(m) for m in request.blinded)
        final = self._sign(WithdrawAnswer(req_id=request.req_id, keyset=request.keyset, blind_sigs=blind_sigs,
                                          balance=balance), "withdraw", digest)
        return await self._run(lambda tx: tx.fill_answer(signer, request.req_id, final))

    def _book(self, tx: Tx, outcome: rules.Outcome, *, new: bool, now: int) -> None:
        tx.put_coin(outcome.record, new=new)
        for credit in outcome.credits:
            tx.transfer("outstanding", credit.account, credit.amount, f"credit:{credit.reason}", credit.tip, now)

    async def _block(self, signed: cose.Sign1, vendor: str, request: BlockRequest, digest: bytes, now: int) -> bytes:
        # A retry gets its first answer even if the window, the certificate or the keyset would
        # now refuse it: the coin may be blocked under that answer.
        stored = await self._run(lambda tx: self._remembered(tx, vendor, request.req_id, digest),
                                 Rows(answer=(vendor, request.req_id)))
        if stored is not None:
            return stored
        intent = verify_block(signed, self.keys.keyring, self.keys.sealing_key, now, self.window, self._certificates)
        session = os.urandom(16)

        def block(tx: Tx) -> bytes:
            record = tx.coin(intent.auth.tip)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, vendor, request.req_id, digest)
            if again is not None:
                return again
            refuse_revoked(tx, vendor)  # read in this transaction: a revocation counts at once
            outcome = rules.apply_block(record, keyset=intent.keyset, auth=intent.auth, vendor=vendor,
                                        account=intent.cert.account, session=session, now=now)
            self._book(tx, outcome, new=record is None, now=now)
            rec = outcome.record
            answer = self._sign(BlockAnswer(req_id=request.req_id, session=session, tip=rec.tip, start=rec.start,
                                            position=rec.position, last=rec.last,
                                            remaining=rec.position * rec.token_value, deadline=rec.deadline),
                                "block", digest)
            tx.put_answer(vendor, request.req_id, envelope.StoredAnswer(digest, answer), now)
            return answer

        return await self._run(block, Rows(coin=intent.auth.tip, answer=(vendor, request.req_id), vendor=vendor))

    async def _settle(self, vendor: str, request: SettleRequest, digest: bytes, now: int) -> bytes:

        def settle(tx: Tx) -> bytes:
            record = tx.coin(request.tip)  # lock first: a concurrent twin waits here
            again = self._remembered(tx, vendor, request.req_id, digest)
            if again is not None:
                return again
            refuse_revoked(tx, vendor)  # read in this transaction: a revocation counts at once
            outcome = rules.apply_settle(record, vendor=vendor, session=request.session,
                                         index=request.index, token=request.token, keep_open=request.keep_open,
                                         now=now)
            self._book(tx, outcome, new=False, now=now)
            rec = outcome.record
            credited = sum(c.amount for c in outcome.credits if c.session == request.session)
            answer = self._sign(SettleAnswer(req_id=request.req_id, session=request.session, credited=credited,
                                             position=rec.position, spent=rec.spent,
                                             open=rec.status is rules.BlockStatus.OPEN), "settle", digest)
            tx.put_answer(vendor, request.req_id, envelope.StoredAnswer(digest, answer), now)
            return answer

        return await self._run(settle, Rows(coin=request.tip, answer=(vendor, request.req_id), vendor=vendor))

    async def _status(self, vendor: str, request: StatusRequest, digest: bytes, now: int) -> bytes:

        def status(tx: Tx) -> bytes:
            record = tx.coin(request.tip)
            if record is not None:
                lapsed = rules.apply_lapse(record, now)
                if lapsed.credits or lapsed.record != record:
                    self._book(tx, lapsed, new=False, now=now)
                record = lapsed.record
            if record is not None and record.vendor != vendor:
                # A vendor learns only about coins it blocked last: anything else would let any
                # vendor follow any coin's position and other vendors' deadlines. Such a coin is
                # answered exactly like one the bank has never seen.
                record = None
            state = rules.coin_state(record, now)
            return self._sign(StatusAnswer(
                req_id=request.req_id, tip=request.tip, known=record is not None,
                position=None if record is None else record.position, spent=state == "spent",
                blocked_until=record.deadline if record is not None and state == "blocked" else None,
                session=record.session if record is not None else None), "status", digest)

        return await self._run(status, Rows(coin=request.tip))

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
            await self.store.run(lapse, rows=Rows(coin=tip))
        return len(tips)

