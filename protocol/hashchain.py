"""Hash chains: ``H^k(S)``, span verification, and reverse traversal with little memory.

``H`` is SHA-256; ``H^0(S) = S`` and ``H^k(S) = H(H^(k-1)(S))``. A coin's tip is ``H^n(S)``;
the wallet reveals ``H^(n-1)(S), H^(n-2)(S), …`` and anyone checks a token ``q`` positions
below the last one with ``q`` hashes: ``H^q(H^(p-q)(S)) == H^p(S)``.

Reversing the chain is the wallet's problem. Three traversals share one interface:

- :class:`NaiveTraversal` keeps only the seed and recomputes every token (``O(n)`` hashes each);
- :class:`CheckpointTraversal` keeps every ``⌈√n⌉``-th value (``O(√n)`` memory and hashes);
- :class:`PebbleTraversal`, the one wallets use, is optimal binary pebbling (Schoenmakers,
  "Explicit Optimal Binary Pebbling for One-Way Hash Chain Reversal", FC 2016): for a chain
  embedded in length ``2^k`` it stores ``k`` values and performs at most ``⌈k/2⌉`` hashes per
  token, after an ``O(n)`` set-up at withdrawal.

Every traversal exports its state as a CBOR-friendly dict (``to_state``/``from_state``) so the
wallet can persist it after each token. That state is as secret as the seed.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any, Protocol

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "TOKEN_SIZE",
    "CheckpointTraversal",
    "NaiveTraversal",
    "PebbleTraversal",
    "Traversal",
    "check_position",
    "h",
    "iterate",
    "make_chain",
    "verify_span",
]

TOKEN_SIZE = 32
_sha256 = hashlib.sha256


def h(x: bytes) -> bytes:
    """One application of ``H`` (SHA-256)."""
    return _sha256(x).digest()


def iterate(x: bytes, k: int) -> bytes:
    """``H^k(x)``: ``k`` hashes of ``x`` (``k >= 0``)."""
    if k < 0:
        raise LocalProtocolError("cannot hash a negative number of times")
    for _ in range(k):
        x = _sha256(x).digest()
    return x


def make_chain(seed: bytes, n: int) -> bytes:
    """The tip ``H^n(seed)`` of a new chain."""
    if len(seed) != TOKEN_SIZE or n < 1:
        raise LocalProtocolError("a chain needs a 32-byte seed and n >= 1")
    return iterate(seed, n)


def check_position(index: int, n: int) -> None:
    """Refuse a chain position outside ``[0, n]`` (a peer's claim, so a remote error)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= n:
        raise RemoteProtocolError(f"chain position {index} outside 0..{n}")


def verify_span(token: bytes, q: int, expected: bytes) -> None:
    """Check ``H^q(token) == expected`` with exactly ``q >= 1`` hashes; else ``chain_mismatch``."""
    if not isinstance(token, bytes) or len(token) != TOKEN_SIZE:
        raise RemoteProtocolError("token must be 32 bytes")
    if q < 1:
        raise RemoteProtocolError("a span covers at least one token")
    if not hmac.compare_digest(iterate(token, q), expected):
        raise RemoteProtocolError("token does not hash to the expected value", ErrorCode.CHAIN_MISMATCH)


class Traversal(Protocol):
    """Yields ``(i, H^i(S))`` for ``i = p-1, p-2, …, 0``; instrumented for benchmarks."""

    @property
    def position(self) -> int:
        """Index of the last value handed out (``p`` before the first ``next``)."""
        ...

    @property
    def remaining(self) -> int:
        """Tokens left to hand out (equal to ``position``)."""
        ...

    hashes: int
    """Hash evaluations so far (set-up excluded)."""

    @property
    def stored(self) -> int:
        """32-byte values held right now."""
        ...

    def next(self) -> tuple[int, bytes]:
        """The next token down the chain."""
        ...

    def skip_to(self, index: int) -> None:
        """Move so the next token is ``index - 1``; skipped tokens are never handed out."""
        ...

    def to_state(self) -> dict[str, Any]:
        """Serializable (secret) state."""
        ...


def _check_start(seed: bytes, n: int, p: int) -> None:
    if len(seed) != TOKEN_SIZE or n < 1 or not 0 <= p <= n:
        raise LocalProtocolError(f"bad traversal: n={n}, p={p}")


class NaiveTraversal:
    """Keeps only the seed; ``O(p)`` hashes per token. A reference for tests."""

    def __init__(self, seed: bytes, n: int, p: int) -> None:
        _check_start(seed, n, p)
        self.seed, self.n, self._position, self.hashes = seed, n, p, 0

    position = property(lambda self: self._position)
    remaining = property(lambda self: self._position)
    stored = property(lambda self: 1)

    def next(self) -> tuple[int, bytes]:
        if self._position == 0:
            raise LocalProtocolError("chain exhausted")
        self._position -= 1
        self.hashes += self._position
        return self._position, iterate(self.seed, self._position)

    def skip_to(self, index: int) -> None:
        if not 0 <= index <= self._position:
            raise LocalProtocolError("can only skip down the chain")
        self._position = index

    def to_state(self) -> dict[str, Any]:
        return {"kind": "naive", "seed": self.seed, "n": self.n, "p": self._position}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NaiveTraversal:
        return cls(state["seed"], state["n"], state["p"])


class CheckpointTraversal:
    """Keeps every ``step``-th value (``step ≈ √n``); recomputes within a segment."""

    def __init__(self, seed: bytes, n: int, p: int, step: int | None = None) -> None:
        _check_start(seed, n, p)
        self.n, self._position, self.hashes = n, p, 0
        self.step = step or max(1, math.isqrt(n))
        self.marks: dict[int, bytes] = {}
        value = seed
        for i in range(p):
            if i % self.step == 0:
                self.marks[i] = value
            value = _sha256(value).digest()

    position = property(lambda self: self._position)
    remaining = property(lambda self: self._position)
    stored = property(lambda self: len(self.marks))

    def next(self) -> tuple[int, bytes]:
        if self._position == 0:
            raise LocalProtocolError("chain exhausted")
        self._position -= 1
        base = self._position - self._position % self.step
        self.hashes += self._position - base
        value = iterate(self.marks[base], self._position - base)
        if self._position == base:
            del self.marks[base]
        return self._position, value

    def skip_to(self, index: int) -> None:
        if not 0 <= index <= self._position:
            raise LocalProtocolError("can only skip down the chain")
        self._position = index
        for mark in [m for m in self.marks if m >= index]:
            del self.marks[mark]

    def to_state(self) -> dict[str, Any]:
        return {"kind": "checkpoint", "n": self.n, "p": self._position, "step": self.step,
                "marks": [[i, v] for i, v in sorted(self.marks.items())]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CheckpointTraversal:
        walker = cls.__new__(cls)
        walker.n, walker.step, walker.hashes = state["n"], state["step"], 0
        walker._position = state["p"]  # noqa: SLF001 - the class's own alternate constructor
        walker.marks = {int(i): bytes(v) for i, v in state["marks"]}
        return walker


class PebbleTraversal:
    """Optimal binary pebbling: ``k`` stored values, at most ``⌈k/2⌉`` hashes per token.

    The chain below ``p`` is embedded in a chain of length ``N = 2^k >= p``. Set-up computes
    ``H^(N-1)(S)`` once, keeping ``z[j] = H^(N - 2^(j+1))(S)``; the unused top ``N - p`` rounds
    are then run without output. Each later round outputs ``z[0]`` and lets the moving pebbles
    (a stack of ``[slot, countdown]``) advance by a budget fixed by the bits of the round number,
    which is what bounds every round's work by ``⌈k/2⌉`` (Schoenmakers 2016, iterative form).
    """

    def __init__(self, seed: bytes, n: int, p: int) -> None:
        _check_start(seed, n, p)
        self.n, self.hashes = n, 0
        self.k = max(1, (p - 1).bit_length())
        size = 1 << self.k
        self.z: list[bytes] = [b""] * self.k
        value = seed
        for i in range(size - 1):
            if (size - i) & (size - i - 1) == 0:  # i = N - 2^(j+1): keep it in slot j
                self.z[(size - i).bit_length() - 2] = value
            value = _sha256(value).digest()
        self.top: bytes | None = value
        self.active: list[list[int]] = []
        self.r = size  # outputs left in the embedding chain; the next one is position r - 1
        while self.r > p:
            self.next()
        self.hashes = 0

    position = property(lambda self: self.r)
    remaining = property(lambda self: self.r)

    @property
    def stored(self) -> int:
        """Slots in use: ``k``, plus the top value until it is handed out."""
        return self.k + (self.top is not None)

    def next(self) -> tuple[int, bytes]:
        if self.r == 0:
            raise LocalProtocolError("chain exhausted")
        if self.top is not None:
            out, self.top = self.top, None
        else:
            out = self.z[0]
            self._advance(self.r)
        self.r -= 1
        return self.r, out

    def _advance(self, r: int) -> None:
        """The work of round ``r`` after ``z[0]`` was handed out."""
        z, moving = self.z, self.active
        c, i = r, 0
        while not c & 1:  # slots below the lowest set bit move down by one
            z[i] = z[i + 1]
            i += 1
            c >>= 1
        i += 1
        c >>= 1
        if c & 1:
            moving.append([i, 0])  # a pebble starts moving from slot i
        u = len(moving)
        budget = (r & 1) + i + 1
        while c:
            while not c & 1:
                budget += 1
                c >>= 1
            u -= 1
            slot, countdown = moving[u]
            steps = budget // 2
            for _ in range(steps):
                base = z[slot]
                if not countdown:
                    slot -= 1
                    countdown = 1 << slot
                z[slot] = _sha256(base).digest()
                countdown -= 1
            self.hashes += steps
            if slot:
                moving[u] = [slot, countdown]
            else:
                moving.pop()
            budget &= 1
            while c & 1:
                budget += 1
                c >>= 1

    def skip_to(self, index: int) -> None:
        if not 0 <= index <= self.r:
            raise LocalProtocolError("can only skip down the chain")
        while self.r > index:
            self.next()

    def to_state(self) -> dict[str, Any]:
        return {"kind": "pebble", "n": self.n, "k": self.k, "r": self.r, "z": list(self.z),
                "top": self.top, "active": [list(m) for m in self.active]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PebbleTraversal:
        """Rebuild from :meth:`to_state`; a damaged state raises :class:`LocalProtocolError`."""
        try:
            walker = cls.__new__(cls)
            walker.n, walker.k, walker.r = int(state["n"]), int(state["k"]), int(state["r"])
            walker.z = [bytes(v) for v in state["z"]]
            walker.top = None if state["top"] is None else bytes(state["top"])
            walker.active = [[int(s), int(c)] for s, c in state["active"]]
            walker.hashes = 0
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalProtocolError("damaged traversal state") from exc
        if len(walker.z) != walker.k or not 0 <= walker.r <= 1 << walker.k:
            raise LocalProtocolError("damaged traversal state")
        return walker
