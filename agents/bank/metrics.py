"""Prometheus metrics of the bank, on an optional loopback HTTP port (text exposition format).

- ``m2mpay_bank_requests_total{op, result}``: requests answered, ``result`` = ``ok`` or the code;
- ``m2mpay_bank_request_seconds{op}``: a latency histogram per operation;
- ``m2mpay_bank_open_blocks``: coins blocked right now;
- ``m2mpay_bank_journal_total{kind}``: minor units moved, by journal kind;
- on PostgreSQL, ``m2mpay_bank_db_requests_total`` and ``m2mpay_bank_db_transactions_total``:
  the requests of the fast road and the transactions that carried them (their ratio is how many
  requests share a commit; see :mod:`~m2mpay.agents.bank.fastroad`).

The HTTP side is deliberately tiny: one GET, bounded reads, a timeout, nothing else served.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import OPS

from .postgresql import PgEngine, is_lock_timeout
from .store import Store

__all__ = ["BankMetrics", "JournalTotals", "serve_metrics"]

log = logging.getLogger(__name__)
_RESULTS = frozenset({"ok"} | {code.wire for code in ErrorCode})
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class BankMetrics:
    """Counters and histograms filled by the service, rendered on request."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, op: str, result: str, seconds: float) -> None:
        # The op is the peer-chosen last topic level: only the operations we know become labels,
        # or one device could grow /metrics by a label set per request.
        op = op if op in OPS else "other"
        if result not in _RESULTS:
            result = "other"
        self.requests[(op, result)] += 1
        self.buckets[op][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[op] += seconds

    def render(self, open_blocks: int, journal: dict[str, int], grouped: tuple[int, int] | None = None) -> str:
        lines = ["# TYPE m2mpay_bank_requests_total counter"]
        for (op, result), count in sorted(self.requests.items()):
            lines.append(f'm2mpay_bank_requests_total{{op="{op}",result="{result}"}} {count}')
        lines.append("# TYPE m2mpay_bank_request_seconds histogram")
        for op, counts in sorted(self.buckets.items()):
            cumulative = 0
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'm2mpay_bank_request_seconds_bucket{{op="{op}",le="{le}"}} {cumulative}')
            lines.append(f'm2mpay_bank_request_seconds_sum{{op="{op}"}} {self.sums[op]:.6f}')
            lines.append(f'm2mpay_bank_request_seconds_count{{op="{op}"}} {cumulative}')
        lines += ["# TYPE m2mpay_bank_open_blocks gauge", f"m2mpay_bank_open_blocks {open_blocks}",
                  "# TYPE m2mpay_bank_journal_total counter"]
        for kind, amount in sorted(journal.items()):
            lines.append(f'm2mpay_bank_journal_total{{kind="{kind}"}} {amount}')
        if grouped is not None:
            lines += ["# TYPE m2mpay_bank_db_requests_total counter", f"m2mpay_bank_db_requests_total {grouped[0]}",
                      "# TYPE m2mpay_bank_db_transactions_total counter",
                      f"m2mpay_bank_db_transactions_total {grouped[1]}"]
        return "\n".join(lines) + "\n"


class JournalTotals:
    """Minor units moved by journal kind, added up as the journal grows.

    A scrape must not sum the whole journal (it grows by every settlement): each reads only the
    rows after :attr:`upto`, the highest id already counted, up to the highest id that is final —
    no transaction still running can commit a row at or below it. On SQLite the read holds the
    one write lock, so every id it sees is final. On PostgreSQL ids come from a sequence and a
    transaction can commit a lower id after another commits a higher one, so the highest final id
    is read under ``LOCK TABLE journal IN SHARE MODE`` (which waits for the transactions writing
    to the journal, and briefly holds back new ones; bounded by a lock timeout), in a transaction
    of its own; the sum over the new rows runs after it, without the lock. Both reads are the
    store's (:meth:`~m2mpay.agents.bank.tx.Tx.final_journal_id`, ``Tx.moved_by_kind``).
    """

    def __init__(self) -> None:
        self.upto = 0
        self.totals: dict[str, int] = {}

    async def read(self, store: Store) -> dict[str, int]:
        """The totals up to the journal's highest final id (those of the last read if the
        PostgreSQL lock could not be had within its timeout)."""
        try:
            high = await store.run(lambda tx: tx.final_journal_id())
        except Exception as exc:
            if store.dialect != "postgresql" or not is_lock_timeout(exc):
                raise
            # This scrape reports what the last one counted; the next one catches up.
            log.warning("journal totals not brought up to date: the journal stayed locked past the timeout")
            return dict(self.totals)
        if high > self.upto:
            upto = self.upto
            moved = await store.run(lambda tx: tx.moved_by_kind(after=upto, upto=high))
            if self.upto == upto:  # another scrape did not count these meanwhile
                for kind, amount in moved.items():
                    self.totals[kind] = self.totals.get(kind, 0) + amount
                self.upto = high
        return dict(self.totals)


async def _snapshot(store: Store, journal: JournalTotals) -> tuple[int, dict[str, int], tuple[int, int] | None]:
    engine = store.engine
    grouped = (engine.fast.requests, engine.fast.groups) if isinstance(engine, PgEngine) else None
    return await store.run(lambda tx: tx.open_blocks()), await journal.read(store), grouped


@contextlib.asynccontextmanager
async def serve_metrics(metrics: BankMetrics, store: Store, port: int,
                        host: str = "127.0.0.1") -> AsyncIterator[asyncio.Server]:
    """Serve ``GET /metrics`` until the context ends."""
    journal = JournalTotals()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET /metrics "):
                body = metrics.render(*await _snapshot(store, journal)).encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port, limit=8192)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
