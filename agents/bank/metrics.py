"""Prometheus metrics of the bank, on an optional loopback HTTP port (text exposition format).

- ``m2mpay_bank_requests_total{op, result}``: requests answered, ``result`` = ``ok`` or the code;
- ``m2mpay_bank_request_seconds{op}``: a latency histogram per operation;
- ``m2mpay_bank_open_blocks``: coins blocked right now;
- ``m2mpay_bank_journal_total{kind}``: minor units moved, by journal kind.

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

from .store import Store

__all__ = ["BankMetrics", "serve_metrics"]

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

    def render(self, open_blocks: int, journal: dict[str, int]) -> str:
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
        return "\n".join(lines) + "\n"


async def _snapshot(store: Store) -> tuple[int, dict[str, int]]:
    def read(tx):  # type: ignore[no-untyped-def]
        row = tx.one("SELECT COUNT(*) FROM coins WHERE status = ?", ("open",))
        kinds = {str(k): int(v) for k, v in tx.all("SELECT kind, SUM(amount) FROM journal GROUP BY kind")}
        return int(row[0]) if row else 0, kinds

    return await store.run(read)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serve_metrics(metrics: BankMetrics, store: Store, port: int,
                        host: str = "127.0.0.1") -> AsyncIterator[asyncio.Server]:
    """Serve ``GET /metrics`` until the context ends."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET /metrics "):
                body = metrics.render(*await _snapshot(store)).encode()
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
