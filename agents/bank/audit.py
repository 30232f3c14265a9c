"""The bank's audit: every invariant of the books recomputed from their rows.

Each transaction that moves money writes to sets of rows that are kept independently of each
other, and the audit checks each set against the others:

- the **journal** (double-entry: every row moves an amount from one account to another);
- the **running balance** of each user account, updated with its journal rows;
- an **issuance** record per withdrawal (keyset, coin count, value), written with its journal row;
- a **coin** record per registered coin: ``credited`` tokens paid out over its life and ``start``,
  the position down to which it has been credited. ``credited + start == n`` always holds, and
  ``start × M/n`` is what the coin still holds: what its user can still spend plus what its open
  session has revealed but not yet settled.

So a journal row that is deleted, copied or edited disagrees with a balance, an issuance record or
a coin record, without a "chain head" row that every settlement would have to lock; and per keyset,
the value that registered coins have been paid plus what they still hold can never exceed what
withdrawals issued. What the audit cannot see is a consistent rewrite of several sets at once, or
a forged coin while real coins of its keyset remain unregistered (until they are registered).

Withdrawals journalled before issuance was recorded (schema migration 2) carry no keyset: they
form one pool that may back the coins of any keyset.

Exchanges (docs/LIFECYCLE.md) move value between keysets inside ``outstanding``: per keyset,
``withdrawn + issued_by_exchange`` backs what its coins were paid, exchanged and still hold. Each
exchange row is checked against its journal rows, its output rows and its coin (spent to 0, its
exchanged tokens making up the coin's ``n``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from m2mpay.protocol import hashchain
from m2mpay.protocol.messages import KeysetInfo
from m2mpay.protocol.rules.bank import CoinRecord

from .exchange_rows import ExchangeRow, OutputRow, exchange_outputs, exchanges
from .rows import Entry, Issue
from .store import Store
from .tx import Tx

__all__ = ["AuditReport", "audit"]

_CREDIT = "credit:"


@dataclass
class AuditReport:
    """What the audit found; ``ok`` only when there are no problems."""

    problems: list[str]
    withdrawn: int = 0
    credited: int = 0
    outstanding: int = 0
    coins: int = 0

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


@dataclass
class _Books:
    """Every row the audit reads, loaded in one transaction."""

    journal: list[Entry]
    accounts: dict[str, tuple[str, int]]
    issuance: list[Issue]
    coins: list[CoinRecord]
    keysets: dict[str, KeysetInfo]
    credits_per_coin: dict[bytes, int] = field(default_factory=dict)
    exchanges: dict[bytes, ExchangeRow] = field(default_factory=dict)
    outputs: list[OutputRow] = field(default_factory=list)

    @classmethod
    def load(cls, tx: Tx) -> _Books:
        journal = tx.journal()
        books = cls(journal=journal, accounts={a.name: (a.kind, a.balance) for a in tx.accounts()},
                    issuance=tx.issuance(), coins=tx.coins(), keysets={k.info.id: k.info for k in tx.keysets()},
                    exchanges={e.tip: e for e in exchanges(tx)}, outputs=exchange_outputs(tx))
        for entry in journal:
            if entry.kind.startswith(_CREDIT) and entry.ref is not None:
                books.credits_per_coin[entry.ref] = books.credits_per_coin.get(entry.ref, 0) + entry.amount
        return books


def audit(store: Store) -> AuditReport:
    """Check the books: journal against balances, issuance and coins, and coins against issuance."""
    def check(tx: Tx) -> AuditReport:
        books = _Books.load(tx)
        report = AuditReport(problems=[])
        report.problems += _check_journal(books, report)
        report.problems += _check_issuance(books)
        report.problems += _check_coins(books)
        report.problems += _check_keysets(books)
        report.problems += _check_exchanges(books)
        report.coins = len(books.coins)
        return report

    return store.run_sync(check)


def _label(value: bytes) -> str:
    return value.hex()[:16]


def _movement_problem(entry: Entry, accounts: dict[str, tuple[str, int]]) -> str | None:
    """Each kind of journal row moves money one way only: anything else was not written by the bank."""
    kinds = {name: kind for name, (kind, _) in accounts.items()}
    debit, credit = kinds.get(entry.debit), kinds.get(entry.credit)
    if entry.kind == "deposit":
        fits = entry.debit == "world" and credit == "user"
    elif entry.kind == "withdraw":
        fits = debit == "user" and entry.credit == "outstanding" and entry.ref is not None
    elif entry.kind.startswith(_CREDIT):
        fits = entry.debit == "outstanding" and credit == "vendor" and entry.ref is not None
    elif entry.kind == "exchange":  # an old keyset's outstanding coins to a new keyset's
        fits = entry.debit == entry.credit == "outstanding" and entry.ref is not None
    else:
        fits = False
    if fits:
        return None
    return f"journal row {entry.id}: {entry.kind} of {entry.amount} from {entry.debit} to {entry.credit} is not a " \
           "movement the bank makes"


def _check_journal(books: _Books, report: AuditReport) -> list[str]:
    """Balances recomputed from the journal: against running balances, and never negative."""
    problems = []
    derived: dict[str, int] = defaultdict(int)
    for entry in books.journal:
        derived[entry.debit] -= entry.amount
        derived[entry.credit] += entry.amount
        if entry.kind == "withdraw":
            report.withdrawn += entry.amount
        elif entry.kind.startswith(_CREDIT):
            report.credited += entry.amount
        if (problem := _movement_problem(entry, books.accounts)) is not None:
            problems.append(problem)
    for name, (kind, stored) in books.accounts.items():
        balance = derived.get(name, 0)
        if kind == "user" and stored != balance:
            problems.append(f"account {name}: balance {stored} but journal says {balance} "
                            "(an edited balance or a journal row missing)")
        if kind != "user" and stored != 0:
            problems.append(f"account {name}: a running balance where the journal is the truth")
        if name != "world" and balance < 0:
            problems.append(f"account {name}: negative balance {balance}")
    unknown = set(derived) - set(books.accounts)
    if unknown:
        problems.append(f"journal names unknown accounts: {sorted(unknown)[:3]}")
    if sum(derived.values()) != 0:
        problems.append("journal does not balance: money created or destroyed")
    report.outstanding = derived.get("outstanding", 0)
    return problems


def _check_issuance(books: _Books) -> list[str]:
    """Every withdraw journal row has its issuance record, with the same value, and back."""
    problems = []
    journalled: dict[tuple[str, bytes], int] = defaultdict(int)
    for entry in books.journal:
        if entry.kind == "withdraw" and entry.ref is not None:
            journalled[(entry.debit, entry.ref)] += entry.amount
    issued = {(i.account, i.req_id): i for i in books.issuance}
    for key in sorted(set(journalled) | set(issued)):
        account, req = key[0], _label(key[1])
        issue, amount = issued.get(key), journalled.get(key)
        if issue is None:
            problems.append(f"account {account}: withdrawal {req} journalled {amount} but never issued")
        elif amount is None:
            problems.append(f"journal row missing: account {account}'s withdrawal {req} issued {issue.value}")
        elif amount != issue.value:
            problems.append(f"account {account}: withdrawal {req} journalled {amount} but issued {issue.value}")
        if issue is not None and issue.keyset is not None:
            info = books.keysets.get(issue.keyset)
            if info is None:
                problems.append(f"account {account}: withdrawal {req} issued coins of unknown keyset {issue.keyset}")
            elif issue.coins is None or issue.coins * info.value != issue.value:
                problems.append(f"account {account}: withdrawal {req} issued {issue.coins} coins of keyset "
                                f"{issue.keyset} recorded as worth {issue.value}")
    return problems


def _check_coins(books: _Books) -> list[str]:
    """Each coin: its keyset, ``credited + start == n``, its journal credits, its chain; each credit: its coin."""
    problems = []
    tips = set()
    for record in books.coins:
        tips.add(record.tip)
        problems += _check_coin(record, books)
    for entry in books.journal:
        if entry.kind.startswith(_CREDIT) and entry.ref not in tips:
            problems.append(f"credit without a withdrawal: journal row {entry.id} credits {entry.amount} to "
                            f"{entry.credit} for coin {_label(entry.ref or b'')}, which the bank never registered")
    return problems


def _check_coin(record: CoinRecord, books: _Books) -> list[str]:
    label = f"coin {_label(record.tip)}"
    info = books.keysets.get(record.keyset)
    if info is None:
        return [f"{label}: unknown keyset {record.keyset}"]
    if (record.n, record.token_value) != (info.n, info.token_value):
        return [f"{label}: {record.n} tokens of {record.token_value}, but keyset {record.keyset} has "
                f"{info.n} of {info.token_value}"]
    problems = []
    if not 0 <= record.position <= record.start or record.credited < 0:
        problems.append(f"{label}: position {record.position}, start {record.start}, credited {record.credited}")
    exchanged = books.exchanges[record.tip].tokens if record.tip in books.exchanges else 0
    held = record.credited + record.start + exchanged
    if held > record.n:
        problems.append(f"{label}: duplicated settlement: {record.credited} tokens credited, {exchanged} exchanged "
                        f"and {record.start} not yet credited exceed its {record.n}")
    elif held < record.n:
        problems.append(f"{label}: {record.credited} tokens credited, {exchanged} exchanged and {record.start} not "
                        f"yet credited fall short of its {record.n}")
    journal, recorded = books.credits_per_coin.get(record.tip, 0), record.credited * record.token_value
    if journal > recorded:
        problems.append(f"{label}: duplicated settlement: the journal credits {journal} but the coin {recorded}")
    elif journal < recorded:
        problems.append(f"journal row missing: {label} was credited {recorded} but the journal has {journal}")
    if hashchain.iterate(record.last, record.n - record.position) != record.tip:
        problems.append(f"{label}: last token does not hash up to the tip")
    return problems


def _check_keysets(books: _Books) -> list[str]:
    """Per keyset: paid to its coins plus what they still hold never exceeds what was issued."""
    issued: dict[str, int] = defaultdict(int)
    unattributed = 0
    for issue in books.issuance:
        if issue.keyset is None:
            unattributed += issue.value
        else:
            issued[issue.keyset] += issue.value
    for output in books.outputs:
        issued[output.keyset] += output.value  # issued by exchange
    claimed: dict[str, int] = defaultdict(int)
    for record in books.coins:
        claimed[record.keyset] += books.credits_per_coin.get(record.tip, 0) + record.start * record.token_value
        if record.tip in books.exchanges:
            claimed[record.keyset] += books.exchanges[record.tip].value  # exchanged in
    excess = {k: v - issued[k] for k, v in claimed.items() if v > issued[k]}
    if sum(excess.values()) <= unattributed:
        return []  # covered by withdrawals from before issuance was recorded
    beyond = f" (beyond the {unattributed} withdrawn before issuance was recorded)" if unattributed else ""
    return [f"coins of keyset {k} never issued: registered coins claim {claimed[k]}{beyond}" if issued[k] == 0
            else f"keyset {k}: registered coins claim {claimed[k]} but only {issued[k]} was issued{beyond}"
            for k in sorted(excess)]


def _check_exchanges(books: _Books) -> list[str]:
    """Each exchange: its coin spent to 0 and worth exactly what it issued, in the journal and in
    its output rows; each output row and exchange journal row: its exchange."""
    problems = []
    coins = {record.tip: record for record in books.coins}
    journalled: dict[bytes, int] = defaultdict(int)
    for entry in books.journal:
        if entry.kind == "exchange" and entry.ref is not None:
            journalled[entry.ref] += entry.amount
    issued: dict[bytes, int] = defaultdict(int)
    for output in books.outputs:
        info = books.keysets.get(output.keyset)
        if info is None or output.coins * info.value != output.value:
            problems.append(f"exchange {_label(output.tip)}: {output.coins} coins of keyset {output.keyset} recorded "
                            f"as worth {output.value}")
        issued[output.tip] += output.value
    for tip in sorted(set(journalled) | set(issued) | set(books.exchanges)):
        label = f"exchange {_label(tip)}"
        row, record = books.exchanges.get(tip), coins.get(tip)
        if row is None:
            problems.append(f"{label}: journalled {journalled.get(tip, 0)} and issued {issued.get(tip, 0)} without "
                            "an exchange")
            continue
        if record is None or record.position != 0 or record.keyset != row.keyset:
            problems.append(f"{label}: its coin is not registered as spent in keyset {row.keyset}")
        elif row.tokens * record.token_value != row.value:
            problems.append(f"{label}: {row.tokens} tokens of {record.token_value} recorded as worth {row.value}")
        if journalled.get(tip, 0) != row.value or issued.get(tip, 0) != row.value:
            problems.append(f"{label}: worth {row.value}, journalled {journalled.get(tip, 0)}, issued "
                            f"{issued.get(tip, 0)}")
    return problems
