"""Whether the bank's transactions wait for each other in PostgreSQL, sampled while they run.

A bank process that waits for a row lock held by another shows as ``wait_event_type = 'Lock'``
in ``pg_stat_activity``. :class:`LockWatch` polls that view from its own thread and connection
while the timed waves run and counts, over the samples, the backends of the benchmark's database
that were running a statement, those of them waiting for a lock, and what each was doing.
Spends of distinct coins should never wait for each other's rows: that is what lets more bank
processes add throughput.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LockWatch"]

# SQL outside the bank's store on purpose: a benchmark probe of the server's own statistics, read on
# a connection of its own, not the bank's data.
_QUERY = ("SELECT wait_event_type, wait_event FROM pg_stat_activity"
          " WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'")


@dataclass
class LockWatch:
    """Samples every ``interval`` seconds between :meth:`start` and :meth:`stop`."""

    url: str
    interval: float = 0.05
    samples: int = 0
    active: int = 0
    waiting: int = 0
    events: dict[str, int] = field(default_factory=dict)  # what running statements waited for, by kind
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _conn: Any = None

    def start(self) -> None:
        import psycopg

        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="bench-lock-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples += 1
            for kind, event in self._conn.execute(_QUERY).fetchall():
                self.active += 1
                self.waiting += kind == "Lock"
                name = "running" if kind is None else f"{kind}:{event}"
                self.events[name] = self.events.get(name, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def summary(self) -> dict[str, Any]:
        """Samples, statements running per sample, the share of them waiting for a lock, and what
        the running statements were doing, as shares: ``running`` (on a CPU), or the wait event
        (``Lock:tuple``/``Lock:transactionid``: rows another transaction holds; ``Lock:extend``:
        a table growing; ``IO:WALSync``/``LWLock:WALWrite``: a commit's flush; see PostgreSQL's
        wait events)."""
        total = self.active or 1
        return {"samples": self.samples, "active_per_sample": self.active / self.samples if self.samples else 0.0,
                "lock_wait_share": self.waiting / total,
                "doing": {k: n / total for k, n in sorted(self.events.items(), key=lambda kv: -kv[1])}}
