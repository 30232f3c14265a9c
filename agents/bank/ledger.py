"""What the bank's request pipeline needs of a database, and how a request's steps are driven.

The pipeline (:mod:`m2mpay.agents.bank.pipeline`) does no I/O: it is a generator that yields
:class:`Atomic` steps, each a function to run in one transaction over a :class:`Ledger` (and the
rows it reads first), and is sent each step's result, or has the step's exception thrown in.
Everything between two steps (signatures, HPKE, blind signing) runs outside any transaction.
The caller that drives it does the I/O: :func:`drive` for the bank's event loop, :func:`drive_sync`
for commands and tests. The bank's store (:class:`~m2mpay.agents.bank.store.Store`) runs the steps
on SQLite or PostgreSQL; a test runs the same steps on SQLite in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from m2mpay.protocol.envelope import StoredAnswer, check_replay
from m2mpay.protocol.messages import KeysetPhase
from m2mpay.protocol.rules.bank import CoinRecord

from .rows import Account

__all__ = ["Atomic", "Ledger", "Rows", "SignerKind", "Steps", "drive", "drive_sync", "remembered"]

T = TypeVar("T")
R = TypeVar("R")
SignerKind = Literal["user", "vendor"]
"""Whose keys sign a request: user accounts withdraw, vendors do everything else."""


@dataclass(frozen=True, slots=True)
class Rows:
    """What a transaction reads before it decides, fetched in one round trip on PostgreSQL.

    ``coin``: the tip of the coin it changes, locked first (a transaction that names none
    changes nothing); ``answer``: the ``(signer, req_id)`` of the stored answer it looks up;
    ``vendor``: the vendor whose revocation it checks.
    """

    coin: bytes | None = None
    answer: tuple[str, bytes] | None = None
    vendor: str | None = None

    def fetch(self) -> tuple[bytes | None, str | None, bytes | None, str | None]:
        signer, req_id = self.answer or (None, None)
        return self.coin, signer, req_id, self.vendor


class Ledger(Protocol):
    """The rows a bank request reads and writes, inside one transaction."""

    def signer_key(self, kind: SignerKind, name: str) -> bytes | None:
        """The public key of a user account or a vendor, ``None`` if there is none."""

    def account(self, name: str, *, lock: bool = False) -> Account | None:
        """An account, locked for the transaction with ``lock``."""

    def transfer(self, debit: str, credit: str, amount: int, kind: str, ref: bytes | None, now: int,
                 *, running: tuple[str, ...] = ()) -> None:
        """Move ``amount`` between two accounts: one journal row."""

    def answer(self, signer: str, req_id: bytes) -> StoredAnswer | None:
        """The answer stored under ``(signer, req_id)``."""

    def put_answer(self, signer: str, req_id: bytes, stored: StoredAnswer, now: int) -> None:
        """Store an answer under ``(signer, req_id)``."""

    def fill_answer(self, signer: str, req_id: bytes, answer: bytes) -> bytes:
        """Replace a pending (empty) answer; the answer now stored under the key."""

    def vendor_revoked(self, vendor: str) -> bool:
        """Whether the bank revoked ``vendor``."""

    def issue(self, account: str, req_id: bytes, keyset: str, coins: int, value: int, balance: int,
              now: int) -> None:
        """Record what a withdrawal issued."""

    def issued_balance(self, account: str, req_id: bytes) -> int:
        """The balance a recorded withdrawal left."""

    def coin(self, tip: bytes, *, lock: bool = True) -> CoinRecord | None:
        """A coin's record, locked for the transaction unless ``lock`` is false."""

    def put_coin(self, record: CoinRecord, *, new: bool) -> None:
        """Insert or update a coin's record."""

    def due_to_lapse(self, now: int, limit: int = 500) -> list[bytes]:
        """Tips of open blocks whose deadline has passed."""

    def keyset_phase(self, keyset: str) -> KeysetPhase | None:
        """A keyset's phase record, ``None`` if it has none (active by its dates)."""


def remembered(ledger: Ledger, signer: str, req_id: bytes, digest: bytes) -> bytes | None:
    """The answer stored for this very request, ``None`` for a new one, ``replay`` for another."""
    return check_replay(ledger.answer(signer, req_id), digest)


@dataclass(frozen=True, slots=True)
class Atomic(Generic[T]):
    """One step of a request: ``fn`` in one transaction; ``rows`` what it reads first, if known."""

    fn: Callable[[Ledger], T]
    rows: Rows | None = None


Steps = Generator[Atomic[Any], Any, R]
"""A request in progress: yields the transactions it needs, returns its result."""


async def drive(steps: Steps[R], run: Callable[[Atomic[Any]], Awaitable[Any]]) -> R:
    """Run ``steps`` to the end, each transaction with ``run``; its exceptions go back into ``steps``."""
    try:
        step = next(steps)
        while True:
            try:
                result = await run(step)
            except Exception as exc:  # noqa: BLE001 - thrown into the pipeline, which answers it
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as stop:
        done: R = stop.value  # the generator's return value: an R, as Steps[R] says
        return done
    finally:
        steps.close()


def drive_sync(steps: Steps[R], run: Callable[[Atomic[Any]], Any]) -> R:
    """:func:`drive` for callers without an event loop."""
    try:
        step = next(steps)
        while True:
            try:
                result = run(step)
            except Exception as exc:  # noqa: BLE001 - thrown into the pipeline, which answers it
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as stop:
        done: R = stop.value  # the generator's return value: an R, as Steps[R] says
        return done
    finally:
        steps.close()
