"""One signed settlement in a vendor's outbox, as a pure state machine, and when to send it again.

A settlement (the final one of a session, or a checkpoint) is written to the outbox as the exact
signed bytes before it is first sent, and is sent again, same bytes, until the bank answers it or
refuses it for good. Nothing the network does is final: a transport failure, an answer that does
not verify and the bank's own trouble (a refusal that is not :attr:`~m2mpay.protocol.envelope.Refusal.final`)
are all :class:`NoAnswer`, and only put the entry back in the queue with a longer wait.

::

    QUEUED ──SEND──► SENDING ──ANSWER──► ANSWERED
      ▲  │             │ └────REFUSAL──► REFUSED
      │  │             └──NO_ANSWER──┐
      │  └─CHECK─► CHECKING ─LATE_REFUSED─► REFUSED
      │              │ │
      └──────────────┴─┴─ NO_ANSWER, LATE_OK
    any live state ──SUPERSEDE──► SUPERSEDED (a checkpoint the session's final settlement covers)

Past the deadline ``T`` the bank has let the block lapse, and a late settlement is accepted only
while nobody has blocked the coin since (:func:`m2mpay.protocol.rules.bank.apply_settle`). So a final
settlement that is due after ``T`` first asks the bank for the coin's status (``CHECK``):
:func:`after_status` turns the answer into ``LATE_OK`` (send it) or ``LATE_REFUSED`` (the rules
refuse it, and it never reached the bank: nothing to learn by sending it).

Durable outcomes (``ANSWER``, ``REFUSAL``, ``LATE_REFUSED``, ``SUPERSEDE``) are two-phase: the
session computes the next state with :meth:`Settlement.after`, the agent writes it, and only then
:meth:`Settlement.move` applies it. The others (``SEND``, ``CHECK``, ``NO_ANSWER``, ``LATE_OK``)
concern the attempt in flight and are never written. A pair missing from :data:`TRANSITIONS`
raises :class:`~m2mpay.protocol.errors.LocalProtocolError` and leaves the entry in ``ERROR``.

Times: ``now`` is protocol time (Unix seconds, what ``T`` is measured in); ``mono`` is the
agent's monotonic clock, in which waits are scheduled (a wait is a duration, whatever the clock).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .. import cose
from ..errors import LocalProtocolError
from ..messages import SettleRequest, StatusAnswer

__all__ = [
    "LIVE",
    "TRANSITIONS",
    "NoAnswer",
    "RetryPolicy",
    "Settlement",
    "SettlementEvent",
    "SettlementState",
    "after_status",
    "retry_delay",
]


class SettlementState(enum.Enum):
    """Where one outbox entry stands."""

    QUEUED = "queued"  # written, unanswered, waiting for its next attempt
    SENDING = "sending"  # one attempt in flight
    CHECKING = "checking"  # past T: the coin's status asked before a late settlement
    ANSWERED = "answered"  # the bank's signed answer is kept
    REFUSED = "refused"  # refused for good (a final signed refusal, or the rules no longer allow it)
    SUPERSEDED = "superseded"  # a checkpoint the session's final settlement covers
    ERROR = "error"


class SettlementEvent(enum.Enum):
    """What moves an outbox entry."""

    SEND = "send"
    CHECK = "check"
    ANSWER = "answer"
    REFUSAL = "refusal"
    NO_ANSWER = "no_answer"
    LATE_OK = "late_ok"
    LATE_REFUSED = "late_refused"
    SUPERSEDE = "supersede"


S, E = SettlementState, SettlementEvent
TRANSITIONS: dict[tuple[SettlementState, SettlementEvent], SettlementState] = {
    (S.QUEUED, E.SEND): S.SENDING,
    (S.QUEUED, E.CHECK): S.CHECKING,
    (S.QUEUED, E.SUPERSEDE): S.SUPERSEDED,
    (S.SENDING, E.ANSWER): S.ANSWERED,
    (S.SENDING, E.REFUSAL): S.REFUSED,
    (S.SENDING, E.NO_ANSWER): S.QUEUED,
    (S.SENDING, E.SUPERSEDE): S.SUPERSEDED,
    (S.CHECKING, E.LATE_OK): S.QUEUED,
    (S.CHECKING, E.LATE_REFUSED): S.REFUSED,
    (S.CHECKING, E.NO_ANSWER): S.QUEUED,
    (S.CHECKING, E.SUPERSEDE): S.SUPERSEDED,
    # An attempt in flight when its checkpoint was superseded still comes back: nothing to do.
    (S.SUPERSEDED, E.ANSWER): S.SUPERSEDED,
    (S.SUPERSEDED, E.REFUSAL): S.SUPERSEDED,
    (S.SUPERSEDED, E.NO_ANSWER): S.SUPERSEDED,
    (S.SUPERSEDED, E.LATE_OK): S.SUPERSEDED,
    (S.SUPERSEDED, E.LATE_REFUSED): S.SUPERSEDED,
}
"""Every allowed move; anything else is a bug in the caller."""

LIVE = frozenset({S.QUEUED, S.SENDING, S.CHECKING})
"""States in which an entry still waits for the bank."""


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """An attempt that got no usable answer: never final, the entry is sent again later."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before sending an unanswered settlement again (seconds)."""

    first: float = 1.0
    """The wait after the first unanswered attempt; it doubles with every further one."""
    cap: float = 60.0
    """The longest wait while the deadline is far."""
    margin: int = 60
    """Within this many seconds of ``T``, and after it, settling is urgent."""
    urgent_cap: float = 5.0
    """The longest wait once urgent: before ``T`` the block still protects the tokens, after it a
    late settlement lands only if it reaches the bank before another vendor blocks the coin."""
    jitter: float = 0.5
    """A wait is its nominal value times a factor drawn in ``[1 - jitter/2, 1 + jitter/2)``."""

    def __post_init__(self) -> None:
        if not (0 < self.first <= self.cap and self.urgent_cap > 0 and 0 <= self.jitter < 2 and self.margin >= 0):
            raise LocalProtocolError("retry policy out of range")


def retry_delay(policy: RetryPolicy, failures: int, now: int, deadline: int, draw: float) -> float:
    """Seconds to wait after the ``failures``-th unanswered attempt (``failures >= 1``).

    Exponential from :attr:`RetryPolicy.first`, capped; within the margin before ``T`` and after
    it, capped at :attr:`RetryPolicy.urgent_cap`; before ``T`` never more than half the time left,
    so a deadline is met by more than one attempt. ``draw`` in ``[0, 1)`` spreads vendors that lost
    the bank together over time.
    """
    if failures < 1 or not 0 <= draw < 1:
        raise LocalProtocolError("failures start at 1 and draw is in [0, 1)")
    nominal = min(policy.cap, policy.first * 2.0 ** min(failures - 1, 62))
    if now >= deadline - policy.margin:
        nominal = min(nominal, policy.urgent_cap)
    if now < deadline:
        nominal = min(nominal, max(policy.first, (deadline - now) / 2))
    return nominal * (1 - policy.jitter / 2 + policy.jitter * draw)


def after_status(status: StatusAnswer, session: bytes, *, sent: bool) -> SettlementEvent:
    """What a status answer means for a final settlement that is due after ``T``.

    The bank answers a vendor about a coin only if that vendor blocked it last, and accepts a late
    settlement only if the session is still the coin's current one. If it is not, the settlement
    can still have been carried out before (its answer lost): only the same bytes can fetch that
    stored answer, so an entry that may have reached the bank is sent once more.
    """
    if status.known and status.session == session:
        return SettlementEvent.LATE_OK
    return SettlementEvent.LATE_OK if sent else SettlementEvent.LATE_REFUSED


class Settlement:
    """One outbox entry: the settlement message, its signed bytes, and where it stands."""

    def __init__(self, request: SettleRequest, signed: bytes, deadline: int, *,
                 state: SettlementState = SettlementState.QUEUED, sent: bool = False) -> None:
        self.request = request
        self.signed = signed
        self.deadline = deadline
        self.state = state
        self.sent = sent
        """Whether an attempt may have reached the bank (assumed for entries read back from disk)."""
        self.failures = 0
        self.due_at = 0.0
        """When (``mono``) the next attempt may start; 0 is at once."""
        self.cleared = False
        """Past ``T``, the bank's status said a send is worth it: no second status query."""

    @classmethod
    def read_back(cls, signed: bytes, deadline: int) -> Settlement:
        """An entry read back from the outbox after a restart: queued, and perhaps sent before."""
        return cls(SettleRequest.decode(cose.decode_sign1(signed).payload), signed, deadline, sent=True)

    @property
    def req_id(self) -> bytes:
        """The idempotency key at the bank."""
        return self.request.req_id

    @property
    def keep_open(self) -> bool:
        """True for a checkpoint."""
        return self.request.keep_open

    @property
    def live(self) -> bool:
        """Still waiting for the bank."""
        return self.state in LIVE

    def __repr__(self) -> str:
        kind = "checkpoint" if self.keep_open else "settlement"
        return f"<{kind} {self.req_id.hex()[:8]} at {self.request.index} {self.state.value}>"

    def after(self, event: SettlementEvent) -> SettlementState:
        """The state ``event`` would lead to, without moving; an impossible one poisons the entry."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            previous, self.state = self.state, SettlementState.ERROR
            raise LocalProtocolError(f"settlement: {event.value} not allowed in state {previous.value}")
        return nxt

    def move(self, event: SettlementEvent) -> None:
        """Apply ``event`` (a durable one only once its outcome is written)."""
        self.state = self.after(event)

    def next_event(self, mono: float, now: int) -> SettlementEvent | None:
        """``SEND`` or ``CHECK`` when an attempt is due at ``mono``/``now``; else ``None``."""
        if self.state is not SettlementState.QUEUED or mono < self.due_at:
            return None
        if not self.keep_open and now >= self.deadline and not self.cleared:
            return SettlementEvent.CHECK
        return SettlementEvent.SEND

    def start(self, event: SettlementEvent) -> None:
        """An attempt (``SEND`` or ``CHECK``) leaves now."""
        if event not in (SettlementEvent.SEND, SettlementEvent.CHECK):
            raise LocalProtocolError(f"settlement: {event.value} does not start an attempt")
        self.move(event)
        if event is SettlementEvent.SEND:
            self.sent = True

    def unanswered(self, policy: RetryPolicy, mono: float, now: int, draw: float) -> float:
        """The attempt got no usable answer: queue again after a wait; returns the wait."""
        self.move(SettlementEvent.NO_ANSWER)
        if self.state is not SettlementState.QUEUED:
            return 0.0  # superseded meanwhile: never sent again
        self.failures += 1
        wait = retry_delay(policy, self.failures, now, self.deadline, draw)
        self.due_at = mono + wait
        return wait

    def late_ok(self, mono: float) -> None:
        """Past ``T``, the status says send it: at once, and without asking again."""
        self.move(SettlementEvent.LATE_OK)
        self.cleared = True
        self.due_at = mono
