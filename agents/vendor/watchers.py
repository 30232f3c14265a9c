"""The observers of ``/sessions/{id}/due``: only of open sessions, bounded, and always removed.

An observation is registered only for a session that exists (the resource checks before calling
:meth:`Watchers.add`) and is removed by aiocoap's cancellation callback when it ends for any
reason (the client's deregistration or reset, a final notification), and at once when its session
closes or a newer observer of the same session pushes it out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from m2mpay.protocol import wire
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import Due

from .limits import CoapError, CoapLimits
from .transport import coap_seam

__all__ = ["Watchers"]


class Watchers:
    """Server observations by session, counted per session, per peer and in total."""

    def __init__(self, limits: CoapLimits) -> None:
        self._limits = limits
        self._sessions: dict[bytes, dict[Any, str]] = {}
        """session id → {observation: peer}, oldest first."""
        self._peers: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._peers.total()

    @property
    def sessions(self) -> int:
        """How many sessions have observers."""
        return len(self._sessions)

    def add(self, sid: bytes, peer: str, observation: Any) -> None:
        """Accept ``observation`` of session ``sid`` from ``peer``, or refuse it with 5.03.

        A session's oldest observer gives way to a new one (the client that lost track of its
        observation can always observe again); the per-peer and total bounds are not made room in.
        """
        session = self._sessions.get(sid, {})
        oldest = next(iter(session.items()), None) if len(session) >= self._limits.watchers_per_session else None
        freed_total = 1 if oldest is not None else 0
        freed_peer = 1 if oldest is not None and oldest[1] == peer else 0
        if (self._peers[peer] - freed_peer >= self._limits.watchers_per_peer
                or len(self) - freed_total >= self._limits.watchers_total):
            raise CoapError(ErrorCode.UNAVAILABLE, "too many observers; retry later")
        if oldest is not None:
            self._end(sid, oldest[0], CoapError(ErrorCode.UNAVAILABLE, "a newer observer took this place"))
        self._sessions.setdefault(sid, {})[observation] = peer
        self._peers[peer] += 1
        observation.accept(lambda: self.remove(sid, observation))

    def remove(self, sid: bytes, observation: Any) -> None:
        """Forget ``observation`` (idempotent: aiocoap calls back after we ended it ourselves)."""
        session = self._sessions.get(sid)
        if session is None or observation not in session:
            return
        peer = session.pop(observation)
        if not session:
            del self._sessions[sid]
        self._peers[peer] -= 1
        if not self._peers[peer]:
            del self._peers[peer]

    def notify(self, sid: bytes, due: Due) -> None:
        """Send ``due`` to the session's observers."""
        # Non-confirmable: the meter sends a fresh "due" every interval, so a lost one is replaced
        # by the next; confirmable ones would queue behind every lost acknowledgement (CoAP lets
        # one confirmable message at a time be outstanding to a peer) and stall the payment.
        payload = due.encode()
        for observation in list(self._sessions.get(sid, ())):
            with coap_seam("due notification"):
                observation.trigger(aiocoap.Message(transport_tuning=aiocoap.Unreliable, code=Code.CONTENT,
                                                    payload=payload, content_format=wire.CONTENT_FORMAT_CBOR))

    def close(self, sid: bytes) -> None:
        """The session ended: end its observations with a final 4.09 ``session_closed``."""
        for observation in list(self._sessions.get(sid, ())):
            self._end(sid, observation, CoapError(ErrorCode.SESSION_CLOSED, "session closed"))

    def _end(self, sid: bytes, observation: Any, reason: CoapError) -> None:
        self.remove(sid, observation)
        with coap_seam("final notification"):
            observation.trigger(reason.to_message())  # an unsuccessful notification ends an observation
