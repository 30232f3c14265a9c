"""Keyset phases as pure rules: what each phase allows, where a keyset stands, how devices follow.

:data:`ALLOWED` is the table: ``active`` → ``spend-only`` → ``exchange-only`` → ``closed``, never
back. A keyset's phase at ``now`` is the later of the phase the bank announced and the one its
dates give (:func:`phase_at`), so devices follow a retirement at once and a deadline without a new
announcement. Devices adopt new records only through :func:`follow_phases`, which refuses a phase
moved back, a redeem deadline brought forward or withdrawals reopened (``phase_rollback``).
A keyset without a record (an announcement from before phases) closes right after ``spend_until``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..messages.coins import PHASES, KeysetInfo, KeysetPhase

__all__ = [
    "ALLOWED",
    "REDEEM_GRACE",
    "Phase",
    "Use",
    "check_phase",
    "follow_phase",
    "follow_phases",
    "phase_at",
    "require",
    "retire",
]

REDEEM_GRACE = 180 * 86400
"""Exchanges stay open this long after ``spend_until`` unless the bank says otherwise."""


class Phase(enum.Enum):
    """Where a keyset stands; the order of :data:`~m2mpay.protocol.messages.exchange.PHASES`."""

    ACTIVE = "active"
    SPEND_ONLY = "spend-only"
    EXCHANGE_ONLY = "exchange-only"
    CLOSED = "closed"

    @property
    def rank(self) -> int:
        """Position in the one direction phases move."""
        return PHASES.index(self.value)


class Use(enum.Enum):
    """What a keyset's phase may allow."""

    WITHDRAW = "withdraw"  # new coins for an account's money
    SPEND = "spend"  # block and settle its coins
    EXCHANGE = "exchange"  # take its coins in to an exchange
    ISSUE = "issue"  # sign an exchange's outputs with it


ALLOWED: dict[Phase, frozenset[Use]] = {
    Phase.ACTIVE: frozenset(Use),
    Phase.SPEND_ONLY: frozenset({Use.SPEND, Use.EXCHANGE}),
    Phase.EXCHANGE_ONLY: frozenset({Use.EXCHANGE}),
    Phase.CLOSED: frozenset(),
}
"""What each phase allows; anything else is refused with ``keyset_expired``."""


def _dated(info: KeysetInfo, record: KeysetPhase | None, now: int) -> Phase:
    if record is None:
        return _by_dates(info, info.withdraw_until, info.spend_until, now)
    return _by_dates(info, min(info.withdraw_until, record.withdraw_until), record.redeem_until, now)


def _by_dates(info: KeysetInfo, withdraw_until: int, redeem_until: int, now: int) -> Phase:
    if now > redeem_until:
        return Phase.CLOSED
    if now > info.spend_until:
        return Phase.EXCHANGE_ONLY
    if now > withdraw_until:
        return Phase.SPEND_ONLY
    return Phase.ACTIVE


def phase_at(info: KeysetInfo, record: KeysetPhase | None, now: int) -> Phase:
    """The keyset's phase at ``now``: the later of the announced one and its dates' one.

    Without a phase record (an announcement from before phases) a keyset closes right after
    ``spend_until``, as it always has.
    """
    if record is not None and record.keyset != info.id:
        raise LocalProtocolError("phase record of another keyset")
    dated = _dated(info, record, now)
    stated = Phase.ACTIVE if record is None else Phase(record.phase)
    return stated if stated.rank > dated.rank else dated


def require(info: KeysetInfo, record: KeysetPhase | None, now: int, use: Use) -> Phase:
    """The phase, if it allows ``use``; otherwise ``keyset_expired``."""
    phase = phase_at(info, record, now)
    if use not in ALLOWED[phase]:
        raise RemoteProtocolError(f"keyset {info.id} is {phase.value}: no {use.value}", ErrorCode.KEYSET_EXPIRED)
    return phase


def check_phase(info: KeysetInfo, record: KeysetPhase) -> None:
    """A phase record must fit its keyset: withdrawals end no later, exchanges no earlier, than
    the keyset's own dates promise (``bad_request`` otherwise)."""
    if record.keyset != info.id:
        raise RemoteProtocolError("phase record of another keyset")
    if record.withdraw_until > info.withdraw_until:
        raise RemoteProtocolError("phase record extends withdrawals past the keyset's own date")
    if record.redeem_until < info.spend_until:
        raise RemoteProtocolError("phase record ends exchanges before the keyset's spending ends")


def follow_phase(old: KeysetPhase | None, new: KeysetPhase) -> KeysetPhase:
    """The record a device adopts from a fresh announcement: phases only move forward, and a
    redeem deadline once announced is never brought forward (``phase_rollback``)."""
    if old is None:
        return new
    if new.keyset != old.keyset:
        raise LocalProtocolError("phase records of two keysets")
    if Phase(new.phase).rank < Phase(old.phase).rank:
        raise RemoteProtocolError(f"keyset {new.keyset} moved back to {new.phase}", ErrorCode.PHASE_ROLLBACK)
    if new.redeem_until < old.redeem_until:
        raise RemoteProtocolError(f"keyset {new.keyset}'s redeem deadline brought forward",
                                  ErrorCode.PHASE_ROLLBACK)
    if new.withdraw_until > old.withdraw_until:
        raise RemoteProtocolError(f"keyset {new.keyset}'s withdrawals reopened", ErrorCode.PHASE_ROLLBACK)
    return new


def follow_phases(known: Mapping[str, KeysetPhase], keysets: Sequence[KeysetInfo],
                  records: Sequence[KeysetPhase]) -> tuple[dict[str, KeysetPhase], tuple[str, ...]]:
    """A device's phase records after a fresh announcement, and the keysets whose update it refused.

    Each record must name a listed keyset, at most once, and fit it (``bad_request``: the
    announcement is refused). A keyset the announcement gives no record keeps the one the device
    had; an update :func:`follow_phase` refuses keeps it too, and is reported so the agent can log
    the bank's attempt (``phase_rollback``) while it still takes the announcement's other news.
    """
    infos = {k.id: k for k in keysets}
    given: dict[str, KeysetPhase] = {}
    for record in records:
        info = infos.get(record.keyset)
        if info is None or record.keyset in given:
            raise RemoteProtocolError(f"phase record for {record.keyset}: unlisted keyset, or twice")
        check_phase(info, record)
        given[record.keyset] = record
    merged, refused = {}, []
    for keyset_id in infos:
        old, new = known.get(keyset_id), given.get(keyset_id)
        if new is None:
            if old is not None:
                merged[keyset_id] = old
            continue
        try:
            merged[keyset_id] = follow_phase(old, new)
        except RemoteProtocolError:
            refused.append(keyset_id)
            if old is not None:
                merged[keyset_id] = old
    return merged, tuple(refused)


def retire(info: KeysetInfo, current: KeysetPhase | None, now: int, redeem_until: int | None = None) -> KeysetPhase:
    """The phase record after retiring ``info`` at ``now``: no more withdrawals; spending and
    exchange go on by the keyset's dates. Retiring again keeps the first retirement."""
    if current is not None and current.retired is not None:
        return current
    if redeem_until is None:
        redeem_until = current.redeem_until if current is not None else info.spend_until + REDEEM_GRACE
    withdraw_until = min(info.withdraw_until, now, now if current is None else current.withdraw_until)
    stated = max(Phase.SPEND_ONLY, _by_dates(info, withdraw_until, redeem_until, now), key=lambda p: p.rank)
    record = KeysetPhase(keyset=info.id, phase=stated.value, withdraw_until=withdraw_until,
                         redeem_until=redeem_until, retired=now)
    check_phase(info, record)
    return follow_phase(current, record)
