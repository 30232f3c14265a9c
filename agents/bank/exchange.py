"""The exchange handler: a coin's whole remainder into fresh blind coins, with no account.

The request is plain CBOR (:class:`~m2mpay.protocol.messages.exchange.ExchangeRequest`), signed by
nobody: the coin authorizes, through its deepest preimage sealed to the bank with the outputs'
digest and the ``req_id`` (docs/LIFECYCLE.md). Like a withdrawal, in two transactions with the RSA
work between them, outside any lock:

1. the stored exchange of this tip is looked up first, before any check that depends on time or
   phase: the same bytes get the same answer (or complete a pending one), the same ``req_id``
   with other bytes is ``replay``, another request for an exchanged coin ``coin_spent``;
2. the sealed proof is opened (HPKE, outside any transaction);
3. under the coin's lock: the stored exchange again (a concurrent twin), the rules
   (:func:`~m2mpay.protocol.rules.exchange.apply_exchange`, with the phases as stored now and the
   blinded messages signed before), then in one transaction the coin at position 0, a lapsed
   block's credit, the journal (the old keyset's outstanding value to the new keysets', one row
   per output keyset), the exchange row with an empty (pending) answer, what it issued per keyset
   and every blinded message it will sign;
4. the messages are signed and the answer replaces the pending one.

Every refusal comes before any signing and changes nothing; refusals are not stored. A block or
settlement of the same coin takes the same row lock, so exactly one of them wins.

The chain check costs up to ``n`` hashes (~30 ms at 2^16) and anyone who saw a coin can send
exchanges of it with guessed tokens, naming nobody to refuse: each bank process spends at most
:data:`EXCHANGE_HASHES_PER_SECOND` on them (:class:`HashBudget`, the coin's ``n`` charged once the
seal has opened and the coin's signature verified, so a forgery costs it nothing); past it an
exchange is refused with ``unavailable`` (not final) before its chain is checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m2mpay.protocol import sealing
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages.exchange import ExchangeAnswer, ExchangeProof, ExchangeRequest, exchange_sealing_info
from m2mpay.protocol.rules.exchange import ExchangeOutcome, StoredExchange, apply_exchange, stored_answer

from .budget import Budget
from .exchange_rows import ExchangeRow, exchange_row, fill_exchange, lock_messages, put_exchange, signed_among
from .ledger import Atomic, Ledger, Steps

if TYPE_CHECKING:
    from .operations import Call, Context

__all__ = ["EXCHANGE_HASHES_PER_SECOND", "EXCHANGE_HASH_BURST", "HashBudget", "exchange"]

EXCHANGE_HASHES_PER_SECOND = 1 << 18
"""Hashes a bank process spends on exchanges' chain checks per second, at most: ~0.12 s of one
core on the machine of docs/BENCHMARKS.md (~2 M SHA-256 of 32 bytes a second in Python), four
exchanges of 2^16-token coins, 2,600 of 100-token ones."""

EXCHANGE_HASH_BURST = 1 << 20
"""Hashes a bank process may spend on exchanges at once, after a quiet spell: sixteen 2^16-token coins."""


@dataclass
class HashBudget(Budget):
    """The exchanges' budget, in hashes (see :class:`~m2mpay.agents.bank.budget.Budget`)."""

    rate: float = EXCHANGE_HASHES_PER_SECOND
    burst: float = EXCHANGE_HASH_BURST


def _stored(row: ExchangeRow | None, data: bytes, req_id: bytes) -> bytes | None:
    """The stored answer (empty: pending) for these bytes, ``None`` for a coin never exchanged;
    ``replay`` or ``coin_spent`` for another request."""
    if row is None:
        return None
    return stored_answer(StoredExchange(req_id=row.req_id, request_hash=row.request_hash, answer=row.answer),
                         data, req_id)


def exchange(ctx: Context, call: Call[ExchangeRequest]) -> Steps[bytes]:
    """The answer to an exchange (see the module's docstring for its steps)."""
    request, data = call.request, call.data
    tip = request.coin.tip
    stored = _stored((yield Atomic(lambda tx: exchange_row(tx, tip))), data, request.req_id)
    if stored:
        return stored
    if stored is None:
        if tip in ctx.exchanging:
            # Anyone who saw the coin can send exchanges of it that cost a chain check each under
            # its lock; one at a time per coin in this process. Not final: a retry gets the answer.
            raise RemoteProtocolError("an exchange of this coin is in progress", ErrorCode.UNAVAILABLE)
        ctx.exchanging.add(tip)
        try:
            return (yield from _first(ctx, call))
        finally:
            ctx.exchanging.discard(tip)
    return (yield from _finish(ctx, call))


def _first(ctx: Context, call: Call[ExchangeRequest]) -> Steps[bytes]:
    """A coin never exchanged: open the seal, decide under the coin's lock, sign, store."""
    request, data, now = call.request, call.data, call.now
    tip = request.coin.tip
    try:
        plain = sealing.open_sealed(request.sealed, ctx.keys.sealing_key, exchange_sealing_info(ctx.keys.bank))
        proof = ExchangeProof.decode(plain)
    except ProtocolError as exc:
        raise RemoteProtocolError("sealed proof does not open", ErrorCode.BAD_SIGNATURE) from exc
    if not _afforded(ctx, request, now):
        raise RemoteProtocolError("too many exchanges now, retry later", ErrorCode.UNAVAILABLE)

    def decide(tx: Ledger) -> bytes:
        record = tx.coin(tip)  # lock first: a concurrent twin, block or settlement waits here
        # A coin the bank never saw has no row to lock: a twin in another process waits on the messages.
        lock_messages(tx, [o.blinded for o in request.outputs + request.change])
        again = _stored(exchange_row(tx, tip), data, request.req_id)
        if again is not None:
            return again
        wanted = {request.coin.keyset, *(o.keyset for o in request.outputs + request.change)}
        phases = {k: p for k in wanted if (p := tx.keyset_phase(k)) is not None}
        outcome = apply_exchange(record, request=request, proof=proof, keyring=ctx.keys.keyring, phases=phases,
                                 signed_before=signed_among(tx, [o.blinded for o in request.outputs
                                                                 + request.change]), now=now)
        _book(ctx, tx, outcome, request, call.digest, new=record is None, now=now)
        return b""

    answer: bytes = yield Atomic(decide)
    if answer:
        return answer
    return (yield from _finish(ctx, call))


def _afforded(ctx: Context, request: ExchangeRequest, now: int) -> bool:
    """Whether the budget holds the coin's chain check (``n`` hashes at most), now taken from it.

    The coin's signature is checked again by the rules; here so that a forged coin, refused there
    before any hashing, spends nothing of the budget the real coins need."""
    info = ctx.keys.keyring.keysets.get(request.coin.keyset)
    if info is None or not ctx.keys.keyring.signed(request.coin):
        return True  # refused by the rules, with no hashing
    return ctx.exchange_budget.take(info.n, now)


def _finish(ctx: Context, call: Call[ExchangeRequest]) -> Steps[bytes]:
    """Sign a recorded (pending) exchange and store its answer; the answer stored."""
    request, tip = call.request, call.request.coin.tip
    row: ExchangeRow | None = yield Atomic(lambda tx: exchange_row(tx, tip))
    final = _sign(ctx, request, call.digest, row)
    stored: bytes = yield Atomic(lambda tx: fill_exchange(tx, tip, final))
    return stored


def _book(ctx: Context, tx: Ledger, outcome: ExchangeOutcome, request: ExchangeRequest, digest: bytes, *,
          new: bool, now: int) -> None:
    """Write what the rules decided, in the transaction that holds the coin's lock."""
    record = outcome.record
    tx.put_coin(record, new=new)
    for credit in outcome.credits:  # a lapsed block: the vendor is credited what the bank saw, first
        tx.transfer("outstanding", credit.account, credit.amount, f"credit:{credit.reason}", credit.tip, now)
    per_keyset = Counter(o.keyset for o in outcome.sign)
    values = {k: count * ctx.keys.keyring.keysets[k].value for k, count in sorted(per_keyset.items())}
    if sum(values.values()) != outcome.value:
        raise RemoteProtocolError("outputs do not add up to the remainder", ErrorCode.INTERNAL)  # never: rules
    for value in values.values():
        # The old keyset's outstanding coins to an output keyset's: one row per output keyset.
        tx.transfer("outstanding", "outstanding", value, "exchange", record.tip, now)
    put_exchange(tx, tip=record.tip, req_id=request.req_id, request_hash=digest, keyset=record.keyset,
                 tokens=outcome.tokens, value=outcome.value, change_used=outcome.change_used,
                 outputs=[(k, per_keyset[k], v) for k, v in values.items()],
                 blinded=[(o.blinded, o.keyset) for o in outcome.sign], now=now)


def _sign(ctx: Context, request: ExchangeRequest, digest: bytes, row: ExchangeRow | None) -> bytes:
    """The signed answer: the outputs and the change used, signed after the commit, outside any lock."""
    if row is None:
        raise RemoteProtocolError("exchange not recorded", ErrorCode.INTERNAL)  # never: recorded just before
    sign = request.outputs + tuple(request.change[i] for i in row.change_used)
    sigs = [ctx.keys.signers[o.keyset].sign(o.blinded) for o in sign]
    split = len(request.outputs)
    answer = ExchangeAnswer(req_id=request.req_id, tip=request.coin.tip, position=row.tokens,
                            blind_sigs=tuple(sigs[:split]), change_used=row.change_used,
                            change_sigs=tuple(sigs[split:]))
    return ctx.sign(answer, "exchange", digest)

