"""Where a benchmark's CPU goes, by process: read from ``/proc`` around the timed sections.

A ratio says how far a figure is from its baseline, not what stops it. On a machine whose few
cores serve the bank, its database, the broker and the load generator at once, the question is
which of them spends the CPU of one request. :class:`CpuMeter` adds up each group's user and
system time (``/proc/<pid>/stat``) and the whole machine's busy and idle time (``/proc/stat``)
over the intervals it is told about; and how long each group's threads were ready to run but
waited for a core (the second field of ``/proc/<pid>/task/<tid>/schedstat``): where the cores,
not the work, are the limit, that is where the time goes. Elsewhere than Linux it measures
nothing and says so.

PostgreSQL's group is every ``postgres`` process on the machine: the bench's own backends and
whatever else the server does meanwhile (its WAL writer, other databases), which is what the
bank's requests compete with.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuMeter", "children", "named"]

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(pid: int) -> int:
    """User and system time of ``pid`` in clock ticks; 0 once it is gone."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the file)


def _queued(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of ``pid`` spent ready to run, waiting for a core, by thread id."""
    waits: dict[int, int] = {}
    with contextlib.suppress(OSError):  # the process ended meanwhile
        for task in (_PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):  # a thread ended meanwhile
                waits[int(task.name)] = int((task / "schedstat").read_text().split()[1])
    return waits


def _machine() -> tuple[int, int]:
    """(busy, idle) clock ticks of all cores since boot."""
    values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values[:8]) - idle, idle


def children(pid: int) -> list[int]:
    """``pid`` and its descendants (the bank's first process starts its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        path = _PROC / str(current) / "task" / str(current) / "children"
        with contextlib.suppress(OSError):  # the process ended meanwhile
            todo += [int(p) for p in path.read_text().split()]
    return found


def named(command: str) -> list[int]:
    """Every process whose command name is ``command``."""
    pids = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class CpuMeter:
    """CPU seconds per group of processes over the intervals between :meth:`start` and :meth:`stop`."""

    groups: Mapping[str, Callable[[], Iterable[int]]]
    seconds: dict[str, float] = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)
    """Seconds each group was ready to run and waited for a core."""
    busy: float = 0.0
    idle: float = 0.0
    wall: float = 0.0
    _mark: tuple[dict[str, dict[int, tuple[int, dict[int, int]]]], tuple[int, int], float] | None = None

    @property
    def available(self) -> bool:
        return (_PROC / "stat").exists()

    @property
    def waits_available(self) -> bool:
        """Whether the kernel keeps run-queue times (``schedstat``); else :attr:`queued` stays empty."""
        return (_PROC / "self" / "schedstat").exists()

    def _read(self) -> dict[str, dict[int, tuple[int, dict[int, int]]]]:
        return {name: {pid: (_ticks(pid), _queued(pid)) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        if self.available:
            self._mark = (self._read(), _machine(), time.perf_counter())

    def stop(self) -> None:
        if self._mark is None:
            return
        before, (busy0, idle0), wall0 = self._mark
        after, (busy1, idle1) = self._read(), _machine()
        self._mark = None
        for name, pids in after.items():
            # Processes that started during the interval count from zero; those that ended
            # are lost (the groups measured here live through it).
            spent = sum(ticks - before[name].get(pid, (0, {}))[0] for pid, (ticks, _) in pids.items())
            self.seconds[name] = self.seconds.get(name, 0.0) + spent / _TICK
            if self.waits_available:  # threads that ended meanwhile are lost, as processes are
                waited = sum(ns - before[name].get(pid, (0, {}))[1].get(tid, 0)
                             for pid, (_, threads) in pids.items() for tid, ns in threads.items())
                self.queued[name] = self.queued.get(name, 0.0) + waited / 1e9
        self.busy += (busy1 - busy0) / _TICK
        self.idle += (idle1 - idle0) / _TICK
        self.wall += time.perf_counter() - wall0

    def per_request(self, requests: int) -> dict[str, float]:
        """Milliseconds of CPU per request by group, ``other`` for the rest of the machine's."""
        if not requests or not self.seconds:
            return {}
        shares = {name: 1000 * s / requests for name, s in self.seconds.items()}
        shares["other"] = max(0.0, 1000 * self.busy / requests - sum(shares.values()))
        return shares

    def queued_per_request(self, requests: int) -> dict[str, float]:
        """Milliseconds per request each group waited for a core (ready to run, not running)."""
        if not requests:
            return {}
        return {name: 1000 * s / requests for name, s in self.queued.items()}

    @property
    def utilisation(self) -> float:
        """The machine's busy share over the intervals (1.0: every core busy all the time)."""
        total = self.busy + self.idle
        return self.busy / total if total else 0.0
