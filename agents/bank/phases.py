"""Keyset phases at the bank: retiring a keyset, and the keysets and phases its announcement lists.

A retirement ends withdrawals at once and nothing else: coins of a retired keyset are blocked and
settled until its ``spend_until`` and exchanged until ``redeem_until`` (docs/LIFECYCLE.md). The
phase record is written to the database; every withdrawal reads it in the transaction that
debits the account, so all bank processes refuse new withdrawals from that moment, and the
process that announces re-signs the announcement with the record within one sweep interval.
The announcement lists every keyset that is not ``closed`` (devices need the keys to verify coins),
with the phase records of those that have one.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2mpay.protocol.messages import KeysetInfo, KeysetPhase
from m2mpay.protocol.rules.phases import Phase, phase_at, retire

from .revocation import revoked_vendors
from .store import Store
from .tx import Tx

__all__ = ["Announced", "RetireReport", "announced", "backfill_phases", "listed_keysets", "retire_keyset"]


@dataclass(frozen=True, slots=True)
class RetireReport:
    """What a retirement affects, stated by ``bank keyset retire``."""

    keyset: str
    record: KeysetPhase
    already: bool
    """The keyset was retired before: nothing changed (the first retirement stays)."""
    outstanding: int
    """Value its coins still hold: issued minus credited (minor units of ``currency``)."""
    currency: str
    coins: int
    """Coins of it the bank has seen that are not spent to the end."""
    spend_until: int
    redeem_until: int

    def lines(self) -> list[str]:
        """The report for a person."""
        head = (f"keyset {self.keyset} was already retired at {self.record.retired}" if self.already
                else f"keyset {self.keyset} retired: no more withdrawals from it")
        return [head,
                f"outstanding value: {self.outstanding} (minor units of {self.currency}) in coins it issued; "
                f"{self.coins} coin(s) seen and not spent",
                f"those coins can still be spent until {self.spend_until} and exchanged until {self.redeem_until}"]


@dataclass(frozen=True, slots=True)
class Announced:
    """What the keys announcement lists, read from the database."""

    revoked: tuple[str, ...]
    keysets: tuple[KeysetInfo, ...]
    phases: dict[str, KeysetPhase]


def retire_keyset(store: Store, keyset: str, now: int, *, dry_run: bool = False) -> RetireReport:
    """Move ``keyset`` to spend-only at ``now`` (``KeyError`` if there is no such keyset), and
    report the outstanding value it affects; with ``dry_run`` only report. Retiring twice keeps
    the first retirement."""
    def run(tx: Tx) -> RetireReport:
        info = next((row.info for row in tx.keysets() if row.info.id == keyset), None)
        if info is None:
            raise KeyError(keyset)
        current = tx.keyset_phase(keyset)
        already = current is not None and current.retired is not None
        record = retire(info, current, now)
        if not already and not dry_run:
            tx.put_keyset_phase(record)
        issued, paid = tx.keyset_totals()
        return RetireReport(keyset=keyset, record=record, already=already,
                            outstanding=issued.get(keyset, 0) - paid.get(keyset, 0), currency=info.currency,
                            coins=tx.unspent_coins(keyset), spend_until=info.spend_until,
                            redeem_until=record.redeem_until)

    return store.run_sync(run)


def backfill_phases(tx: Tx, now: int) -> None:
    """Give a phase record to each keyset retired before records were kept (retired at ``now``)."""
    phases = tx.keyset_phases()
    for row in tx.keysets():
        if row.retired and row.info.id not in phases:
            tx.put_keyset_phase(retire(row.info, None, now))


def listed_keysets(tx: Tx, now: int) -> tuple[tuple[KeysetInfo, ...], dict[str, KeysetPhase]]:
    """The keysets to announce at ``now`` (every one not closed, by id) and their phase records."""
    phases = tx.keyset_phases()
    infos = tuple(row.info for row in tx.keysets() if phase_at(row.info, phases.get(row.info.id), now) is not
                  Phase.CLOSED)
    return infos, {info.id: phases[info.id] for info in infos if info.id in phases}


def announced(tx: Tx, now: int) -> Announced:
    """Everything the announcement lists that can change while the bank runs."""
    infos, phases = listed_keysets(tx, now)
    return Announced(revoked=revoked_vendors(tx, now), keysets=infos, phases=phases)
