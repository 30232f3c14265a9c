"""What the vendor's CoAP surface may hold for its peers, and the error it answers beyond that.

Anything a peer can make the vendor keep (an observation, a half-sent body, a response waiting
for its next block, a request waiting for the bank) is counted per peer and in total, so a flood
costs the vendor a fixed amount of memory, never one entry per request. A *peer* is a source
address; an IPv6 source counts by its /64, since one host is routinely given a whole /64 and
could otherwise be a new peer on every request.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import aiocoap.error
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.util import hostportsplit

from m2mpay.protocol import wire
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import ErrorAnswer

__all__ = ["CoapError", "CoapLimits", "Gate", "peer_of"]

_CODES = {"4.00": Code.BAD_REQUEST, "4.01": Code.UNAUTHORIZED, "4.03": Code.FORBIDDEN, "4.04": Code.NOT_FOUND,
          "4.09": Code.CONFLICT, "4.13": Code.REQUEST_ENTITY_TOO_LARGE, "5.00": Code.INTERNAL_SERVER_ERROR,
          "5.03": Code.SERVICE_UNAVAILABLE}


@dataclass(frozen=True, slots=True)
class CoapLimits:
    """Bounds on what the vendor keeps for its CoAP peers.

    The largest request body (an open: coin with an RSA-4096 signature, sealed authorization) is
    about 1.3 KiB, so ``max_body`` leaves room and still caps a reassembled body at 4 KiB.
    """

    max_body: int = 4096
    """Largest request body, checked on every Block1 block before it is kept."""
    watchers_per_session: int = 4
    """Observers of one session's ``due``; a new one replaces the oldest (only the session's
    holder knows its id, so only it can push its own observers out)."""
    watchers_per_peer: int = 16
    watchers_total: int = 1024
    transfers_per_peer: int = 4
    """Block-wise bodies (Block1) or answers (Block2) a peer may have in progress; a new one
    replaces that peer's oldest."""
    transfers_total: int = 64
    transfer_lifetime: float = TransportTuning().MAX_TRANSMIT_WAIT
    """Seconds an idle block-wise transfer is kept (RFC 7252's MAX_TRANSMIT_WAIT, as aiocoap)."""
    waiting_per_peer: int = 4
    """Requests of one peer waiting for the bank (opens, closes)."""
    waiting_total: int = 64


class CoapError(aiocoap.error.RenderableError):
    """A protocol refusal, rendered as its CoAP code with a CBOR error body."""

    def __init__(self, code: ErrorCode, message: str, *, size1: int | None = None) -> None:
        super().__init__(message)
        self.code, self.text, self.size1 = code, message, size1

    def to_message(self) -> aiocoap.Message:
        body = ErrorAnswer(code=self.code.wire, message=self.text[:200]).encode()
        message = aiocoap.Message(code=_CODES[self.code.coap], payload=body, content_format=wire.CONTENT_FORMAT_CBOR)
        if self.size1 is not None:
            message.opt.size1 = self.size1  # RFC 7959 §2.9.3: the largest body we take
        return message


def peer_of(remote: Any) -> str:
    """Who is asking, for the per-peer bounds: the source address (an IPv6 one by its /64)."""
    try:
        host = hostportsplit(remote.hostinfo)[0]
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except (ValueError, TypeError, AttributeError):
        return repr(remote)  # a transport without an IP address: each remote on its own
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Gate:
    """Requests that wait for the bank, counted per peer and in total.

    An open needs only a coin whose signature verifies (a spent one will do) to reach the bank,
    so without this one peer could keep any number of bank requests and sessions in flight.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self._per_peer, self._total = per_peer, total
        self._peers: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._peers.total()

    @contextlib.contextmanager
    def hold(self, peer: str) -> Iterator[None]:
        """Count one waiting request of ``peer`` for the duration; 5.03 beyond the bounds."""
        if self._peers[peer] >= self._per_peer or self._peers.total() >= self._total:
            raise CoapError(ErrorCode.UNAVAILABLE, "too many requests waiting for the bank; retry later")
        self._peers[peer] += 1
        try:
            yield
        finally:
            self._peers[peer] -= 1
            if not self._peers[peer]:
                del self._peers[peer]
