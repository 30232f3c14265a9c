"""The vendor's CoAP side as a transport: where aiocoap's and the socket's errors become ours.

The CoAP server answers peers through aiocoap; what aiocoap (or the socket under it) raises while
the vendor binds, shuts down or pushes a notification becomes :class:`~m2mpay.agents.mqtt.TransportError`
here, the foreign error as its ``__cause__``, so no agent logic ever sees an aiocoap exception.
(The bank side has its seam in :mod:`m2mpay.agents.mqtt`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiocoap.error

from ..mqtt import TransportError

__all__ = ["TransportError", "coap_seam"]


@contextlib.contextmanager
def coap_seam(what: str) -> Iterator[None]:
    """Run the block; aiocoap and socket errors leave it as :class:`TransportError`."""
    try:
        yield
    except (aiocoap.error.Error, OSError) as exc:
        raise TransportError(f"{what}: {exc}") from exc
