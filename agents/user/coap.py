"""The wallet's CoAP calls: every wait bounded, and aiocoap's errors translated here and only here.

A vendor's error answer becomes a :class:`~m2mpay.protocol.errors.RemoteProtocolError` with the code
from its CBOR body; no answer in time, or a network error, becomes
:class:`~m2mpay.agents.user.errors.VendorUnreachable` (with the aiocoap or OS error as its cause).
Nothing else in the wallet sees an aiocoap exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiocoap
import aiocoap.error
from aiocoap.numbers.codes import Code

from m2mpay.protocol import cbor, wire
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import Due

from .errors import VendorUnreachable

__all__ = ["EXCHANGE_WAIT", "DueStream", "call"]

# CoAP retransmits a confirmable request for up to MAX_TRANSMIT_SPAN (45 s, RFC 7252 §4.8.2); a
# shorter wait gives up on a lossy link while the exchange would still have succeeded.
EXCHANGE_WAIT = 45.0


def _refusal(response: aiocoap.Message) -> RemoteProtocolError:
    code, text = ErrorCode.INTERNAL, f"vendor answered {response.code}"
    with contextlib.suppress(ProtocolError):
        error = cbor.decode(response.payload)
        if isinstance(error, dict):
            code = ErrorCode.from_wire(str(error.get("code")))
            text = str(error.get("message", text))[:200]
    return RemoteProtocolError(text, code)


async def call(ctx: aiocoap.Context, code: Code, uri: str, body: bytes | None = None, *,
               wait: float = EXCHANGE_WAIT) -> bytes:
    """One request; the answer's payload, or our error for a refusal, silence or a network failure."""
    message = aiocoap.Message(code=code, uri=uri, payload=body or b"")
    if body is not None:
        message.opt.content_format = wire.CONTENT_FORMAT_CBOR
    try:
        async with asyncio.timeout(wait):
            response = await ctx.request(message).response
    except TimeoutError as exc:
        raise VendorUnreachable(f"no answer from {uri} within {wait:g} s") from exc
    except (aiocoap.error.Error, OSError) as exc:
        raise VendorUnreachable(f"{uri}: {str(exc) or type(exc).__name__}") from exc
    if not response.code.is_successful():
        raise _refusal(response)
    return bytes(response.payload)


class DueStream:
    """The Observe notifications of ``/sessions/{id}/due``, as :class:`Due` messages.

    :meth:`next` returns ``None`` when nothing arrived in time, raises ``RemoteProtocolError``
    when the vendor refused or ended the observation (or sent garbage), and
    ``VendorUnreachable`` when the network failed. :meth:`cancel` stops observing.
    """

    def __init__(self, ctx: aiocoap.Context, uri: str) -> None:
        self._request = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        self._notes: AsyncIterator[aiocoap.Message] | None = None

    async def next(self, wait: float) -> Due | None:
        """The next notification (the first is the answer to the request itself)."""
        try:
            async with asyncio.timeout(wait):
                if self._notes is None:
                    response = await self._request.response
                    self._notes = aiter(self._request.observation)
                else:
                    response = await anext(self._notes)
        except TimeoutError:
            return None
        except StopAsyncIteration:
            raise RemoteProtocolError("the vendor ended the observation", ErrorCode.SESSION_CLOSED) from None
        except (aiocoap.error.Error, OSError) as exc:
            raise VendorUnreachable(f"notifications: {str(exc) or type(exc).__name__}") from exc
        if not response.code.is_successful():
            raise _refusal(response)
        return Due.decode(response.payload)

    def cancel(self) -> None:
        """Stop observing (aiocoap tells the vendor with the next notification it gets)."""
        if not self._request.observation.cancelled:
            self._request.observation.cancel()
