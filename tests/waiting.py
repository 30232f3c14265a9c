"""Bounded waits for something to happen: a condition polled until it holds or a deadline passes.

Tests synchronise on conditions (a row appears, a process answers, a message arrives), never on a
fixed sleep: a sleep is either too short under load, and the test flakes, or too long everywhere.
A wait that runs out fails the test saying what never happened.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

__all__ = ["POLL", "TIMEOUT", "wait_until", "wait_until_async"]

T = TypeVar("T")

TIMEOUT = 10.0
"""Seconds a wait lasts by default: generous for a loaded two-core machine, short for a hang."""

POLL = 0.02
"""Seconds between two looks at the condition."""


def wait_until(predicate: Callable[[], T], *, timeout: float = TIMEOUT, what: str, poll: float = POLL) -> T:
    """Call ``predicate`` until it returns something true, and return that; fail the test with
    ``what`` (the condition in words) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(poll)


@overload
async def wait_until_async(predicate: Callable[[], Awaitable[T]], *, timeout: float = TIMEOUT, what: str,
                           poll: float = POLL) -> T: ...


@overload
async def wait_until_async(predicate: Callable[[], T], *, timeout: float = TIMEOUT, what: str,
                           poll: float = POLL) -> T: ...


async def wait_until_async(predicate: Callable[[], object], *, timeout: float = TIMEOUT, what: str,
                           poll: float = POLL) -> object:
    """:func:`wait_until` inside the event loop: the loop keeps running between looks, and
    ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        await asyncio.sleep(poll)
