"""The bank's coin rules as a pure state machine (DESIGN.md §4, §4a).

The bank keeps one :class:`CoinRecord` per coin it has seen: position ``p``, ``last = H^p(S)``
and the current block. Its block status moves by the table :data:`TRANSITIONS`; a pair missing
from it is refused with the code in :data:`REFUSALS`. Functions take the record and the current
time and return an :class:`Outcome` — the new record and the credits to book — and never do I/O.

Money rule: a vendor is credited ``start - j`` tokens when it settles at ``j``, and ``start``
moves to ``j``; a lapse credits ``start - p`` (what the bank saw) and moves ``start`` to ``p``.
So every token below the registration point is credited exactly once, to the session that
revealed it, and ``credited`` never exceeds ``n``.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from dataclasses import dataclass

from .. import hashchain
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages import Authorization, KeysetInfo

__all__ = [
    "REFUSALS",
    "TRANSITIONS",
    "BlockStatus",
    "CoinEvent",
    "CoinRecord",
    "Credit",
    "Outcome",
    "apply_block",
    "apply_lapse",
    "apply_settle",
    "apply_withdraw",
    "coin_state",
]


class BlockStatus(enum.Enum):
    """Where a coin's current block stands."""

    NONE = "none"  # registered, not blocked (never, or closed by a settlement)
    OPEN = "open"  # blocked for one vendor's session until its deadline
    LAPSED = "lapsed"  # deadline passed unsettled; credited for what the bank saw


class CoinEvent(enum.Enum):
    """What can happen to a registered coin."""

    BLOCK = "block"
    SETTLE = "settle"
    CHECKPOINT = "checkpoint"  # a settlement with keep_open
    LAPSE = "lapse"


TRANSITIONS: dict[tuple[BlockStatus, CoinEvent], BlockStatus] = {
    (BlockStatus.NONE, CoinEvent.BLOCK): BlockStatus.OPEN,
    (BlockStatus.LAPSED, CoinEvent.BLOCK): BlockStatus.OPEN,
    (BlockStatus.OPEN, CoinEvent.SETTLE): BlockStatus.NONE,
    (BlockStatus.OPEN, CoinEvent.CHECKPOINT): BlockStatus.OPEN,
    (BlockStatus.OPEN, CoinEvent.LAPSE): BlockStatus.LAPSED,
    (BlockStatus.LAPSED, CoinEvent.SETTLE): BlockStatus.NONE,  # late settlement
}
"""Block status transitions. Everything else is refused."""

REFUSALS: dict[tuple[BlockStatus, CoinEvent], ErrorCode] = {
    (BlockStatus.OPEN, CoinEvent.BLOCK): ErrorCode.COIN_BLOCKED,
    (BlockStatus.NONE, CoinEvent.SETTLE): ErrorCode.SESSION_CLOSED,
    (BlockStatus.NONE, CoinEvent.CHECKPOINT): ErrorCode.SESSION_CLOSED,
    (BlockStatus.LAPSED, CoinEvent.CHECKPOINT): ErrorCode.DEADLINE,
}
"""The error code for each refused pair (LAPSE of a non-open block is a no-op, not an error)."""


def _step(status: BlockStatus, event: CoinEvent) -> BlockStatus:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        code = REFUSALS.get((status, event), ErrorCode.BAD_REQUEST)
        raise RemoteProtocolError(f"cannot {event.value} a coin whose block is {status.value}", code) from None


@dataclass(frozen=True, slots=True)
class CoinRecord:
    """The bank's record of one coin."""

    tip: bytes
    keyset: str
    n: int
    token_value: int
    position: int
    last: bytes
    status: BlockStatus = BlockStatus.NONE
    session: bytes | None = None
    vendor: str | None = None
    account: str | None = None
    start: int = 0
    """Position up to which the current session has been credited."""
    deadline: int = 0
    credited: int = 0
    """Tokens credited over the coin's life; never above ``n``."""

    @classmethod
    def register(cls, tip: bytes, keyset: KeysetInfo) -> CoinRecord:
        """A coin seen for the first time stands at ``p = n``, ``last = tip``."""
        return cls(tip=tip, keyset=keyset.id, n=keyset.n, token_value=keyset.token_value,
                   position=keyset.n, last=tip, start=keyset.n)

    @property
    def spent(self) -> bool:
        """All tokens revealed and no block left open."""
        return self.position == 0 and self.status is not BlockStatus.OPEN


@dataclass(frozen=True, slots=True)
class Credit:
    """Tokens of one coin to book from outstanding coins to a vendor account."""

    tip: bytes
    account: str
    vendor: str
    session: bytes
    tokens: int
    amount: int
    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A rule's result: the record to store and the credits to book, in one transaction."""

    record: CoinRecord
    credits: tuple[Credit, ...] = ()


def coin_state(record: CoinRecord | None, now: int) -> str:
    """A coin's state as a word: fresh, idle, blocked, lapsed or spent."""
    if record is None:
        return "fresh"
    if record.status is BlockStatus.OPEN:
        return "blocked" if now < record.deadline else "lapsed"
    if record.status is BlockStatus.LAPSED:
        return "lapsed"
    return "spent" if record.position == 0 else "idle"


def _credit(record: CoinRecord, down_to: int, reason: str) -> tuple[CoinRecord, tuple[Credit, ...]]:
    tokens = record.start - down_to
    if tokens < 0 or record.credited + tokens > record.n:
        raise LocalProtocolError("credit beyond the coin's value")  # an invariant, never input
    if tokens == 0 or record.session is None or record.account is None or record.vendor is None:
        return dataclasses.replace(record, start=down_to), ()
    credit = Credit(tip=record.tip, account=record.account, vendor=record.vendor, session=record.session,
                    tokens=tokens, amount=tokens * record.token_value, reason=reason)
    updated = dataclasses.replace(record, start=down_to, credited=record.credited + tokens)
    return updated, (credit,)


def apply_lapse(record: CoinRecord, now: int) -> Outcome:
    """Lapse an open block whose deadline has passed; otherwise change nothing."""
    if record.status is not BlockStatus.OPEN or now < record.deadline:
        return Outcome(record)
    credited, credits = _credit(record, record.position, "lapse")
    status = _step(record.status, CoinEvent.LAPSE)
    return Outcome(dataclasses.replace(credited, status=status), credits)


def _check_chain(record: CoinRecord, index: int, token: bytes) -> None:
    """``token`` must be ``H^index(S)`` for ``index <= p``: ``H^(p-index)(token) == last``."""
    if index > record.position:
        raise RemoteProtocolError("token index above the coin's position", ErrorCode.REPLAY)
    if index == record.position:
        if not hmac.compare_digest(token, record.last):
            raise RemoteProtocolError("token does not match the chain", ErrorCode.CHAIN_MISMATCH)
        return
    hashchain.verify_span(token, record.position - index, record.last)


def apply_block(
    record: CoinRecord | None,
    *,
    keyset: KeysetInfo,
    auth: Authorization,
    vendor: str,
    account: str,
    session: bytes,
    now: int,
) -> Outcome:
    """Register (if new) and block a coin for ``vendor`` until ``auth.deadline``.

    The sealed authorization's token ``H^index(S)`` must extend the chain below ``p``; it becomes
    the session's first token and the session starts at the old position.
    """
    if record is None:
        record = CoinRecord.register(auth.tip, keyset)
    lapsed = apply_lapse(record, now)
    record = lapsed.record
    if record.position == 0 and record.status is not BlockStatus.OPEN:
        raise RemoteProtocolError("coin is spent", ErrorCode.COIN_SPENT)
    status = _step(record.status, CoinEvent.BLOCK)
    if auth.index >= record.position:
        raise RemoteProtocolError("token already revealed", ErrorCode.REPLAY)
    _check_chain(record, auth.index, auth.token)
    blocked = dataclasses.replace(
        record, status=status, session=session, vendor=vendor, account=account,
        start=record.position, position=auth.index, last=auth.token, deadline=auth.deadline,
    )
    return Outcome(blocked, lapsed.credits)


def apply_settle(
    record: CoinRecord | None,
    *,
    vendor: str,
    session: bytes,
    index: int,
    token: bytes,
    keep_open: bool,
    now: int,
) -> Outcome:
    """Settle (or checkpoint) a session at ``index``: credit ``start - index`` tokens.

    A late settlement — after the deadline — is accepted while nobody has blocked the coin
    since; a checkpoint after the deadline is refused.
    """
    if record is None:
        raise RemoteProtocolError("unknown coin", ErrorCode.UNKNOWN_COIN)
    lapsed = apply_lapse(record, now)
    record = lapsed.record
    if record.session != session or record.vendor != vendor:
        raise RemoteProtocolError("session is not the coin's current one", ErrorCode.SESSION_CLOSED)
    status = _step(record.status, CoinEvent.CHECKPOINT if keep_open else CoinEvent.SETTLE)
    _check_chain(record, index, token)
    if keep_open and index == record.start:
        # A checkpoint that credits nothing would only add a stored answer per request.
        raise RemoteProtocolError("checkpoint credits nothing new", ErrorCode.NO_PROGRESS)
    moved = dataclasses.replace(record, position=index, last=token)
    credited, credits = _credit(moved, index, "checkpoint" if keep_open else "settle")
    return Outcome(dataclasses.replace(credited, status=status), lapsed.credits + credits)


def apply_withdraw(balance: int, keyset: KeysetInfo, count: int) -> int:
    """The account balance after withdrawing ``count`` coins of ``keyset``."""
    if count <= 0:
        raise RemoteProtocolError("nothing to withdraw")
    cost = keyset.value * count
    if cost > balance:
        raise RemoteProtocolError("insufficient funds", ErrorCode.INSUFFICIENT_FUNDS)
    return balance - cost
