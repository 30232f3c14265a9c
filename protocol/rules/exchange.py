"""Pure rules of a coin's later life: keyset phases, exchange (refresh) and its change.

**Phases** live in :mod:`~m2mpay.protocol.rules.phases` (re-exported here): ``active`` →
``spend-only`` → ``exchange-only`` → ``closed``, never back.

**Exchange** (:func:`apply_exchange`): the coin's deepest preimage spends its whole remainder ``p``
at once; the outputs (all signed) and the change slots the bank picks (:func:`plan_change`) must
add up to ``p × token value`` exactly, or nothing happens. Every refusal is a
:class:`RemoteProtocolError` with a stable code; the checks run cheapest first and none of them
depends on anything but the request, the coin's record, the keys and ``now``.

Money rule: an exchange moves ``p`` tokens of one coin's value, exactly, from the old keyset's
outstanding coins to the new keysets' outstanding coins; a lapse booked on the way credits the
vendor first, as any other rule does (:func:`~m2mpay.protocol.rules.bank.apply_lapse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .. import hashchain
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages.coins import KeysetInfo
from ..messages.exchange import (
    MAX_OUTPUTS,
    ExchangeAnswer,
    ExchangeProof,
    ExchangeRequest,
    KeysetPhase,
    Output,
)
from .bank import BlockStatus, CoinRecord, Credit, apply_lapse
from .keyring import Keyring
from .phases import (
    ALLOWED,
    REDEEM_GRACE,
    Phase,
    Use,
    check_phase,
    follow_phase,
    follow_phases,
    phase_at,
    require,
    retire,
)

__all__ = [
    "ALLOWED",
    "REDEEM_GRACE",
    "ExchangeOutcome",
    "Phase",
    "StoredExchange",
    "Use",
    "apply_exchange",
    "change_slots",
    "check_answer",
    "check_phase",
    "decompose",
    "follow_phase",
    "follow_phases",
    "phase_at",
    "plan_change",
    "require",
    "retire",
    "stored_answer",
]

def _pick(group: Iterable[KeysetInfo]) -> dict[int, KeysetInfo]:
    """One keyset per token count: the longest-lived, then the lowest id (wallets agree)."""
    chosen: dict[int, KeysetInfo] = {}
    for info in sorted(group, key=lambda k: (-k.spend_until, k.id)):
        chosen.setdefault(info.n, info)
    return chosen


def decompose(value: int, keysets: Iterable[KeysetInfo], *, max_outputs: int = MAX_OUTPUTS) -> tuple[KeysetInfo, ...]:
    """The fewest coins of ``keysets`` (those whose ``n`` is a power of two) worth ``value`` in all.

    For each token value dividing ``value``, counts are taken largest first; powers of two are a
    canonical coin system, so that is the fewest for that token value. With every power of two up
    to ``2^16`` offered for one token value, any remainder of a coin of that token value works
    with at most 17 coins. ``value_mismatch`` when nothing fits within ``max_outputs``.
    """
    if value <= 0:
        raise LocalProtocolError("nothing to decompose", ErrorCode.VALUE_MISMATCH)
    groups: dict[int, list[KeysetInfo]] = {}
    for info in keysets:
        if info.n & (info.n - 1) == 0:
            groups.setdefault(info.token_value, []).append(info)
    best: list[KeysetInfo] | None = None
    for token_value in sorted(groups, reverse=True):
        if value % token_value:
            continue
        tokens, pick = value // token_value, list[KeysetInfo]()
        for n, info in sorted(_pick(groups[token_value]).items(), reverse=True):
            count = tokens // n
            if len(pick) + count > max_outputs:
                break  # too many coins: ``tokens`` stays unpaid, so this token value fails
            tokens -= count * n
            pick += [info] * count
        if tokens == 0 and (best is None or len(pick) < len(best)):
            best = pick
    if best is None:
        raise LocalProtocolError(f"no {max_outputs} coins of the offered keysets make {value}",
                                 ErrorCode.VALUE_MISMATCH)
    return tuple(best)


def change_slots(unit: int, max_gap: int, keysets: Iterable[KeysetInfo]) -> tuple[KeysetInfo, ...]:
    """Change a wallet sends to be sure of its remainder: keysets worth ``unit × 2^i`` for every
    ``i`` below ``max_gap``'s bit length, so any gap of ``0..max_gap`` units is covered."""
    by_value: dict[int, KeysetInfo] = {}
    for info in sorted(keysets, key=lambda k: (-k.spend_until, k.id)):
        by_value.setdefault(info.value, info)
    slots = []
    for i in range(max(max_gap, 0).bit_length()):
        found = by_value.get(unit << i)
        if found is None:
            raise LocalProtocolError(f"no keyset worth {unit << i} for change", ErrorCode.VALUE_MISMATCH)
        slots.append(found)
    return tuple(slots)


def plan_change(gap: int, values: Sequence[int]) -> tuple[int, ...]:
    """Which change slots (by index, increasing) the bank signs to cover ``gap`` exactly.

    Largest value first, lower index first among equals: one deterministic answer the wallet
    predicts and checks. ``value_mismatch`` when the slots cannot make ``gap``.
    """
    left, used = gap, []
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        if values[i] <= left:
            used.append(i)
            left -= values[i]
    if left:
        raise RemoteProtocolError("outputs and change cannot make the coin's remainder", ErrorCode.VALUE_MISMATCH)
    return tuple(sorted(used))


@dataclass(frozen=True, slots=True)
class ExchangeOutcome:
    """What an exchange does, in one transaction: the coin at 0, a lapse's credits, and the
    blinded messages to sign (outputs, then the change slots used)."""

    record: CoinRecord
    credits: tuple[Credit, ...]
    tokens: int
    """The coin's remainder ``p`` that the exchange spends."""
    value: int
    """``p × token value``: exactly what the signed outputs are worth."""
    sign: tuple[Output, ...]
    change_used: tuple[int, ...]

    def answer(self, req_id: bytes, blind_sigs: Sequence[bytes]) -> ExchangeAnswer:
        """The answer, given one blind signature per message of :attr:`sign`, in order."""
        if len(blind_sigs) != len(self.sign):
            raise LocalProtocolError("one blind signature per output")
        split = len(self.sign) - len(self.change_used)
        return ExchangeAnswer(req_id=req_id, tip=self.record.tip, position=self.tokens,
                              blind_sigs=tuple(blind_sigs[:split]), change_used=self.change_used,
                              change_sigs=tuple(blind_sigs[split:]))


def _check_output(out: Output, currency: str, keyring: Keyring, phases: Mapping[str, KeysetPhase],
                  signed_before: Collection[bytes], now: int) -> int:
    info = keyring.keyset(out.keyset)
    if info.currency != currency:
        raise RemoteProtocolError(f"output in {info.currency}, coin in {currency}", ErrorCode.VALUE_MISMATCH)
    require(info, phases.get(info.id), now, Use.ISSUE)
    key = keyring.rsa_keys[info.id]
    if len(out.blinded) != key.size or int.from_bytes(out.blinded, "big") >= key.n:
        raise RemoteProtocolError("blinded message does not fit the keyset's key")
    if out.blinded in signed_before:
        raise RemoteProtocolError("blinded message already signed", ErrorCode.REPLAY)
    return info.value


def apply_exchange(
    record: CoinRecord | None,
    *,
    request: ExchangeRequest,
    proof: ExchangeProof,
    keyring: Keyring,
    phases: Mapping[str, KeysetPhase],
    signed_before: Collection[bytes],
    now: int,
) -> ExchangeOutcome:
    """Check an exchange against the coin's record and decide it (no I/O, nothing signed).

    ``proof`` is the opened ``request.sealed``; ``phases`` the bank's phase records by keyset;
    ``signed_before`` those of the request's blinded messages the bank has signed before.
    """
    if not (hmac.compare_digest(proof.tip, request.coin.tip) and hmac.compare_digest(proof.req_id, request.req_id)
            and hmac.compare_digest(proof.outputs, request.digest)):
        raise RemoteProtocolError("sealed proof is not for this request", ErrorCode.BAD_SIGNATURE)
    info = keyring.keyset(request.coin.keyset)
    require(info, phases.get(info.id), now, Use.EXCHANGE)
    coin = request.coin
    if record is not None and record.keyset != info.id:
        # One secret can end two chains at one tip (S and H^k(S)); the bank knows the tip under
        # the keyset that registered it, and values it by that keyset only.
        raise RemoteProtocolError("coin's tip is registered under another keyset")
    if not keyring.signed(coin):
        raise RemoteProtocolError("coin signature does not verify", ErrorCode.BAD_SIGNATURE)
    out_value = sum(_check_output(o, info.currency, keyring, phases, signed_before, now) for o in request.outputs)
    change_values = [_check_output(o, info.currency, keyring, phases, signed_before, now) for o in request.change]
    lapsed = apply_lapse(record if record is not None else CoinRecord.register(coin.tip, info), now)
    current = lapsed.record
    if current.status is BlockStatus.OPEN:
        raise RemoteProtocolError("coin is blocked", ErrorCode.COIN_BLOCKED)
    if current.position == 0:
        raise RemoteProtocolError("coin is spent", ErrorCode.COIN_SPENT)
    hashchain.verify_span(proof.token, current.position, current.last)
    value = current.position * current.token_value
    if out_value > value:
        raise RemoteProtocolError("outputs worth more than the coin's remainder", ErrorCode.VALUE_MISMATCH)
    used = plan_change(value - out_value, change_values)
    spent = dataclasses.replace(current, position=0, last=proof.token, status=BlockStatus.NONE, session=None,
                                vendor=None, account=None, start=0, deadline=0)
    return ExchangeOutcome(record=spent, credits=lapsed.credits, tokens=current.position, value=value,
                           sign=request.outputs + tuple(request.change[i] for i in used), change_used=used)


@dataclass(frozen=True, slots=True)
class StoredExchange:
    """What the bank keeps of a done exchange, under the coin's tip: one per coin, for ever."""

    req_id: bytes
    request_hash: bytes
    """SHA-256 of the exact request bytes."""
    answer: bytes


def stored_answer(stored: StoredExchange | None, request_bytes: bytes, req_id: bytes) -> bytes | None:
    """The stored answer if these bytes are a retry of the exchange that spent the coin;
    ``None`` if the coin was never exchanged. Looked up first, before any other check."""
    if stored is None:
        return None
    if hmac.compare_digest(stored.request_hash, hashlib.sha256(request_bytes).digest()):
        return stored.answer
    if hmac.compare_digest(stored.req_id, req_id):
        raise RemoteProtocolError("req_id used by another request", ErrorCode.REPLAY)
    raise RemoteProtocolError("coin already exchanged", ErrorCode.COIN_SPENT)


def check_answer(request: ExchangeRequest, answer: ExchangeAnswer, token_value: int,
                 keysets: Mapping[str, KeysetInfo]) -> tuple[tuple[Output, bytes], ...]:
    """The wallet's check of an answer: each output with its blind signature, in order.

    The bank must sign every output and exactly the change :func:`plan_change` picks for the
    remainder it states; anything else (a bank skimming change) is ``value_mismatch``.
    """
    if answer.req_id != request.req_id or answer.tip != request.coin.tip:
        raise RemoteProtocolError("exchange answer does not match the request")
    if len(answer.blind_sigs) != len(request.outputs):
        raise RemoteProtocolError("exchange answer misses outputs", ErrorCode.VALUE_MISMATCH)
    out_value = sum(keysets[o.keyset].value for o in request.outputs)
    expected = plan_change(answer.position * token_value - out_value, [keysets[o.keyset].value for o in request.change])
    if expected != answer.change_used:
        raise RemoteProtocolError("exchange answer signed other change", ErrorCode.VALUE_MISMATCH)
    pairs = list(zip(request.outputs, answer.blind_sigs, strict=True))
    pairs += [(request.change[i], sig) for i, sig in zip(answer.change_used, answer.change_sigs, strict=True)]
    return tuple(pairs)
